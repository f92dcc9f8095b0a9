"""Many writers on one run directory, and a controller that does not answer: what shared file systems and busy
clusters do to a job.

The event log is appended to by every node's launcher, the trainer and the batch shell at once. On a local file
system O_APPEND keeps lines whole anyway; on NFS each client computes the append offset from its cached file size, so
the writers take the log's flock (which NFS turns into server-side locks). These tests show that both kinds of writer
(Python's `runs.append_event`, the batch script's `hpcds_event`) wait for that lock, and that writers on both nodes
of the test cluster lose no line; NFS itself is not available here, so the lost-append failure is not reproduced.
"""

from __future__ import annotations

import fcntl
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from hpcds import facts, launch, runs
from hpcds.render import render_sbatch
from hpcds.spec import load_spec

JOB_SECONDS = "00:05:00"


def rendered_script(nodes: int = 1, hpcds_cmd: list[str] | None = None, run_dir: str = "/runs/r") -> str:
    spec = load_spec(
        None, ["slurm.max_requeues=2"], {"nodes": nodes, "gpus_per_node": 0, "time": JOB_SECONDS}, preset="quickstart"
    )
    return render_sbatch(spec, run_dir, hpcds_cmd or ["hpcds"])


def shell_function(script: str, name: str) -> str:
    """One function of the rendered batch script, as written there."""
    found = re.search(rf"^{name}\(\) {{\n.*?^}}\n", script, re.S | re.M)
    assert found, f"the batch script defines no {name}()"
    return found.group(0)


# ---------------------------------------------------------------------------------------------------------------------
# The event log's lock


def test_an_event_from_python_waits_for_the_log_lock(tmp_path):
    log = tmp_path / facts.EVENTS_FILE
    log.touch()
    with open(log, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        writer = threading.Thread(target=runs.append_event, args=(tmp_path, "probe"), kwargs={"n": 1})
        writer.start()
        time.sleep(0.5)
        assert log.read_text() == "", "append_event wrote while another writer held the log's lock"
        fcntl.flock(holder, fcntl.LOCK_UN)
        writer.join(timeout=5)
    assert [(e["event"], e["n"]) for e in runs.read_events(tmp_path)] == [("probe", 1)]


def test_an_event_from_the_batch_script_waits_for_the_log_lock(tmp_path):
    script = rendered_script()
    events = shell_function(script, "hpcds_event") + shell_function(script, "hpcds_event_to")
    program = events + f"RUN_DIR={tmp_path}\nhpcds_event probe n=1\n"
    log = tmp_path / facts.EVENTS_FILE
    log.touch()
    with open(log, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        writer = subprocess.Popen(["bash", "-c", program], env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "5"})
        time.sleep(0.5)
        assert log.read_text() == "", "hpcds_event wrote while another writer held the log's lock"
        fcntl.flock(holder, fcntl.LOCK_UN)
        assert writer.wait(timeout=15) == 0
    assert [(e["event"], e["n"], e["job_id"]) for e in runs.read_events(tmp_path)] == [("probe", 1, "5")]


def test_a_lock_that_is_never_released_delays_an_event_but_loses_none(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "EVENT_LOCK_WAIT_S", 0.2)
    (tmp_path / facts.EVENTS_FILE).touch()
    with open(tmp_path / facts.EVENTS_FILE, "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        runs.append_event(tmp_path, "probe")
    assert [e["event"] for e in runs.read_events(tmp_path)] == ["probe"]


# ---------------------------------------------------------------------------------------------------------------------
# The rendezvous port


def _free_pair() -> int:
    """A port P in the batch script's range with P and P + 1 both free here."""
    for port in range(facts.MASTER_PORT_LOW + 1000, facts.MASTER_PORT_LOW + 9000, 7):
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("", port))
                b.bind(("", port + 1))
            return port
        except OSError:
            continue
    pytest.fail("no two free ports next to each other")


def test_the_batch_script_picks_a_rendezvous_port_nobody_listens_on():
    # Another job's ranks already rendezvous on P on this (first) node: the port the old rule gave two jobs whose ids
    # differ by 10,000. Asked to choose in [P, P + 2), the script must take P + 1, every time.
    pick = shell_function(rendered_script(), "hpcds_free_port")
    port = _free_pair()
    with socket.socket() as busy:
        busy.bind(("", port))
        busy.listen()
        picks = subprocess.run(
            ["bash", "-c", pick + f"for i in $(seq 20); do hpcds_free_port {port} {port + 2}; done"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
    assert picks == [str(port + 1)] * 20


def test_every_node_launches_on_the_port_the_batch_script_picked():
    assert launch.rendezvous_port({facts.MASTER_PORT_ENV: "23456", "SLURM_JOB_ID": "10017"}) == 23456
    # A batch script rendered by an older hpcds sets none: the job-id rule it was written for still applies.
    assert launch.rendezvous_port({"SLURM_JOB_ID": "10017"}) == 29517
    script = rendered_script()
    assert (
        f"export {facts.MASTER_PORT_ENV}\n{facts.MASTER_PORT_ENV}=$(hpcds_free_port {facts.MASTER_PORT_LOW} " in script
    )
    assert script.index(f"{facts.MASTER_PORT_ENV}=$(") < script.index("\nsrun ")


# ---------------------------------------------------------------------------------------------------------------------
# On the project's two-node Slurm cluster

WRITERS = 3  # Python writers per node, beside one batch-script writer
EVENTS_EACH = 200

CONCURRENT_WRITERS = """#!/bin/bash
# Stands in for `hpcds launch RUN_DIR` on each node: Python writers and the batch script's own hpcds_event append to
# the run's event log at once, from every node.
RUN_DIR=$2
source <(sed -n '/^hpcds_event\\(_to\\)\\?() {/,/^}/p' "$RUN_DIR/job.sbatch")
for writer in $(seq 1 WRITERS); do
  PYTHON -c 'import sys
from hpcds import runs
for n in range(EVENTS_EACH):
    runs.append_event(sys.argv[1], "probe", host=sys.argv[2], writer=sys.argv[3], n=n)' \\
    "$RUN_DIR" "$(hostname)" "$writer" &
done
for n in $(seq 0 $((EVENTS_EACH - 1))); do hpcds_event probe host="$(hostname)" writer=bash n="$n"; done
wait
"""

REQUEUE_ONCE = """#!/bin/bash
# Stands in for `hpcds launch RUN_DIR`: asks for a requeue on the first start, as the trainer does after a save
# (`stopped`, then exit 75), and finishes on the second.
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
  printf '{"time": 0, "event": "stopped", "step": 1}\\n' >>"$2/events.jsonl"
  exit 75
fi
exit 0
"""

BUSY_CONTROLLER = """#!/bin/bash
# The real scontrol, except that the first two `scontrol requeue` fail as a controller that timed out would.
if [ "$1" = requeue ]; then
  count=$(cat "$HPCDS_SHIM_COUNT" 2>/dev/null || echo 0)
  echo $((count + 1)) >"$HPCDS_SHIM_COUNT"
  if [ "$count" -lt 2 ]; then
    echo "scontrol: error: Socket timed out on send/recv operation" >&2
    exit 1
  fi
fi
exec REAL "$@"
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _submit(run_dir: Path, script: str, env: dict[str, str] | None = None) -> str:
    import os

    (run_dir / facts.SCRIPT_FILE).write_text(script)
    (run_dir / facts.EVENTS_FILE).touch()
    done = subprocess.run(
        ["sbatch", "--parsable", str(run_dir / facts.SCRIPT_FILE)],
        cwd=run_dir,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def _wait_for_exits(run_dir: Path, count: int, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        events = runs.read_events(run_dir)
        if [e["event"] for e in events].count("exited") >= count:
            return events
        if time.monotonic() > deadline:
            pytest.fail(f"{count} exits not logged after {timeout_s} s: {[e['event'] for e in events]}")
        time.sleep(1)


@pytest.mark.slurm
def test_writers_on_both_nodes_at_once_lose_no_event_line(slurm_cluster, submitted, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fake = CONCURRENT_WRITERS.replace("PYTHON", sys.executable).replace("EVENTS_EACH", str(EVENTS_EACH))
    fake = _executable(tmp_path / "fake-hpcds", fake.replace("WRITERS", str(WRITERS)))
    submitted.append(_submit(run_dir, rendered_script(len(slurm_cluster.nodes), [str(fake)], str(run_dir))))
    events = _wait_for_exits(run_dir, 1, timeout_s=120)

    lines = (run_dir / facts.EVENTS_FILE).read_text().splitlines()
    assert all(json.loads(line) for line in lines), "a torn line in the event log"
    probes = Counter((e["host"], str(e["writer"]), e["n"]) for e in events if e["event"] == "probe")
    writers = [str(w) for w in range(1, WRITERS + 1)] + ["bash"]
    expected = Counter((host, w, n) for host in slurm_cluster.nodes for w in writers for n in range(EVENTS_EACH))
    assert probes == expected
    assert [e["class"] for e in events if e["event"] == "exited"] == ["finished"]


@pytest.mark.slurm
def test_a_requeue_the_controller_refuses_twice_is_retried(slurm_cluster, submitted, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shims = tmp_path / "bin"
    shims.mkdir()
    _executable(shims / "scontrol", BUSY_CONTROLLER.replace("REAL", shutil.which("scontrol")))
    fake = _executable(tmp_path / "fake-hpcds", REQUEUE_ONCE)
    env = {"PATH": f"{shims}:{__import__('os').environ['PATH']}", "HPCDS_SHIM_COUNT": str(tmp_path / "count")}
    env["HPCDS_REQUEUE_RETRY_S"] = "1"  # waits of 1 s and 2 s between the tries (2 s and 4 s in real use)
    job_id = _submit(run_dir, rendered_script(1, [str(fake)], str(run_dir)), env)
    submitted.append(job_id)
    events = _wait_for_exits(run_dir, 2, timeout_s=150)

    kinds = [e["event"] for e in events if e["event"] != "stopped"]
    assert kinds == ["started", "exited", "requeue", "requeue_retry", "requeue_retry", "started", "exited"], kinds
    retries = [e for e in events if e["event"] == "requeue_retry"]
    assert [(e["attempt"], e["rc"]) for e in retries] == [(1, 1), (2, 1)]
    assert [e["restart"] for e in events if e["event"] == "started"] == [0, 1]
    assert [e["class"] for e in events if e["event"] == "exited"] == ["requeued", "finished"]
    assert (tmp_path / "count").read_text().strip() == "3"
