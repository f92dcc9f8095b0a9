"""hpcds submit / status / logs / cancel against the project's real two-node Slurm cluster (scripts/local-slurm up).

The jobs are the real quickstart (tiny Mamba, DeepSpeed on CPU ranks) cut to a few steps, so a whole job takes about
half a minute; a failing job is a rendered run whose srun line is replaced by `exit 3`. Every job a test submits is
cancelled at the end of the module, finished or not.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcds import facts, runs, slurm
from hpcds.cli.jobs_cmd import StatusSource
from hpcds.cli.submit_cmd import sbatch_run

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
FEW_STEPS = ["--set", "training.max_steps=4", "--set", "training.warmup_steps=1"]
FEW_STEPS += ["--set", "checkpoint.every_steps=2", "--set", "training.eval_interval_steps=2"]
JSON_KEYS = {"name", "job_id", "state", "restarts", "step", "max_steps", "last_checkpoint_step", "world_size"}
JSON_KEYS |= {"nodes", "wandb_id"}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def hpcds(runs_root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HPCDS_RUNS_DIR": str(runs_root), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hpcds", *args], capture_output=True, text=True, env=env, cwd=runs_root, timeout=120
    )


def submit(runs_root: Path, submitted: list[str], *args: str) -> dict:
    done = hpcds(runs_root, "submit", QUICKSTART, *FEW_STEPS, "--json", *args)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    submitted.append(result["job_id"])
    return result


def status_of(runs_root: Path, name: str) -> dict:
    return StatusSource().rows([runs_root / name])[0].to_dict()


def wait_for(runs_root: Path, name: str, states: set[str], timeout_s: float = 90, seen: list | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        row = status_of(runs_root, name)
        if seen is not None and (not seen or seen[-1] != row["state"]):
            seen.append(row["state"])
        if row["state"] in states:
            return row
        if time.monotonic() > deadline:
            pytest.fail(f"run {name} still {row['state']} ({row['reason']}) after {timeout_s} s; wanted {states}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def failed_run(runs_root, submitted) -> Path:
    """A rendered run whose payload exits 3 (the batch script's own event logging is kept)."""
    done = hpcds(runs_root, "submit", QUICKSTART, "--name", "exit3", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    run_dir = Path(json.loads(done.stdout)["run_dir"])
    script = run_dir / facts.SCRIPT_FILE
    lines = script.read_text().splitlines(keepends=True)
    srun = [i for i, line in enumerate(lines) if line.startswith("srun ")]
    assert len(srun) == 1, "the batch script should start the launcher with exactly one srun line"
    lines[srun[0]] = "(exit 3)\n"
    script.write_text("".join(lines))
    submitted.append(sbatch_run(run_dir))
    return run_dir


def test_failing_job_shows_failed_with_its_exit_code(failed_run, runs_root):
    row = wait_for(runs_root, failed_run.name, {"FAILED", "COMPLETED"}, timeout_s=60)
    assert (row["state"], row["exit_code"], row["source"]) == ("FAILED", 3, "squeue")
    exits = [e for e in runs.read_events(failed_run) if e["event"] == "exited"]
    assert [e["rc"] for e in exits] == [3]


def test_two_node_run_goes_pending_running_completed(runs_root, submitted, tmp_path):
    # Hold every node with an exclusive job first, so the run is seen waiting in the queue.
    blocker = slurm.run(
        [
            "sbatch",
            "--parsable",
            "--exclusive",
            "-N2",
            "-J",
            "hpcds-test-blocker",
            "-o",
            "/dev/null",
            "--wrap=sleep 300",
        ]
    )
    submitted.append(slurm.parse_sbatch_parsable(blocker))
    # By address: the rendezvous must work where node names do not resolve between nodes.
    by_address = ["--set", "slurm.master_addr=ip"]
    result = submit(runs_root, submitted, "--nodes", "2", "--set", "slurm.ranks_per_node=1", *by_address)
    name, job_id = result["name"], result["job_id"]
    seen: list[str] = []
    pending = wait_for(runs_root, name, {"PENDING"}, timeout_s=30, seen=seen)
    assert pending["reason"] in ("Resources", "Priority") and pending["job_id"] == job_id
    slurm.scancel(submitted[-2])
    wait_for(runs_root, name, {"RUNNING"}, timeout_s=60, seen=seen)
    env = {**os.environ, "HPCDS_RUNS_DIR": str(runs_root)}
    follow = subprocess.Popen(
        [sys.executable, "-m", "hpcds", "logs", name, "-f"], stdout=subprocess.PIPE, text=True, env=env, cwd=runs_root
    )
    done = wait_for(runs_root, name, {"COMPLETED", "FAILED", "CANCELLED"}, timeout_s=150, seen=seen)
    followed, _ = follow.communicate(timeout=30)  # -f ends by itself once the job has ended
    assert done["state"] == "COMPLETED", f"{done}\n{hpcds(runs_root, 'logs', name).stdout[-3000:]}"
    assert seen[0] == "PENDING" and "RUNNING" in seen and seen[-1] == "COMPLETED"

    run_dir = Path(result["run_dir"])
    parse_hostfile = pytest.importorskip("deepspeed.launcher.runner")._parse_hostfile
    hostfile = (run_dir / f"hostfile-{job_id}").read_text()
    assert dict(parse_hostfile(hostfile.splitlines())) == {"n1": 1, "n2": 1}
    launches = {(e["host"], e["node_rank"]) for e in runs.read_events(run_dir) if e["event"] == "launch"}
    assert launches == {("n1", 0), ("n2", 1)}
    (started,) = [e for e in runs.read_events(run_dir) if e["event"] == "started"]
    address = ipaddress.ip_address(started["master_addr"])  # n1's, found by the batch script running there
    for launch in (e for e in runs.read_events(run_dir) if e["event"] == "launch"):
        argv = launch["argv"]
        assert argv[argv.index("--master_addr") + 1] == str(address) != "127.0.0.1"

    listed = json.loads(hpcds(runs_root, "status", name, "--json").stdout)
    assert len(listed) == 1 and set(listed[0]) >= JSON_KEYS
    row = listed[0]
    assert (row["job_id"], row["state"], row["restarts"], row["nodes"]) == (job_id, "COMPLETED", 0, "n[1-2]")
    assert (row["step"], row["max_steps"], row["last_checkpoint_step"], row["world_size"]) == (4, 4, 4, 2)
    assert row["wandb_id"] == runs.read_meta(run_dir)["wandb_id"]

    logs = hpcds(runs_root, "logs", name)
    assert logs.returncode == 0 and logs.stdout == (run_dir / f"slurm-{job_id}.out").read_text()
    assert follow.returncode == 0 and followed == logs.stdout

    refused = hpcds(runs_root, "cancel", name)  # scancel itself would exit 0 for a finished job
    assert refused.returncode == 1 and "nothing to cancel" in refused.stderr
    assert not [e for e in runs.read_events(run_dir) if e["event"] == "cancelled"]


def test_cancel_ends_a_running_job(runs_root, submitted):
    result = submit(runs_root, submitted, "--set", "training.max_steps=100000", "--set", "training.warmup_steps=1")
    wait_for(runs_root, result["name"], {"RUNNING"}, timeout_s=60)
    # Cancelled once it trains: the ranks then take scancel's TERM as a request to save and stop, and the job ends in
    # seconds. A TERM sent before DeepSpeed's launcher has started the ranks never reaches them (they are forked
    # after it, with the launcher's mask and without its pending signal): the job would run until Slurm's KILL,
    # KillWait (60 s on the test cluster) after the TERM.
    deadline = time.monotonic() + 120
    losses = Path(result["run_dir"]) / "losses.jsonl"
    while not losses.is_file() or not losses.read_text().strip():
        assert time.monotonic() < deadline, "the run trained no step in 120 s"
        time.sleep(0.5)
    done = hpcds(runs_root, "cancel", result["name"])
    assert done.returncode == 0, done.stderr
    row = wait_for(runs_root, result["name"], {"CANCELLED"}, timeout_s=90)
    assert row["source"] == "squeue"
    events = runs.read_events(Path(result["run_dir"]))
    assert [e["job_id"] for e in events if e["event"] == "cancelled"] == [result["job_id"]]
    assert [e["signal"] for e in events if e["event"] == "stopped"] == ["SIGTERM"]  # the ranks saved and stopped


def test_preempted_run_is_requeued_and_restarts(runs_root, submitted):
    """A job in the `urgent` partition preempts the run; Slurm requeues it and it starts again with restart 1."""
    result = submit(runs_root, submitted, "--set", "training.max_steps=100000", "--set", "training.warmup_steps=1")
    name = result["name"]
    wait_for(runs_root, name, {"RUNNING"}, timeout_s=60)
    urgent = [
        "sbatch",
        "--parsable",
        "-p",
        "urgent",
        "--exclusive",
        "-N2",
        "-J",
        "hpcds-test-urgent",
        "-o",
        "/dev/null",
        "--wrap=sleep 3",
    ]
    submitted.append(slurm.parse_sbatch_parsable(slurm.run(urgent)))
    requeued = wait_for(runs_root, name, {"REQUEUED"}, timeout_s=60)
    assert requeued["restarts"] == 1 and requeued["job_id"] == result["job_id"]
    again = wait_for(runs_root, name, {"RUNNING"}, timeout_s=90)
    assert again["restarts"] == 1
    # squeue says RUNNING a moment before the batch script's first line records the start.
    deadline = time.monotonic() + 30
    while True:
        starts = [e["restart"] for e in runs.read_events(Path(result["run_dir"])) if e["event"] == "started"]
        if len(starts) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert starts == [0, 1]
    assert hpcds(runs_root, "cancel", name).returncode == 0


def test_refused_submission_leaves_no_run_directory(slurm_cluster, runs_root):
    before = sorted(p.name for p in runs_root.iterdir())
    done = hpcds(runs_root, "submit", QUICKSTART, "--partition", "nosuchpartition", "--name", "refused")
    assert done.returncode == 1
    assert "sbatch --parsable" in done.stderr and "invalid partition" in done.stderr.lower()
    assert sorted(p.name for p in runs_root.iterdir()) == before


def test_missing_sbatch_is_a_clear_error(runs_root, tmp_path):
    before = sorted(p.name for p in runs_root.iterdir())
    done = hpcds(runs_root, "submit", QUICKSTART, "--name", "nosbatch", env={"PATH": str(tmp_path)})
    assert done.returncode == 1 and "sbatch: command not found" in done.stderr and "local-slurm" in done.stderr
    assert sorted(p.name for p in runs_root.iterdir()) == before


def test_status_asks_slurm_once_per_refresh(slurm_cluster, runs_root):
    source = StatusSource()
    before = dict(slurm.CALLS)
    rows = source.rows(runs.list_runs(runs_root))
    calls = {cmd: n - before.get(cmd, 0) for cmd, n in slurm.CALLS.items() if n != before.get(cmd, 0)}
    assert len(rows) >= 3 and calls == {"squeue": 1}


def test_finished_runs_outlive_the_scheduler(failed_run, runs_root):
    """Slurm purges finished jobs after MinJobAge; status then answers from the run's own event log."""
    job_id = runs.read_meta(failed_run)["job_ids"][-1]
    deadline = time.monotonic() + 180
    while any(job.job_id == job_id for job in slurm.squeue_mine()):
        if time.monotonic() > deadline:
            pytest.fail(f"Slurm still lists job {job_id} after 180 s (MinJobAge in {os.environ['SLURM_CONF']}?)")
        time.sleep(2)
    row = status_of(runs_root, failed_run.name)
    assert (row["state"], row["exit_code"], row["source"]) == ("FAILED", 3, "events")


def test_status_asks_slurm_only_for_this_users_jobs(slurm_cluster):
    """On a busy cluster squeue lists everyone's jobs; hpcds asks for its user's (`--me`). Another user's held jobs
    are in the queue, and not in what status reads."""
    other = ["runuser", "-u", "nobody", "--", "env", f"SLURM_CONF={slurm_cluster.conf}", "sbatch", "--parsable"]
    other += ["--hold", "-J", "someone-else", "-o", "/dev/null", "--wrap", "sleep 1"]
    theirs = {subprocess.run(other, capture_output=True, text=True, check=True).stdout.strip() for _ in range(20)}
    try:
        everyone = {
            job.job_id
            for job in slurm.parse_squeue(
                slurm.run(["squeue", "--noheader", "--states=all", "-O", slurm.SQUEUE_FORMAT])
            )
        }
        assert theirs <= everyone  # they are there to be seen
        calls = slurm.CALLS["squeue"]
        mine = {job.job_id for job in slurm.squeue_mine()}
        assert not theirs & mine and slurm.CALLS["squeue"] == calls + 1
    finally:
        subprocess.run(["scancel", "-u", "nobody"], capture_output=True, check=False)
