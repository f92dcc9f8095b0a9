"""Benchmark `hpcds status` over many run directories against the real squeue.

Creates N synthetic run directories (default 10,000: meta, an event log, progress and a heartbeat, in the layouts
hpcds writes; most jobs finished long ago, a few point at real jobs this script submits), then times status refreshes
and counts the Slurm commands each one runs. Goals: at most 2 Slurm calls per refresh, at most 1 s of wall time.

    eval "$(scripts/local-slurm env)"; python bench/bench_status.py [--runs 10000] [--refreshes 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpcds import facts, runs, slurm
from hpcds.cli.jobs_cmd import StatusSource

NOW = time.time()


def write_run(root: Path, index: int, live_job_ids: list[str], rng: random.Random) -> None:
    name = f"bench-{index:05d}"
    run_dir = root / name
    run_dir.mkdir()
    live = index % 1000 == 0 and live_job_ids
    job_id = live_job_ids[index // 1000 % len(live_job_ids)] if live else str(100000 + index)
    meta = {"name": name, "created": NOW - 3600, "job_ids": [job_id], "wandb_id": f"w{index:07d}"}
    (run_dir / facts.META_FILE).write_text(json.dumps(meta))
    started = NOW - rng.uniform(600, 86400)
    events = [
        {"time": started - 5, "event": "created"},
        {"time": started - 4, "event": "submitted", "job_id": job_id},
        {"time": started, "event": "started", "job_id": job_id, "restart": 0, "nodes": "n[1-2]"},
        {"time": started + 1, "event": "launch", "job_id": job_id, "host": "n1", "node_rank": 0},
    ]
    if not live:
        rc = rng.choice([0, 0, 0, 3, 75])
        events.append({"time": started + 500, "event": "exited", "job_id": job_id, "rc": rc, "terminated": 0})
        if rc == 75:
            events.append({"time": started + 500, "event": "requeue", "job_id": job_id})
    (run_dir / facts.EVENTS_FILE).write_text("".join(json.dumps(e) + "\n" for e in events))
    step = rng.randrange(1, 1000)
    progress = {"step": step, "max_steps": 1000, "loss": 2.5, "tokens_per_s": 12000.0, "world_size": 16}
    progress |= {"last_checkpoint_step": step - step % 50, "last_checkpoint_time": started + 400, "time": started + 499}
    progress |= {"wandb_id": meta["wandb_id"], "wandb_url": None, "wandb_dir": None}
    (run_dir / facts.PROGRESS_FILE).write_text(json.dumps(progress))
    (run_dir / facts.HEARTBEAT_DIR).mkdir()
    (run_dir / facts.HEARTBEAT_DIR / "n1.json").write_text(json.dumps({"time": started + 499, "step": step}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--refreshes", type=int, default=5)
    parser.add_argument("--live-jobs", type=int, default=2, help="real jobs submitted for some runs to point at")
    args = parser.parse_args()

    if not slurm.configured():
        print('no Slurm here: run `scripts/local-slurm up` and `eval "$(scripts/local-slurm env)"`', file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="hpcds-bench-status-"))
    live_job_ids = [
        slurm.parse_sbatch_parsable(
            slurm.run(["sbatch", "--parsable", "-J", "bench", "--wrap=sleep 120", "-o", "/dev/null"])
        )
        for _ in range(args.live_jobs)
    ]
    try:
        rng = random.Random(0)
        start = time.perf_counter()
        for index in range(args.runs):
            write_run(root, index, live_job_ids, rng)
        print(f"created {args.runs} run directories in {time.perf_counter() - start:.1f} s under {root}")

        source = StatusSource()
        walls, cpus, calls = [], [], []
        for _ in range(args.refreshes):
            before = sum(slurm.CALLS.values())
            start, start_cpu = time.perf_counter(), time.process_time()
            rows = source.rows(runs.list_runs(root))
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - start_cpu)
            calls.append(sum(slurm.CALLS.values()) - before)
        states = {}
        for row in rows:
            states[row.state] = states.get(row.state, 0) + 1
        print(f"states: {dict(sorted(states.items()))}")
        print(
            f"in-process refresh of {len(rows)} runs: Slurm calls per refresh {max(calls)} (goal <= 2), "
            f"wall median {statistics.median(walls):.3f} s, max {max(walls):.3f} s (goal <= 1 s), "
            f"CPU median {statistics.median(cpus):.3f} s; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )

        env = {**os.environ, "HPCDS_RUNS_DIR": str(root)}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "hpcds", "status", "--json"], capture_output=True, env=env)
        cli_s = time.perf_counter() - start
        listed = len(json.loads(done.stdout)) if done.returncode == 0 else f"failed: {done.stderr[-300:]}"
        print(f"`hpcds status --json` end to end (interpreter start included): {cli_s:.2f} s for {listed} runs")
        ok = max(calls) <= 2 and statistics.median(walls) <= 1.0
        print("goals met" if ok else "goals NOT met")
        return 0 if ok else 1
    finally:
        for job_id in live_job_ids:
            subprocess.run(["scancel", job_id], check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
