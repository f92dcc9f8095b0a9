"""The pre-flight check: the judges on literal numbers, and `hpcds launch` on the test cluster with a full disk (a
2 MB tmpfs run directory), a node that cannot reach the first (a blackhole route in its network namespace) and a
healthy pair of nodes. The GPU check needs GPUs and is not run here."""

from __future__ import annotations

import contextlib
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcds import facts, launch, preflight, runs
from hpcds.plan import plan_job
from hpcds.render import render_run_files
from hpcds.spec import load_spec

GIB = 2**30


def test_each_judge_passes_at_its_limit_and_fails_below_with_the_numbers():
    assert preflight.judge_disk(100, 100, Path("/r")).ok
    disk = preflight.judge_disk(99, 100, Path("/r/checkpoints"))
    assert not disk.ok and disk.values == {"path": "/r/checkpoints", "free_bytes": 99, "limit_bytes": 100}
    assert "100 bytes" in disk.message and "checkpoint.dir" in disk.hint
    assert preflight.judge_memory(8 * GIB, 8 * GIB).ok
    memory = preflight.judge_memory(3 * GIB, 8 * GIB)
    assert not memory.ok and "3.00 GiB" in memory.message and "8.00 GiB" in memory.message
    assert preflight.judge_shm(GIB, GIB).ok and not preflight.judge_shm(64 * 2**20, GIB).ok
    assert preflight.judge_writable({"/r": None, "/c": None}).ok
    writable = preflight.judge_writable({"/r": None, "/c": "Read-only file system"})
    assert not writable.ok and writable.values["errors"] == {"/c": "Read-only file system"}


def test_the_gpu_judge_names_each_problem():
    assert preflight.judge_gpus([40 * GIB] * 2, 2, 30 * GIB, [0, 0]).ok
    assert preflight.judge_gpus([40 * GIB] * 2, 2, 30 * GIB, []).ok  # no NVML: no ECC verdict
    few = preflight.judge_gpus([40 * GIB], 2, 30 * GIB, [])
    assert not few.ok and "1 GPU(s) visible, the spec asks for 2" in few.message
    busy = preflight.judge_gpus([40 * GIB, 5 * GIB], 2, 30 * GIB, [0, 3])
    assert not busy.ok and "GPU 1 has 5.00 GiB free" in busy.message and "ECC errors on GPU 1 (3)" in busy.message


def test_network_verdict_and_the_printed_failures():
    ok = preflight.judge_network(None, 0.5, 3.2, "n1:29001", 10.0)
    assert ok.ok and ok.values["allreduce_gbps"] == 3.2
    down = preflight.judge_network("Timed out after 11 seconds", 11.0, None, "n1:29001", 10.0)
    text = preflight.render_failures("n2", [ok, down, preflight.judge_disk(1, 2, Path("/r"))])
    lines = text.splitlines()
    assert lines[0].startswith("hpcds launch: pre-flight check failed on n2: network: no all-reduce")
    assert lines[1].startswith("  hint: the nodes must reach") and "disk: " in lines[2] and len(lines) == 4


def test_needs_are_the_planners_figures():
    spec = render_run_files(load_spec(None, [], {"nodes": 2, "gpus_per_node": 0}, preset="quickstart"))[0]
    needs = preflight.needs_of(spec)
    plan = plan_job(spec)
    assert needs.checkpoint_bytes == plan.checkpoint_bytes
    assert needs.host_bytes == plan.chosen.cpu_bytes_per_node
    assert needs.shm_bytes == preflight.SHM_PER_RANK_BYTES * spec.slurm.ranks and needs.gpus == 0


def _run_dir(path: Path, nodes: int) -> Path:
    spec = load_spec(None, [], {"nodes": nodes, "gpus_per_node": 0}, preset="quickstart")
    _, files = render_run_files(spec)
    path.mkdir(exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_the_switch_skips_it_and_a_healthy_node_logs_ok(tmp_path, monkeypatch):
    # One node in process; the exec is the one part replaced (a test cannot become DeepSpeed's launcher).
    run_dir = _run_dir(tmp_path / "run", 1)
    execs = []
    monkeypatch.setattr(launch.os, "execve", lambda *args: execs.append(args))
    monkeypatch.setattr(launch.signal, "pthread_sigmask", lambda *args: set())
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "1", "SLURMD_NODENAME": "n1"}
    env |= {facts.NODES_ENV: "n1", facts.MASTER_PORT_ENV: "23456"}
    launch.launch_node(run_dir, env={**env, launch.PREFLIGHT_ENV: "0"})
    assert [e["event"] for e in runs.read_events(run_dir)] == ["launch"]
    launch.launch_node(run_dir, env=env)
    events = runs.read_events(run_dir)
    assert [e["event"] for e in events] == ["launch", "preflight", "launch"] and len(execs) == 2
    assert (
        events[1]["ok"]
        and events[1]["failed"] == []
        and set(events[1]["checks"])
        == {
            "writable",
            "disk",
            "memory",
            "shm",
        }
    )


# ---------------------------------------------------------------------------------------------------------------------
# On the test cluster


def _slurmd_pid(cluster, node: str) -> int:
    return int((cluster.conf.parent.parent / "run" / f"slurmd-{node}.pid").read_text())


def _submit(tmp_path: Path, run_dir: Path, nodes: list[str], before: str = "", record_rc: bool = True) -> str:
    """A job that runs `hpcds launch RUN_DIR` once per node (after `before`) and records each node's exit code.

    Without `record_rc` the launcher replaces the task's shell, so DeepSpeed's processes stay in the step's process
    tree and `_cancel` kills them (a shell in between dies on the TERM, and the launcher, blocking it, outlives it).
    """
    launch_node = f"{shlex.quote(sys.executable)} -m hpcds launch {shlex.quote(str(run_dir))}"
    if record_rc:
        per_node = f'{before} {launch_node}; echo $? > {shlex.quote(str(tmp_path))}/rc-"$SLURMD_NODENAME"'
    else:
        per_node = f"{before} exec {launch_node}"
    script = tmp_path / "job.sh"
    script.write_text(
        f"#!/bin/bash\n#SBATCH --nodes={len(nodes)} --nodelist={','.join(nodes)} --ntasks-per-node=1\n"
        f"#SBATCH --cpus-per-task=1 --time=00:03:00 --output={tmp_path}/slurm-%j.out\n"
        f"export {facts.MASTER_PORT_ENV}={random.randint(21000, 29000)}\n"
        f"srun --ntasks-per-node=1 --cpus-per-task=1 bash -c {shlex.quote(per_node)}\n"
    )
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _cancel(job_id: str) -> None:
    # KILL at once: the launch chain blocks TERM, and a test has no use for DeepSpeed's ranks once they started.
    subprocess.run(["scancel", "--full", "--signal=KILL", job_id], capture_output=True)
    subprocess.run(["scancel", job_id], capture_output=True)


def _kill_started_in(run_dir: Path) -> None:
    """KILL the processes whose command line names this test's run directory (DeepSpeed's launchers and ranks).

    On the test cluster a cancelled step's DeepSpeed launchers outlived the cancel (seen 30 s and more, holding the
    nodes in COMPLETING for the other tests); the run directory is this test's own temporary folder."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        if any(str(run_dir) in part for part in process.info["cmdline"] or []):
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()


def _wait(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {what} within {timeout_s} s")


def _events(path: Path, name: str) -> list[dict]:
    if not path.is_file():
        return []
    return [e for e in runs.parse_events(path.read_text()) if e["event"] == name]


@pytest.mark.slurm
def test_a_full_disk_ends_the_node_with_69_before_deepspeed(slurm_cluster, tmp_path):
    # The run directory on a 2 MB tmpfs, mounted in n1's mount namespace (the nodes' slurmds keep their mounts
    # private); this process reads it through /proc/<slurmd>/root. The quickstart checkpoint is 4.3 MB.
    pid = _slurmd_pid(slurm_cluster, "n1")
    run_dir = tmp_path / "small"
    run_dir.mkdir()
    seen = Path(f"/proc/{pid}/root{run_dir}")
    subprocess.run(["nsenter", "-t", str(pid), "-m", "mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(run_dir)])
    job_id = None
    try:
        _run_dir(seen, 1)
        job_id = _submit(tmp_path, run_dir, ["n1"])
        rc_file = tmp_path / "rc-n1"
        # Either the node's exit code, or DeepSpeed starting (a `launch` event): the check did not stop it.
        _wait(
            lambda: (rc_file.is_file() and rc_file.read_text().strip()) or _events(seen / facts.EVENTS_FILE, "launch"),
            300,
            "exit",
        )
        rc = rc_file.read_text().strip() if rc_file.is_file() else None
        (event,) = _events(seen / facts.EVENTS_FILE, "preflight")
        launches = _events(seen / facts.EVENTS_FILE, "launch")
    finally:
        if job_id:
            _cancel(job_id)
            _kill_started_in(run_dir)  # only when the check let DeepSpeed start
        subprocess.run(["nsenter", "-t", str(pid), "-m", "umount", "-l", str(run_dir)])
    assert rc == str(facts.EXIT_UNHEALTHY) and launches == []
    assert (event["ok"], event["failed"], event["host"], event["job_id"], event["restart"]) == (
        False,
        ["disk"],
        "n1",
        job_id,
        0,
    )
    disk = event["checks"]["disk"]
    assert disk["free_bytes"] <= 2 * 2**20 < disk["limit_bytes"] and not disk["ok"]
    assert all(check["ok"] for name, check in event["checks"].items() if name != "disk")
    output = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert "pre-flight check failed on n1: disk: " in output and "hint: free space there" in output
    assert "Traceback" not in output
    print(f"\npre-flight on one node: {event['seconds']} s")


def _address(namespace: str) -> str:
    out = subprocess.run(["ip", "-n", namespace, "-4", "-o", "addr", "show", "dev", "eth0"], capture_output=True)
    return re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out.stdout.decode()).group(1)


@pytest.mark.slurm
def test_a_node_that_cannot_reach_the_first_fails_network_within_seconds(slurm_cluster, tmp_path):
    # Both nodes wait for `go` after their step has started: the route would also cut srun's own connections.
    run_dir = _run_dir(tmp_path / "run", 2)
    job_id = _submit(
        tmp_path,
        run_dir,
        ["n1", "n2"],
        f"touch {tmp_path}/ready-$SLURMD_NODENAME; while [ ! -e {tmp_path}/go ]; do sleep 0.1; done;",
    )
    route = ["ip", "-n", "hpcds-n2", "route", "add", "blackhole", f"{_address('hpcds-n1')}/32"]
    try:
        _wait(lambda: (tmp_path / "ready-n1").exists() and (tmp_path / "ready-n2").exists(), 300, "step start")
        subprocess.run(route, check=True)
        started = time.monotonic()
        (tmp_path / "go").touch()
        events = _wait(
            lambda: (
                len(_events(run_dir / facts.EVENTS_FILE, "preflight")) == 2
                and _events(run_dir / facts.EVENTS_FILE, "preflight")
            ),
            60,
            "preflight events",
        )
        took_s = time.monotonic() - started
    finally:
        subprocess.run([*route[:4], "del", *route[5:]], capture_output=True)
        _cancel(job_id)
        _kill_started_in(run_dir)  # only when the check let DeepSpeed start
    by_host = {e["host"]: e for e in events}
    assert set(by_host) == {"n1", "n2"}
    for event in events:
        assert not event["ok"] and event["failed"] == ["network"], event
        assert event["checks"]["network"]["allreduce_gbps"] is None
    assert "Timed out" in by_host["n1"]["checks"]["network"]["error"]
    assert _events(run_dir / facts.EVENTS_FILE, "launch") == []
    assert took_s < 30
    print(
        f"\nunreachable first node: both verdicts {took_s:.1f} s after go; "
        f"seconds n1 {by_host['n1']['seconds']} n2 {by_host['n2']['seconds']}"
    )


@pytest.mark.slurm
def test_healthy_nodes_log_ok_with_the_bandwidth_and_go_on_to_deepspeed(slurm_cluster, tmp_path):
    run_dir = _run_dir(tmp_path / "run", 2)
    job_id = _submit(tmp_path, run_dir, ["n1", "n2"], record_rc=False)
    try:
        _wait(lambda: len(_events(run_dir / facts.EVENTS_FILE, "launch")) == 2, 300, "launch events")
    finally:
        _cancel(job_id)
        _kill_started_in(run_dir)
    events = _events(run_dir / facts.EVENTS_FILE, "preflight")
    assert sorted(e["host"] for e in events) == ["n1", "n2"]
    for event in events:
        assert event["ok"] and event["failed"] == [] and event["job_id"] == job_id, event
        checks = event["checks"]
        assert set(checks) == {"writable", "disk", "memory", "shm", "network"}
        assert checks["disk"]["free_bytes"] >= checks["disk"]["limit_bytes"] > 4 * 10**6
        assert checks["memory"]["available_bytes"] >= checks["memory"]["limit_bytes"] > 0
        assert checks["network"]["allreduce_gbps"] > 0 and checks["network"]["seconds"] < 10
    print(
        "\nhealthy pre-flight: "
        + ", ".join(
            f"{e['host']} {e['seconds']} s "
            f"({e['checks']['network']['seconds']} s network, {e['checks']['network']['allreduce_gbps']} Gb/s)"
            for e in events
        )
    )
