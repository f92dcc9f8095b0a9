"""Benchmark `hpcds status` on a busy cluster: many run directories, and another user's jobs filling the queue.

Creates N synthetic run directories (default 10,000: meta, an event log, progress and a heartbeat, in the layouts
hpcds writes; most jobs finished long ago, a few point at held jobs this script submits), and queues M held jobs of
another user (default 10,000, as `nobody`). Then it times status refreshes, alternating between the command hpcds runs
(`squeue --me`: only this user's jobs) and the unfiltered command it ran before (`squeue` for every
user, filtered in Python), counting the Slurm commands each refresh runs and the squeue rows it reads. Goals for the
command hpcds runs: at most 1 Slurm call per refresh, at most 1 s of wall time.

The other user's jobs are separate jobs, each one job record and one squeue row. A held job array would not do:
slurmctld keeps the pending tasks of an array as one record, and squeue prints it as one row (`123_[0-9999]`; only
`squeue -r` prints a row per task); on Slurm 22.05 neither `scontrol update` nor `scontrol hold` of single pending
tasks splits them out. So the script runs one `sbatch --hold` per job as that user (~6 ms each on the local cluster),
all with one job name unique to this run, checks that squeue has a row for each, and at the end, also on failure,
Ctrl-C or TERM, cancels them by that name and user (`scancel --user U --name N`: only this run's jobs) and its own
jobs by id. The cluster must allow that many jobs (scripts/local-slurm sets MaxJobCount=50000; the default is 10,000).

    eval "$(scripts/local-slurm env)"; python bench/bench_status.py [--runs 10000] [--other-jobs 10000] [--refreshes 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpcds import facts, runs, slurm
from hpcds.cli.jobs_cmd import StatusSource
from hpcds.errors import CommandError

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


def squeue_every_user() -> list[slurm.JobState]:
    """The command `hpcds status` ran before `--me`: every user's jobs, the same columns, filtered by the caller."""
    return slurm.parse_squeue(slurm.run(["squeue", "--noheader", "--states=all", "-O", slurm.SQUEUE_FORMAT]))


def squeue_rows(user: str, job_name: str) -> int:
    """Rows squeue prints for the pending jobs of `user` named `job_name` (one per job record)."""
    argv = ["squeue", "--noheader", "--states=PD", "--user", user, "--name", job_name, "--format=%i"]
    return len(slurm.run(argv).splitlines())


def submit_other_users_jobs(user: str, count: int, job_name: str) -> None:
    """`count` held jobs of `user` named `job_name`, one job record (one squeue row) each."""
    sbatch = ["sbatch", "--parsable", "--hold", "-J", job_name, "-o", "/dev/null", "--chdir=/tmp", "--wrap=sleep 1"]
    argv = ["runuser", "-u", user, "--", "env", f"SLURM_CONF={os.environ.get('SLURM_CONF', '')}"]
    # xargs exits non-zero when any sbatch failed; their stderr tells why.
    argv += ["xargs", "-P", "4", "-n", "1", "sh", "-c", shlex.join(sbatch) + " >/dev/null"]
    done = subprocess.run(argv, input="".join(f"{i}\n" for i in range(count)), capture_output=True, text=True)
    if done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stderr[-2000:])


def refresh(source: StatusSource, root: Path, squeue) -> tuple[int, int, float, float]:
    """One refresh with `squeue` as its squeue call: Slurm calls, squeue rows read, squeue and refresh seconds."""
    rows_read, squeue_s = [], []

    def timed():
        start = time.perf_counter()
        jobs = squeue()
        squeue_s.append(time.perf_counter() - start)
        rows_read.append(len(jobs))
        return jobs

    slurm.squeue_mine = timed
    before = sum(slurm.CALLS.values())
    start = time.perf_counter()
    source.rows(runs.list_runs(root))
    wall_s = time.perf_counter() - start
    return sum(slurm.CALLS.values()) - before, sum(rows_read), sum(squeue_s), wall_s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--other-jobs", type=int, default=10_000, help="held jobs of another user in the queue")
    parser.add_argument("--other-user", default="nobody", help="the other user (the script runs as root)")
    parser.add_argument("--refreshes", type=int, default=5)
    parser.add_argument("--live-jobs", type=int, default=2, help="real jobs submitted for some runs to point at")
    args = parser.parse_args()

    if not slurm.configured():
        print('no Slurm here: run `scripts/local-slurm up` and `eval "$(scripts/local-slurm env)"`', file=sys.stderr)
        return 2
    if args.other_jobs and os.geteuid() != 0:
        print("queueing another user's jobs needs root (runuser); or pass --other-jobs 0", file=sys.stderr)
        return 2
    # A TERM (a CI timeout, a kill) must reach the cleanup below, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    root = Path(tempfile.mkdtemp(prefix="hpcds-bench-status-"))
    live_job_ids: list[str] = []
    # Unique to this run, so that the cleanup cancels this run's jobs of that user and no one else's.
    job_name = f"hpcds-bench-{os.getpid()}-{int(NOW)}"
    try:
        for _ in range(args.live_jobs):
            # Held: in the queue for as long as the bench runs, without taking CPUs from anyone's jobs.
            argv = ["sbatch", "--parsable", "--hold", "-J", "bench", "--wrap=sleep 1", "-o", "/dev/null"]
            live_job_ids.append(slurm.parse_sbatch_parsable(slurm.run(argv)))
        rng = random.Random(0)
        start = time.perf_counter()
        for index in range(args.runs):
            write_run(root, index, live_job_ids, rng)
        print(f"created {args.runs} run directories in {time.perf_counter() - start:.1f} s under {root}")
        start = time.perf_counter()
        submit_other_users_jobs(args.other_user, args.other_jobs, job_name)
        theirs = squeue_rows(args.other_user, job_name)
        print(
            f"queued {args.other_jobs} held jobs of {args.other_user} in {time.perf_counter() - start:.1f} s: "
            f"squeue lists {theirs} of them, one row each"
        )
        if theirs < args.other_jobs:
            print(f"squeue shows {theirs} rows of {args.other_user}, expected {args.other_jobs}", file=sys.stderr)
            return 1

        commands = {"squeue --me (hpcds now)": slurm.squeue_mine, "squeue, every user (before)": squeue_every_user}
        source = StatusSource()
        source.rows(runs.list_runs(root))  # the first refresh also asks once whether there is accounting
        results: dict[str, list[tuple[int, int, float, float]]] = {name: [] for name in commands}
        try:
            for _ in range(args.refreshes):
                for name, squeue in commands.items():  # alternated, so both see the same load
                    results[name].append(refresh(source, root, squeue))
        finally:
            slurm.squeue_mine = commands["squeue --me (hpcds now)"]

        print(f"\nper refresh of {args.runs} runs, {theirs} jobs of {args.other_user} and {args.live_jobs} of ours")
        header = ("squeue call", "Slurm calls", "rows read", "squeue (median)", "refresh (median)")
        print("{:<28} {:>11} {:>10} {:>16} {:>17}".format(*header))
        summary = {}
        for name, samples in results.items():
            calls, rows = max(s[0] for s in samples), max(s[1] for s in samples)
            squeue_s, wall_s = statistics.median(s[2] for s in samples), statistics.median(s[3] for s in samples)
            summary[name] = (calls, rows, squeue_s, wall_s)
            print(f"{name:<28} {calls:>11} {rows:>10} {squeue_s:>15.3f}s {wall_s:>16.3f}s")
        now, before = summary.values()
        ratios = [before[i] / max(now[i], 1e-9) for i in range(4)]
        print("{:<28} {:>10.1f}x {:>9.0f}x {:>15.1f}x {:>16.2f}x".format("ratio before / now", *ratios))
        print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

        env = {**os.environ, "HPCDS_RUNS_DIR": str(root)}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "hpcds", "status", "--json"], capture_output=True, env=env)
        cli_s = time.perf_counter() - start
        listed = len(json.loads(done.stdout)) if done.returncode == 0 else f"failed: {done.stderr[-300:]}"
        print(f"`hpcds status --json` end to end (interpreter start included): {cli_s:.2f} s for {listed} runs")
        ok = now[0] <= 1 and now[3] <= 1.0
        print("goals met (<= 1 Slurm call, <= 1 s)" if ok else "goals NOT met (<= 1 Slurm call, <= 1 s)")
        return 0 if ok else 1
    finally:
        cancel(live_job_ids, args.other_user if args.other_jobs else None, job_name)
        shutil.rmtree(root, ignore_errors=True)


def cancel(job_ids: list[str], other_user: str | None, job_name: str) -> None:
    """Cancel our jobs by id and the other user's by this run's job name, until none of them is queued.

    Again and again: an sbatch still in flight when the bench was stopped may queue its job after the first scancel.
    """
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if other_user:
            subprocess.run(["scancel", "--user", other_user, "--name", job_name], check=False)
        if job_ids:
            subprocess.run(["scancel", *job_ids], check=False)
        left = subprocess.run(
            ["squeue", "--noheader", "--states=PD,R,CG,S", "--format=%i %j"], capture_output=True, text=True
        ).stdout.split("\n")
        if not [line for line in left if line.split(" ")[0] in job_ids or line.endswith(" " + job_name)]:
            return
        time.sleep(1)
    print(f"jobs of this run ({job_name}, {job_ids}) still queued after 120 s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
