"""Bad nodes are excluded on requeue: the batch script leaves out the node a failure, a hang or a failed pre-flight
check points at (scontrol requeuehold, update ExcNodeList, release), never leaving the partition short of nodes.

The rendered script runs under bash with stand-ins for srun, scontrol and sinfo for the evidence Slurm cannot be made
to produce on demand (each kind of evidence, a merge with the job's own exclusions, a partition that would run out);
and under the real test cluster, a 1-node quickstart whose trainer fails on n2 only is requeued without n2, runs on n1
and finishes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcds import facts, runs, slurm
from hpcds.render import render_sbatch
from hpcds.slurm.status import history_lines, job_history, node_failures, nodes_to_avoid
from hpcds.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]

STAND_IN = """#!/bin/bash
echo "$(basename "$0") $*" >>"$CALLS"
case "$(basename "$0") $1 $2" in
  "srun "*)
    [ -n "$SRUN_EVENTS" ] && printf '%s\\n' "$SRUN_EVENTS" >>"$RUN_DIR/events.jsonl"
    sleep "${SRUN_SLEEP_S:-0}"
    exit "$SRUN_RC" ;;
  "scontrol show job") echo "   ReqNodeList=${REQUIRED:-(null)} ExcNodeList=${EXCLUDED:-(null)}" ;;
  "scontrol show hostnames") case $3 in "n[1-2]") printf 'n1\\nn2\\n' ;; *) tr , '\\n' <<<"$3" ;; esac ;;
  "sinfo "*) printf '%s\\n' $PARTITION_NODES ;;
esac
exit 0
"""


def spec(*sets: str):
    return load_spec(None, ["slurm.max_requeues=5", *sets], {"nodes": 1, "gpus_per_node": 0}, preset="quickstart")


def line(event: str, **fields) -> str:
    return json.dumps({"time": 1, "event": event, **fields})


def run_script(tmp_path: Path, srun_events: list[str], srun_rc: int, *sets: str, beats=None, **env_extra: str):
    """The rendered script run by bash as job 42 (restart 0), with `beats` ({host: (job id, step)}) as the nodes'
    heartbeats: (exit code, its events, the stand-ins' calls, the run directory)."""
    run_dir, bin_dir = tmp_path / "run", tmp_path / "bin"
    (run_dir / facts.HEARTBEAT_DIR).mkdir(parents=True)
    bin_dir.mkdir()
    for host, (job, step) in (beats or {}).items():
        beat = {"time": 1, "step": step, "job_id": job, "restart": 0}
        (run_dir / facts.HEARTBEAT_DIR / f"{host}.json").write_text(json.dumps(beat))
    for name in ("srun", "scontrol", "sinfo", "squeue", "scancel"):
        (bin_dir / name).write_text(STAND_IN)
        (bin_dir / name).chmod(0o755)
    (run_dir / "events.jsonl").touch()
    script = run_dir / "job.sbatch"
    script.write_text(render_sbatch(spec(*sets), str(run_dir), ["hpcds"]))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(tmp_path / "calls"),
        "RUN_DIR": str(run_dir),
        "SRUN_EVENTS": "\n".join(srun_events),
        "SRUN_RC": str(srun_rc),
        "PARTITION_NODES": "n1 n2 n3",
        "SLURM_JOB_ID": "42",
        "SLURM_RESTART_COUNT": "0",
        "SLURM_JOB_NODELIST": "n2",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_PARTITION": "debug",
        "HPCDS_HANG_LIMIT_S": "0",
        **env_extra,
    }
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    events = runs.read_events(run_dir)
    calls = (tmp_path / "calls").read_text().splitlines()
    return done.returncode, events, calls, run_dir


def scontrol_changes(calls: list[str]) -> list[str]:
    return [c for c in calls if c.split()[:2] != ["scontrol", "show"] and c.startswith("scontrol")]


ERROR_ON_N2 = [line("checkpoint", step=4), line("error", message="RuntimeError: boom", rank="0", host="n2")]


def test_a_failure_after_progress_is_requeued_without_the_node_of_the_first_error(tmp_path):
    code, events, calls, run_dir = run_script(tmp_path, ERROR_ON_N2, 1)
    assert code == 1
    assert [(e["event"], e.get("host"), e.get("reason")) for e in events if e["event"] == "node_excluded"] == [
        ("node_excluded", "n2", "failed")
    ]
    assert scontrol_changes(calls) == [
        "scontrol requeuehold 42",
        "scontrol update JobId=42 ExcNodeList=n2",
        "scontrol release 42",
    ]
    (record,) = runs.read_bad_nodes(run_dir)
    assert (record["host"], record["reason"], record["job_id"], record["restart"]) == ("n2", "failed", "42", 0)


def test_the_jobs_own_exclusions_are_kept(tmp_path):
    _, _, calls, _ = run_script(tmp_path, ERROR_ON_N2, 1, EXCLUDED="n3")
    assert "scontrol update JobId=42 ExcNodeList=n2,n3" in calls


def test_a_node_the_job_asks_for_by_name_is_not_excluded(tmp_path):
    code, events, calls, _ = run_script(tmp_path, ERROR_ON_N2, 1, REQUIRED="n[1-2]")
    assert code == 1 and scontrol_changes(calls) == ["scontrol requeue 42"]
    assert [(e["event"], e["host"]) for e in events if "host" in e and e["event"] != "error"] == [
        ("exclusion_skipped", "n2")
    ]


def test_an_exclusion_that_would_leave_the_partition_short_ends_the_job_instead(tmp_path):
    code, events, calls, _ = run_script(tmp_path, ERROR_ON_N2, 1, PARTITION_NODES="n2")
    assert code == 1 and scontrol_changes(calls) == []
    (refused,) = [e for e in events if e["event"] == "not_requeued"]
    assert (refused["reason"], refused["excluded"], refused["nodes_left"]) == ("too_many_excluded", "n2", 0)


def test_a_node_that_failed_its_preflight_check_is_excluded_before_any_progress(tmp_path):
    # srun reports the other node's kill, not 69: the preflight event of this allocation decides the class.
    unhealthy = line("preflight", job_id="42", restart=0, host="n1", ok=False, failed=["disk"], checks={}, seconds=0.1)
    healthy = line("preflight", job_id="42", restart=0, host="n2", ok=True, failed=[], checks={}, seconds=0.1)
    code, events, calls, _ = run_script(tmp_path, [healthy, unhealthy], 137, "slurm.max_failure_requeues=2")
    assert code == 137
    assert [e["class"] for e in events if e["event"] == "exited"] == ["node_unhealthy"]
    assert [e["host"] for e in events if e["event"] == "node_excluded"] == ["n1"]
    assert "scontrol update JobId=42 ExcNodeList=n1" in calls


def test_a_hang_excludes_the_node_whose_heartbeat_fell_behind(tmp_path):
    # n2 beat last at step 8, n1 at step 10; n3's beat is another job's. The watchdog (limit 1 s, a look every 5 s)
    # finds the step stalled while srun's stand-in sleeps.
    beats = {"n1": ("42", 10), "n2": ("42", 8), "n3": ("41", 2)}
    env = {"SLURM_JOB_NODELIST": "n1,n2", "HPCDS_HANG_LIMIT_S": "1", "SRUN_SLEEP_S": "7"}
    _, events, _, _ = run_script(tmp_path, [], 137, beats=beats, **env)
    (hung,) = [e for e in events if e["event"] == "hung"]
    assert hung["host"] == "n2"
    assert [e["class"] for e in events if e["event"] == "exited"] == ["hung"]
    assert [e["host"] for e in events if e["event"] == "node_excluded"] == ["n2"]


def test_exclusion_can_be_turned_off(tmp_path):
    _, events, calls, _ = run_script(tmp_path, ERROR_ON_N2, 1, "slurm.exclude_bad_nodes=false")
    assert scontrol_changes(calls) == ["scontrol requeue 42"]
    assert not [e for e in events if e["event"] == "node_excluded"]


def test_node_failures_and_nodes_to_avoid():
    records = {
        "a-1": [{"time": 10, "host": "n2", "reason": "failed"}, {"time": 20, "host": "n3", "reason": "hung"}],
        "a-2": [{"time": 30, "host": "n2", "reason": "node_unhealthy"}],
    }
    assert node_failures(records) == [
        {"node": "n2", "failures": 2, "runs": ["a-1", "a-2"], "last_time": 30.0, "last_reason": "node_unhealthy"},
        {"node": "n3", "failures": 1, "runs": ["a-1"], "last_time": 20.0, "last_reason": "hung"},
    ]
    assert nodes_to_avoid(records["a-1"] + records["a-2"], now=100, memory_s=75) == ["n2"]  # n3's was 80 s ago


# ---------------------------------------------------------------------------------------------------------------------
# The real thing


def hpcds(runs_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HPCDS_RUNS_DIR": str(runs_root)}
    return subprocess.run([sys.executable, "-m", "hpcds", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slurm
def test_a_run_failing_on_n2_is_requeued_without_it_and_finishes_on_n1(slurm_cluster, tmp_path):
    runs_root = tmp_path / "runs"
    # The quickstart cut short, failing on n2 only: rank 0 raises at its 3rd step boundary there, after step_2 is saved.
    sets = ["training.max_steps=4", "training.warmup_steps=1", "checkpoint.every_steps=2"]
    sets += [
        "training.eval_interval_steps=0",
        "slurm.ranks_per_node=1",
        "slurm.env={HPCDS_TEST_FAULT: raise_after:3@n2}",
    ]
    args = [a for s in sets for a in ("--set", s)]
    # n1 is held whole (--exclusive: a 1-CPU blocker leaves room beside it) when the run is submitted, so its first
    # allocation lands on n2.
    hold_n1 = ["sbatch", "--parsable", "--exclusive", "-w", "n1", "-J", "hpcds-test-blocker", "-o", "/dev/null"]
    blocker = slurm.parse_sbatch_parsable(slurm.run([*hold_n1, "--wrap=sleep 300"]))
    job_id = None
    try:
        deadline = time.monotonic() + 60
        while slurm.run(["squeue", "-h", "-j", blocker, "-o", "%T"]).strip() != "RUNNING":
            assert time.monotonic() < deadline, "the blocker never ran on n1"
            time.sleep(0.5)
        done = hpcds(runs_root, "submit", str(ROOT / "configs/quickstart.yaml"), *args, "--json")
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        run_dir, job_id = Path(result["run_dir"]), result["job_id"]
        deadline = time.monotonic() + 60
        while not [e for e in runs.read_events(run_dir) if e["event"] == "started"]:
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.5)
        slurm.scancel(blocker)
        deadline = time.monotonic() + 240
        while not [e for e in runs.read_events(run_dir) if e["event"] == "exited" and e.get("class") == "finished"]:
            ended = [e for e in runs.read_events(run_dir) if e["event"] in ("not_requeued", "requeue_limit")]
            assert not ended and time.monotonic() < deadline, runs.read_events(run_dir)
            time.sleep(1)
    finally:
        slurm.scancel(blocker)
        if job_id:
            subprocess.run(["scancel", job_id], capture_output=True)
    events = runs.read_events(run_dir)
    started = [e["nodes"] for e in events if e["event"] == "started"]
    assert started == ["n2", "n1"]
    (error,) = [e for e in events if e["event"] == "error"]
    assert error["host"] == "n2" and "raise_after:3" in error["message"]
    (excluded,) = [e for e in events if e["event"] == "node_excluded"]
    assert (excluded["host"], excluded["reason"], excluded["restart"]) == ("n2", "failed", 0)
    assert [e["step"] for e in events if e["event"] == "finished"] == [4]
    assert [r["host"] for r in runs.read_bad_nodes(run_dir)] == ["n2"]
    history = history_lines(job_history(job_id, events))
    assert "failed (exit 1), requeued without n2" in history[0], history
    status = json.loads(hpcds(runs_root, "status", run_dir.name, "--json").stdout)[0]
    assert status["excluded_nodes"] == ["n2"]
    nodes = json.loads(hpcds(runs_root, "status", "--nodes", "--json").stdout)
    assert [(n["node"], n["failures"]) for n in nodes] == [("n2", 1)]


SUBMIT_QUICKSTART = [sys.executable, "-m", "hpcds", "submit", str(ROOT / "configs/quickstart.yaml")]


def test_submit_leaves_out_the_nodes_earlier_runs_of_the_spec_excluded(tmp_path):
    """A stand-in sbatch records its command line: the spec's own --exclude and the recently bad node both reach it;
    an old record and another spec's run do not."""
    runs_root, bin_dir = tmp_path / "runs", tmp_path / "bin"
    now = time.time()
    earlier = [("quickstart-20260101-000000", "n2", 60), ("quickstart-20250101-000000", "n5", 30 * 86400)]
    for name, host, age_s in [*earlier, ("other-20260101-000000", "n4", 60)]:
        (runs_root / name).mkdir(parents=True)
        (runs_root / name / facts.META_FILE).write_text("{}")
        record = {"time": now - age_s, "event": "node_excluded", "host": host, "reason": "failed"}
        (runs_root / name / facts.BAD_NODES_FILE).write_text(json.dumps(record) + "\n")
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$*" >{tmp_path}/sbatch-args\necho 123\n')
    (bin_dir / "sbatch").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HPCDS_RUNS_DIR": str(runs_root)}
    done = subprocess.run(
        [*SUBMIT_QUICKSTART, "--json", "--set", 'slurm.extra_sbatch=["--exclude=n3"]'],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "leaving out n2: excluded by earlier runs of quickstart within 7 days" in done.stderr
    assert (tmp_path / "sbatch-args").read_text().split()[:2] == ["--parsable", "--exclude=n3,n2"]
    (submitted,) = [e for e in runs.read_events(Path(json.loads(done.stdout)["run_dir"])) if e["event"] == "submitted"]
    assert submitted["exclude"] == ["n3", "n2"]
