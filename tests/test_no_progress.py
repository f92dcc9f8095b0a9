"""No progress, no loop: a job whose allocations keep ending without a checkpoint beyond the newest step before them
stops after slurm.max_no_progress of them in a row (ending `no_progress`), whatever the other caps allow.

The rendered batch script is run twice over: by bash alone, with stand-ins for srun and scontrol on PATH, for the
event logs Slurm cannot be made to produce on demand (a job Slurm itself requeued, other jobs of the run, a rewind);
and under the real test cluster, where a launch that asks for a requeue every time is requeued once and then stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from hpcds.render import render_sbatch
from hpcds.slurm.status import history_lines, job_history, state_from_events
from hpcds.spec import load_spec

STAND_IN = """#!/bin/bash
echo "$(basename "$0") $*" >>"$CALLS"
[ "$(basename "$0")" = srun ] && exit "$SRUN_RC"
exit 0
"""


def spec(max_no_progress: int = 2):
    return load_spec(
        None,
        [f"slurm.max_no_progress={max_no_progress}", "slurm.max_requeues=5"],
        {"nodes": 1, "gpus_per_node": 0, "time": "00:05:00"},
        preset="quickstart",
    )


def started(job: str, restart: int) -> dict:
    return {"time": restart, "event": "started", "job_id": job, "restart": restart}


def checkpoint(step: int) -> dict:
    return {"time": step, "event": "checkpoint", "step": step, "bytes": 1, "seconds": 0.1}


def run_script(tmp_path: Path, log: list[dict], srun_rc: int = 0, restart: int = 3):
    """The rendered script run by bash as job 42 on its `restart`-th start, after `log`: (exit code, new events,
    the stand-ins' calls)."""
    run_dir, bin_dir = tmp_path / "run", tmp_path / "bin"
    run_dir.mkdir()
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "squeue", "scancel"):
        (bin_dir / name).write_text(STAND_IN)
        (bin_dir / name).chmod(0o755)
    events = run_dir / "events.jsonl"
    events.write_text("".join(json.dumps(e) + "\n" for e in log))
    script = run_dir / "job.sbatch"
    script.write_text(render_sbatch(spec(), str(run_dir), ["hpcds"]))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(tmp_path / "calls"),
        "SRUN_RC": str(srun_rc),
        "SLURM_JOB_ID": "42",
        "SLURM_RESTART_COUNT": str(restart),
        "SLURM_JOB_NODELIST": "n1",
        "HPCDS_HANG_LIMIT_S": "0",
    }
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    new = [json.loads(line) for line in events.read_text().splitlines()[len(log) :]]
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return done.returncode, new, calls


def test_a_job_slurm_requeued_twice_without_progress_stops_at_its_next_start(tmp_path):
    log = [started("42", 0), checkpoint(5), started("42", 1), started("42", 2)]
    code, new, calls = run_script(tmp_path, log)
    assert code == 1 and calls == []  # nothing launched
    assert [(e["event"], e.get("class"), e.get("reason")) for e in new] == [
        ("started", None, None),
        ("exited", "no_progress", None),
        ("not_requeued", None, "no_progress"),
    ]
    assert (new[2]["allocations"], new[2]["max_no_progress"]) == (2, 2)


@pytest.mark.parametrize(
    "log",
    [
        # the newest allocation saved beyond step 5
        [started("42", 0), started("42", 1), checkpoint(5), started("42", 2), checkpoint(8)],
        # other jobs of the run (a resubmission) do not count against this one
        [started("41", 0), started("41", 1), started("41", 2), started("42", 0)],
    ],
    ids=["progress-in-the-newest", "other-jobs"],
)
def test_allocations_with_progress_or_of_other_jobs_do_not_count(tmp_path, log):
    code, new, calls = run_script(tmp_path, log)
    assert code == 0 and [c.split()[0] for c in calls] == ["srun"]
    assert [(e["event"], e.get("class")) for e in new] == [("started", None), ("exited", "finished")]


def test_a_requeue_that_ends_the_second_allocation_without_progress_is_not_made(tmp_path):
    # Allocation 0 saved step 10; allocation 1 rewound (a newer checkpoint failed its checks) and saved only step 8;
    # this one, the third, asks for a requeue without saving: two in a row without a step beyond 10.
    log = [started("42", 0), checkpoint(10), started("42", 1), checkpoint(8)]
    code, new, calls = run_script(tmp_path, log, srun_rc=75, restart=2)
    assert code == 75 and [c.split()[0] for c in calls] == ["srun"]  # no scontrol requeue
    assert [(e["event"], e.get("class"), e.get("reason")) for e in new] == [
        ("started", None, None),
        ("exited", "no_progress", None),
        ("not_requeued", None, "no_progress"),
    ]


def test_a_requeue_after_one_allocation_without_progress_is_made(tmp_path):
    log = [started("42", 0), checkpoint(10)]
    code, new, calls = run_script(tmp_path, log, srun_rc=75, restart=1)
    assert code == 75 and [c.split()[:2] for c in calls] == [["srun", "--ntasks-per-node=1"], ["scontrol", "requeue"]]
    assert [(e["event"], e.get("class")) for e in new] == [("started", None), ("exited", "requeued"), ("requeue", None)]


# ---------------------------------------------------------------------------------------------------------------------
# The real thing

ALWAYS_REQUEUE = """#!/bin/bash
# Stands in for `hpcds launch RUN_DIR`: every start asks for a requeue the way the trainer does (`stopped`, exit 75)
# without ever committing a checkpoint.
printf '{"time": 0, "event": "stopped", "step": 0}\\n' >>"$2/events.jsonl"
exit 75
"""


@pytest.mark.slurm
def test_real_slurm_stops_a_job_that_requeues_without_progress(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "events.jsonl").touch()
    fake = tmp_path / "fake-hpcds"
    fake.write_text(ALWAYS_REQUEUE)
    fake.chmod(0o755)
    script = run_dir / "job.sbatch"
    script.write_text(render_sbatch(spec(max_no_progress=2), str(run_dir), [str(fake)]))
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 120
        events = []
        while time.monotonic() < deadline:
            events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
            if any(e["event"] == "not_requeued" for e in events):
                break
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    ours = [(e["event"], e.get("restart"), e.get("class")) for e in events if e["event"] != "stopped"]
    assert ours == [
        ("started", 0, None),
        ("exited", 0, "requeued"),
        ("requeue", 0, None),
        ("started", 1, None),
        ("exited", 1, "no_progress"),
        ("not_requeued", 1, None),
    ]
    assert state_from_events(job_id, events)[:2] == ("FAILED", "no progress in 2 allocations in a row")
    assert history_lines(job_history(job_id, events))[1].endswith("no_progress (exit 75)")
