"""What ran is what was submitted: the record meta.json keeps at submit, the comparison every `hpcds launch` makes at
every start (slurm.on_version_change: warn | fail), and slurm.snapshot's copy of the package.

The comparison and the copy on literal folders; `hpcds launch` in this process (the exec replaced, as in
test_preflight); the batch script under bash with stand-ins for an ending Slurm cannot be made to produce; and on the
test cluster: a run whose meta.json says another torch stops at its start without a requeue (no DeepSpeed), and a run
submitted with a snapshot trains from the copy after the installed package changed (one short DeepSpeed run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bad_nodes import line, run_script, scontrol_changes

from hpcds import facts, launch, runs, snapshot, versions
from hpcds.errors import HpcdsError, SpecError
from hpcds.render import render_run_files, render_sbatch
from hpcds.slurm.status import history_lines, job_history, run_status, table_cells
from hpcds.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def record(**changes) -> dict:
    base = {
        "versions": {"hpcds": "0.1.0", "torch": "2.5.0", "deepspeed": "0.16.0", "transformers": "4.56.0"},
        "python_version": "3.11.7",
        "python_prefix": "/venv",
        "python_executable": "/venv/bin/python",
        "hpcds_path": "/venv/lib/hpcds",
        "hpcds_code": "a" * 64,
    }
    versions_changes = changes.pop("versions", {})
    return {**base, **changes, "versions": {**base["versions"], **versions_changes}}


def test_changes_are_what_differs_from_the_submit_record_in_a_fixed_order():
    assert versions.changes(record(), record()) == {}
    now = record(versions={"torch": "2.6.0", "mamba-ssm": "2.2.4"}, hpcds_code="b" * 64, python_version="3.12.1")
    now["python_executable"] = "/venv/bin/python3"  # the same environment: not a change
    # mamba-ssm was not installed at submit (the login node may lack it): not compared. A digest shows 12 characters.
    assert versions.changes(record(), now) == {
        "torch": ["2.5.0", "2.6.0"],
        "python_version": ["3.11.7", "3.12.1"],
        "hpcds_code": ["a" * 12, "b" * 12],
    }
    assert versions.changes(record(), record(versions={"deepspeed": None})) == {"deepspeed": ["0.16.0", None]}
    assert versions.changes({"versions": {"torch": "2.5.0"}}, record()) == {}  # an older run directory's meta.json
    text = versions.render_changes({"torch": ["2.5.0", "2.6.0"], "deepspeed": ["0.16.0", None]})
    assert text == "torch 2.5.0 -> 2.6.0, deepspeed 0.16.0 -> none"


def test_the_record_reads_metadata_and_the_running_package_without_importing_torch():
    code = "import sys; from hpcds import versions; r = versions.current_record(); "
    code += "print(sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules)); print(r)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[0] == "[]"
    now = versions.current_record()
    assert now["versions"]["hpcds"] == __import__("hpcds").__version__ and now["versions"]["torch"]
    assert set(now["versions"]) == {"hpcds", *versions.PACKAGES}
    assert (now["python_executable"], now["python_prefix"]) == (sys.executable, sys.prefix)
    assert now["hpcds_path"] == str(versions.package_dir())
    started = time.perf_counter()
    for _ in range(5):
        versions.changes(now, versions.current_record())
    print(f"\nper-start check (record + compare): {(time.perf_counter() - started) / 5 * 1000:.1f} ms")


def test_the_kernel_packages_are_found_by_their_distribution_names(tmp_path, monkeypatch):
    # As pip installs them (the [gpu] extra): mamba_ssm-*.dist-info and causal_conv1d-*.dist-info.
    for name, version in (("mamba_ssm", "2.2.4"), ("causal_conv1d", "1.5.0")):
        info = tmp_path / f"{name}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = versions.package_versions()
    assert (found["mamba-ssm"], found["causal-conv1d"]) == ("2.2.4", "1.5.0")


def fake_package(root: Path) -> Path:
    (root / "hpcds" / "render" / "templates").mkdir(parents=True)
    (root / "hpcds" / "__init__.py").write_text('__version__ = "9.9"\n')
    (root / "hpcds" / "render" / "templates" / "job.sbatch.j2").write_text("#!/bin/bash\n")
    return root / "hpcds"


def test_the_code_digest_sees_contents_and_names_but_not_byte_code(tmp_path):
    package = fake_package(tmp_path)
    first = versions.code_digest(package)
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (package / ".init.py.swp").write_bytes(b"\0")
    assert versions.code_digest(package) == first
    (package / "__init__.py").write_text('__version__ = "9.9"\n#\n')
    second = versions.code_digest(package)
    assert second != first
    (package / "__init__.py").rename(package / "main.py")
    assert versions.code_digest(package) not in (first, second)


def test_a_snapshot_is_the_package_whole_and_its_digest(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    runs.write_json_atomic(run_dir / facts.META_FILE, {"hpcds_code": "old"})
    made = snapshot.write_snapshot(run_dir)
    copy = snapshot.snapshot_package(run_dir)
    source = versions.package_dir()
    assert [rel for rel, _ in versions.package_files(copy)] == [rel for rel, _ in versions.package_files(source)]
    assert (copy / "render" / "templates" / "job.sbatch.j2").read_text() == (
        source / "render" / "templates" / "job.sbatch.j2"
    ).read_text()
    meta = runs.read_meta(run_dir)
    assert meta["hpcds_code"] == versions.code_digest(copy) and meta["snapshot"]["files"] == made["files"] > 50
    assert set(os.listdir(run_dir)) == {"snapshot", facts.META_FILE}  # no temp folder left
    # A run keeps its first snapshot: a second is refused and the first is left as it was.
    with pytest.raises(HpcdsError, match="cannot copy"):
        snapshot.write_snapshot(run_dir, fake_package(tmp_path / "other"))
    assert versions.code_digest(copy) == meta["hpcds_code"] and set(os.listdir(run_dir)) == {
        "snapshot",
        facts.META_FILE,
    }
    print(f"\nsnapshot: {made['files']} files, {made['bytes']} bytes, {made['seconds']} s")


def test_a_copy_that_fails_half_way_leaves_no_snapshot_and_a_new_run_goes(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / facts.META_FILE).write_text("{}")
    read = Path.read_bytes
    calls = []

    def failing(path: Path) -> bytes:
        calls.append(path)
        if len(calls) == 20:
            raise OSError(28, "No space left on device")
        return read(path)

    monkeypatch.setattr(Path, "read_bytes", failing)
    with pytest.raises(HpcdsError, match="No space left on device"):
        snapshot.write_snapshot(run_dir)
    assert os.listdir(run_dir) == [facts.META_FILE]  # no snapshot, no half-written temp folder
    calls.clear()
    with pytest.raises(HpcdsError):
        snapshot.write_snapshot_of_new_run(run_dir)
    assert not run_dir.exists()


def test_a_snapshot_with_a_container_is_refused_with_its_path():
    container = "slurm.container={kind: apptainer, image: /images/x.sif}"
    with pytest.raises(SpecError) as caught:
        load_spec(None, ["slurm.snapshot=true", container], {"gpus_per_node": 0}, preset="quickstart")
    assert [p.path for p in caught.value.problems] == ["slurm.snapshot"]


def test_the_snapshot_script_runs_python_m_hpcds_from_the_copy(tmp_path):
    spec = load_spec(None, ["slurm.snapshot=true"], {"gpus_per_node": 0}, preset="quickstart")
    script = render_sbatch(spec, "/runs/q", ["/venv/bin/python", "-m", "hpcds"])
    assert 'export PYTHONPATH="$RUN_DIR/snapshot${PYTHONPATH:+:$PYTHONPATH}"' in script
    assert script.index("export PYTHONPATH") < script.index("srun --ntasks-per-node=1")
    assert "/venv/bin/python -m hpcds launch" in script
    assert "PYTHONPATH" not in render_sbatch(load_spec(None, [], {"gpus_per_node": 0}, preset="quickstart"), "/r")
    if shutil.which("shellcheck"):
        (tmp_path / "job.sbatch").write_text(script)
        done = subprocess.run(
            ["shellcheck", "-s", "bash", str(tmp_path / "job.sbatch")], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout.decode()


# ---------------------------------------------------------------------------------------------------------------------
# `hpcds launch` in this process


def launch_dir(path: Path, *sets: str, recorded: dict | None = None) -> Path:
    spec = load_spec(None, list(sets), {"nodes": 1, "gpus_per_node": 0}, preset="quickstart")
    _, files = render_run_files(spec)
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    runs.write_json_atomic(path / facts.META_FILE, recorded if recorded is not None else versions.current_record())
    return path


def launch_here(run_dir: Path, monkeypatch) -> list:
    execs = []
    monkeypatch.setattr(launch.os, "execve", lambda *args: execs.append(args))
    monkeypatch.setattr(launch.signal, "pthread_sigmask", lambda *args: set())
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1", "SLURMD_NODENAME": "n1"}
    env |= {facts.NODES_ENV: "n1", facts.MASTER_PORT_ENV: "23456", launch.PREFLIGHT_ENV: "0"}
    launch.launch_node(run_dir, env=env)
    return execs


def test_launch_logs_nothing_more_when_nothing_changed(tmp_path, monkeypatch):
    run_dir = launch_dir(tmp_path / "run")
    assert len(launch_here(run_dir, monkeypatch)) == 1
    (launched,) = runs.read_events(run_dir)
    assert launched["event"] == "launch" and launched["hpcds_path"] == str(versions.package_dir())


def test_launch_warns_of_a_change_and_goes_on(tmp_path, monkeypatch, capsys):
    now = versions.current_record()
    run_dir = launch_dir(tmp_path / "run", recorded={**now, "versions": {**now["versions"], "torch": "0.0.1"}})
    assert len(launch_here(run_dir, monkeypatch)) == 1
    changed, launched = runs.read_events(run_dir)
    assert (changed["event"], changed["action"], changed["host"], changed["job_id"]) == (
        "environment_changed",
        "warn",
        "n1",
        "7",
    )
    assert changed["changed"] == {"torch": ["0.0.1", now["versions"]["torch"]]} and launched["event"] == "launch"
    assert f"torch 0.0.1 -> {now['versions']['torch']} (slurm.on_version_change: warn" in capsys.readouterr().err


def test_launch_under_fail_exits_78_before_deepspeed(tmp_path, monkeypatch, capsys):
    now = versions.current_record()
    run_dir = launch_dir(tmp_path / "run", "slurm.on_version_change=fail", recorded={**now, "hpcds_code": "0" * 64})
    with pytest.raises(SystemExit) as ended:
        launch_here(run_dir, monkeypatch)
    assert ended.value.code == facts.EXIT_ENVIRONMENT_CHANGED == 78
    (changed,) = runs.read_events(run_dir)
    assert changed["action"] == "fail" and changed["changed"] == {"hpcds_code": ["0" * 12, now["hpcds_code"][:12]]}
    err = capsys.readouterr().err
    assert "job ends here without a requeue" in err and "hint: reinstall" in err


def test_launch_of_a_snapshot_run_refuses_hpcds_from_elsewhere(tmp_path, monkeypatch):
    run_dir = launch_dir(tmp_path / "run", "slurm.snapshot=true")
    with pytest.raises(HpcdsError, match=r"slurm.snapshot: this run's hpcds is the copy in .*/snapshot/hpcds"):
        launch_here(run_dir, monkeypatch)
    assert runs.read_events(run_dir) == []


# ---------------------------------------------------------------------------------------------------------------------
# The batch script and status


def test_the_batch_script_ends_a_changed_start_without_a_requeue(tmp_path):
    changed = line(
        "environment_changed", job_id="42", restart=0, host="n2", action="fail", changed={"torch": ["1", "2"]}
    )
    code, events, calls, _ = run_script(tmp_path, [changed], facts.EXIT_ENVIRONMENT_CHANGED)
    assert code == 78 and scontrol_changes(calls) == []
    assert [(e["event"], e.get("class"), e.get("reason")) for e in events] == [
        ("started", None, None),
        ("environment_changed", None, None),
        ("exited", "environment_changed", None),
        ("not_requeued", None, "environment_changed"),
    ]


def test_a_warned_change_is_not_an_ending(tmp_path):
    changed = line("environment_changed", job_id="42", restart=0, host="n2", action="warn", changed={})
    code, events, _, _ = run_script(tmp_path, [changed], 0)
    assert code == 0 and [e.get("class") for e in events if e["event"] == "exited"] == ["finished"]


def test_status_shows_the_change_and_why_the_run_failed():
    events = [
        {"time": 1, "event": "submitted", "job_id": "42"},
        {"time": 2, "event": "started", "job_id": "42", "restart": 0},
        {"time": 3, "event": "environment_changed", "job_id": "42", "restart": 0, "host": "n1", "action": "fail",
         "changed": {"torch": ["0.0.1", "2.13.0"]}},
        {"time": 4, "event": "exited", "job_id": "42", "restart": 0, "rc": 78, "class": "environment_changed"},
    ]  # fmt: skip
    row = run_status("r", {}, events, None, {}, {}, 5.0)
    assert (row.state, row.exit_code, row.versions_changed) == ("FAILED", 78, {"torch": ["0.0.1", "2.13.0"]})
    assert row.reason == "versions changed since submit: torch 0.0.1 -> 2.13.0 (fail)"
    assert table_cells(row)["versions changed"] == "torch 0.0.1 -> 2.13.0"
    assert history_lines(job_history("42", events)) == [
        "restart 0: no trainer start, ran 0:02, environment_changed (exit 78); versions changed since submit: "
        "torch 0.0.1 -> 2.13.0 (fail)"
    ]


# ---------------------------------------------------------------------------------------------------------------------
# On the test cluster


def hpcds(runs_root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HPCDS_RUNS_DIR": str(runs_root), **(env or {})}
    # From a folder without an hpcds package in it: `-m` puts the working directory first on sys.path.
    argv = [sys.executable, "-m", "hpcds", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=runs_root.parent, timeout=180)


def submit_held(runs_root: Path, *sets: str, env: dict | None = None) -> tuple[Path, str]:
    """A quickstart run submitted held (`--hold`), so the test can change things before its first start."""
    args = [a for s in [*sets, 'slurm.extra_sbatch=["--hold"]'] for a in ("--set", s)]
    done = hpcds(runs_root, "submit", QUICKSTART, *args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    return Path(result["run_dir"]), result["job_id"]


def wait_for_exit(run_dir: Path, job_id: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        ended = [e for e in runs.read_events(run_dir) if e["event"] == "exited" and e.get("class") != "requeued"]
        if ended:
            return ended[-1]
        assert time.monotonic() < deadline, f"job {job_id} did not end in {timeout_s} s: {runs.read_events(run_dir)}"
        time.sleep(0.5)


def job_fields(job_id: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(word.split("=", 1) for word in text.split() if "=" in word)


def set_recorded(run_dir: Path, package: str, version: str) -> None:
    meta = runs.read_meta(run_dir)
    runs.write_json_atomic(run_dir / facts.META_FILE, {**meta, "versions": {**meta["versions"], package: version}})


@pytest.mark.slurm
def test_real_slurm_a_start_with_another_torch_under_fail_ends_without_a_requeue(slurm_cluster, tmp_path):
    runs_root = tmp_path / "runs"
    run_dir, job_id = submit_held(runs_root, "slurm.on_version_change=fail", "slurm.max_requeues=3")
    try:
        set_recorded(run_dir, "torch", "0.0.1")
        subprocess.run(["scontrol", "release", job_id], check=True)
        ended = wait_for_exit(run_dir, job_id, 120)
        deadline = time.monotonic() + 30
        while job_fields(job_id).get("JobState") not in ("FAILED", None):
            assert time.monotonic() < deadline, job_fields(job_id)
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    events = runs.read_events(run_dir)
    torch_now = versions.current_record()["versions"]["torch"]
    (changed,) = [e for e in events if e["event"] == "environment_changed"]
    assert (changed["action"], changed["changed"], changed["restart"]) == ("fail", {"torch": ["0.0.1", torch_now]}, 0)
    assert (ended["rc"], ended["class"]) == (78, "environment_changed")
    assert [e["reason"] for e in events if e["event"] == "not_requeued"] == ["environment_changed"]
    assert not [e for e in events if e["event"] in ("launch", "requeue", "failure_requeue", "preflight")]
    fields = job_fields(job_id)
    assert (fields.get("JobState"), fields.get("Restarts"), fields.get("ExitCode")) == ("FAILED", "0", "78:0")
    output = (run_dir / f"slurm-{job_id}.out").read_text()
    assert f"torch 0.0.1 -> {torch_now}" in output and "without a requeue" in output and "Traceback" not in output
    (row,) = json.loads(hpcds(runs_root, "status", run_dir.name, "--json").stdout)
    assert row["state"] == "FAILED" and row["versions_changed"] == {"torch": ["0.0.1", torch_now]}
    assert row["reason"].startswith("versions changed since submit: torch 0.0.1")
    table = hpcds(runs_root, "status", run_dir.name).stdout
    assert "VERSIONS CHANGED" in table and f"torch 0.0.1 -> {torch_now}" in table


# Appended to the installed copy's runs.py after submit: every event written by code imported from there says so.
MARKED = """

_unmarked_append_event = append_event


def append_event(run_dir, event, **fields):
    _unmarked_append_event(run_dir, event, **fields, marker="installed-after-submit")
"""


@pytest.mark.slurm
@pytest.mark.deepspeed
def test_real_slurm_a_snapshot_run_trains_and_requeues_from_its_copy_after_the_installed_package_changed(
    slurm_cluster, tmp_path
):
    # "Installed": a copy of the hpcds under test, first on PYTHONPATH for `hpcds submit` (and, through sbatch's
    # environment, for the job). It changes after submit; the run's snapshot must not, in either allocation.
    installed = tmp_path / "site"
    shutil.copytree(versions.package_dir(), installed / "hpcds", ignore=shutil.ignore_patterns("__pycache__"))
    env = {"PYTHONPATH": f"{installed}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)}
    sets = ["slurm.snapshot=true", "training.max_steps=4", "training.warmup_steps=1", "checkpoint.every_steps=2"]
    sets += ["training.eval_interval_steps=0", "slurm.ranks_per_node=1", "slurm.preflight=false"]
    sets += ["slurm.env={HPCDS_TEST_FAULT: signal_at:2:USR2}"]  # saves at step 2 and requeues itself
    runs_root = tmp_path / "runs"
    run_dir, job_id = submit_held(runs_root, *sets, env=env)
    try:
        meta = runs.read_meta(run_dir)
        assert meta["snapshot"]["source"] == str(installed / "hpcds")
        assert meta["hpcds_command"] == [sys.executable, "-m", "hpcds"]
        with open(installed / "hpcds" / "runs.py", "a") as handle:
            handle.write(MARKED)
        assert versions.code_digest(installed / "hpcds") != meta["hpcds_code"]
        subprocess.run(["scontrol", "release", job_id], check=True)
        # Between the first allocation's stop and the requeued start, "transformers is upgraded".
        deadline = time.monotonic() + 240
        while not [e for e in runs.read_events(run_dir) if e["event"] == "stopped"]:
            assert time.monotonic() < deadline, runs.read_events(run_dir)
            time.sleep(0.2)
        set_recorded(run_dir, "transformers", "0.0.1")
        ended = wait_for_exit(run_dir, job_id, 300)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    events = runs.read_events(run_dir)
    assert ended["class"] == "finished", events
    assert [e["class"] for e in events if e["event"] == "exited"] == ["requeued", "finished"]
    assert [e for e in events if "marker" in e] == []  # neither hpcds launch nor a rank imported the changed copy
    assert [e["step"] for e in events if e["event"] in ("train_start", "finished")] == [0, 2, 4]
    launched = [e for e in events if e["event"] == "launch"]
    assert [(e["restart"], e["hpcds_path"]) for e in launched] == [
        (0, str(snapshot.snapshot_package(run_dir))),
        (1, str(snapshot.snapshot_package(run_dir))),
    ]
    (changed,) = [e for e in events if e["event"] == "environment_changed"]
    transformers_now = versions.current_record()["versions"]["transformers"]
    # Checked again at the requeued start; the code it ran is the code recorded at submit: only the planted change.
    assert (changed["restart"], changed["action"]) == (1, "warn")
    assert changed["changed"] == {"transformers": ["0.0.1", transformers_now]}
    (row,) = json.loads(hpcds(runs_root, "status", run_dir.name, "--json").stdout)
    assert row["state"] == "COMPLETED" and row["versions_changed"] == changed["changed"]
    print(f"\nsnapshot at submit: {meta['snapshot']['files']} files, {meta['snapshot']['seconds']} s")
