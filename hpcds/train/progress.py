"""What the trainer tells people and `hpcds status`: the console line, `progress.json`, and per-node heartbeats.

Rank 0 rewrites `RUN_DIR/progress.json` atomically every log interval; local rank 0 of each node rewrites
`RUN_DIR/heartbeats/<hostname>.json`, so `hpcds status` can tell a slow node from a hung one. `PhaseTimer` breaks
start-up and saves into phases for the events. The formatting functions are pure; the two writers are thin.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from hpcds.durations import format_short_duration
from hpcds.facts import HEARTBEAT_DIR, PROGRESS_FILE
from hpcds.runs import write_json_atomic


def format_rate(tokens_per_s: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if tokens_per_s >= scale:
            return f"{tokens_per_s / scale:.1f}{unit}"
    return f"{tokens_per_s:.0f}"


def format_step_line(step: int, max_steps: int, loss: float, lr: float, tokens_per_s: float, step_time_s: float) -> str:
    """'step 50/200 | loss 2.3141 | lr 2.9e-03 | 12.3k tok/s | 0.21 s/step | ETA 31s'."""
    eta = format_short_duration((max_steps - step) * step_time_s)
    return (
        f"step {step}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | {format_rate(tokens_per_s)} tok/s | "
        f"{step_time_s:.2f} s/step | ETA {eta}"
    )


def render_banner(info: dict[str, Any]) -> str:
    """The startup banner: one 'key: value' line each, in the order given."""
    width = max(len(k) for k in info)
    return "\n".join(f"  {key.ljust(width)}  {value}" for key, value in info.items())


class PhaseTimer:
    """Seconds per named phase, each timed from the end of the one before (start-up and save breakdowns)."""

    def __init__(self) -> None:
        self.phases_s: dict[str, float] = {}
        self._mark = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.phases_s[name] = round(now - self._mark, 3)
        self._mark = now


def process_age_s() -> float:
    """Seconds since this process started. The kernel keeps the start in clock ticks since boot (field 22 of
    /proc/self/stat) and CLOCK_BOOTTIME counts from the same boot, so the difference is exact to a tick. psutil's
    create_time (used where there is no /proc) adds the boot time from /proc/stat cut to whole seconds, so it comes
    out up to a second early, and the age that much too long."""
    try:
        with open("/proc/self/stat") as handle:
            after_name = handle.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    except OSError:
        import psutil

        return time.time() - psutil.Process().create_time()
    return time.clock_gettime(time.CLOCK_BOOTTIME) - int(after_name[19]) / os.sysconf("SC_CLK_TCK")


def write_progress(run_dir: Path, **fields: Any) -> None:
    write_json_atomic(Path(run_dir) / PROGRESS_FILE, {**fields, "time": round(time.time(), 3)})


def write_heartbeat(run_dir: Path, step: int) -> None:
    """This node's beat, naming its allocation (job id and restart): after a requeue onto other nodes the files of the
    earlier nodes stay behind, and `hpcds status` must not count them."""
    folder = Path(run_dir) / HEARTBEAT_DIR
    folder.mkdir(exist_ok=True)
    beat: dict[str, Any] = {"time": round(time.time(), 3), "step": step}
    if os.environ.get("SLURM_JOB_ID"):
        beat |= {"job_id": os.environ["SLURM_JOB_ID"], "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}
    write_json_atomic(folder / f"{socket.gethostname()}.json", beat)
