"""Slurm's command-line tools: the only module that runs sbatch, squeue, scontrol, sacct and scancel.

Each adapter is one subprocess call; its text goes through a pure `parse_*` function (tested on output captured from a
real Slurm 22.05). A command that is missing or fails raises `CommandError` with the command line and Slurm's stderr.
`squeue_mine` asks once for every job of this user the controller still knows, whatever the number of runs: callers
filter in Python, so `hpcds status` costs one call per refresh, and other users' jobs (a busy cluster's thousands)
never cross the wire. `CALLS` counts calls per command (the status benchmark reads it).
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
from pathlib import Path

from hpcds.errors import CommandError
from hpcds.slurm.parse import (
    SACCT_FIELDS,
    SQUEUE_FORMAT,
    JobState,
    parse_sacct,
    parse_sbatch_parsable,
    parse_scontrol_show_config,
    parse_squeue,
)

CALLS: collections.Counter[str] = collections.Counter()
NO_SLURM_HINT = (
    "run this on a machine with Slurm's client tools (a login node), or start the project's test cluster with "
    '`scripts/local-slurm up` and `eval "$(scripts/local-slurm env)"`'
)


def run(argv: list[str], *, cwd: Path | None = None, timeout_s: float = 60) -> str:
    """Run one Slurm command and return its stdout; CommandError (command line + stderr + a hint) when it fails."""
    CALLS[argv[0]] += 1
    if shutil.which(argv[0]) is None:
        raise CommandError(argv, None, f"{argv[0]}: command not found", hint=NO_SLURM_HINT)
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise CommandError(argv, None, f"no answer after {timeout_s:.0f} s", hint="is slurmctld up?") from None
    except OSError as exc:
        raise CommandError(argv, None, str(exc), hint=NO_SLURM_HINT) from None
    if done.returncode != 0:
        hint = ""
        if "configuration source" in done.stderr or "Unknown host" in done.stderr:
            hint = "Slurm finds no slurm.conf: set SLURM_CONF. " + NO_SLURM_HINT
        elif "Unable to contact slurm controller" in done.stderr:
            hint = "slurmctld is not answering; check `scontrol ping`"
        raise CommandError(argv, done.returncode, done.stderr, hint=hint)
    return done.stdout


def sbatch(script: Path, *, cwd: Path, extra_args: list[str] = ()) -> str:
    """Submit a batch script; returns the job id. `extra_args` go before the script (they override its #SBATCH)."""
    argv = ["sbatch", "--parsable", *extra_args, str(script)]
    out = run(argv, cwd=cwd)
    try:
        return parse_sbatch_parsable(out)
    except ValueError as exc:
        raise CommandError(argv, 0, str(exc)) from None


def squeue_mine() -> list[JobState]:
    """Every job of this user the controller still knows (pending, running and recently finished), in one call."""
    return parse_squeue(run(["squeue", "--noheader", "--me", "--states=all", "-O", SQUEUE_FORMAT]))


def show_hostnames(nodelist: str) -> list[str]:
    """Expand a node list (`n[1-2]`) with Slurm's own rules."""
    return run(["scontrol", "show", "hostnames", nodelist]).split()


def show_config() -> dict[str, str]:
    return parse_scontrol_show_config(run(["scontrol", "show", "config"]))


def sacct(job_ids: list[str]) -> list[dict[str, str]]:
    """Accounting rows (allocations only) for finished jobs; only where accounting storage exists."""
    if not job_ids:
        return []
    argv = ["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", ",".join(job_ids)]
    return parse_sacct(run([*argv, "--format", ",".join(SACCT_FIELDS)]))


def scancel(job_id: str, *, signal: str | None = None) -> None:
    argv = ["scancel", *([f"--signal={signal}"] if signal else []), str(job_id)]
    run(argv)


def configured() -> bool:
    """Whether Slurm's client tools are here (a quick check before offering Slurm-only commands)."""
    return shutil.which("squeue") is not None and (
        bool(os.environ.get("SLURM_CONF")) or Path("/etc/slurm/slurm.conf").is_file()
    )
