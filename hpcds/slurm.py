"""Slurm's command-line tools: the only module that runs sbatch, squeue, scontrol, sacct and scancel.

Each adapter is one subprocess call; its text goes through a pure `parse_*` function (tested on output captured from a
real Slurm 22.05). A command that is missing or fails raises `CommandError` with the command line and Slurm's stderr.
`squeue_all` asks once for every job the controller still knows, whatever the number of runs: callers filter in
Python, so `hpcds status` costs one call per refresh. `CALLS` counts calls per command (the status benchmark reads it).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from hpcds.errors import CommandError

CALLS: collections.Counter[str] = collections.Counter()

# squeue -O fields, each followed by '|' (a field with a suffix and no width is printed whole; without one it is cut
# to 20 characters). Name is last so a '|' in a job name cannot shift the other columns.
SQUEUE_FIELDS = ("JobID", "State", "Reason", "NodeList", "NumNodes", "TimeUsed", "TimeLimit", "RestartCnt")
SQUEUE_FIELDS += ("Partition", "StartTime", "Name")
SQUEUE_FORMAT = ",".join(f"{field}:|" for field in SQUEUE_FIELDS)
SACCT_FIELDS = ("JobID", "State", "ExitCode", "Start", "End", "NodeList", "Elapsed")
NO_SLURM_HINT = (
    "run this on a machine with Slurm's client tools (a login node), or start the project's test cluster with "
    '`scripts/local-slurm up` and `eval "$(scripts/local-slurm env)"`'
)


@dataclass(frozen=True)
class JobState:
    """One job as squeue reports it. Times in seconds; None where Slurm prints N/A, UNLIMITED or INVALID."""

    job_id: str
    state: str
    reason: str
    nodelist: str
    num_nodes: int | None
    elapsed_s: int | None
    time_limit_s: int | None
    restarts: int
    partition: str
    start_time: str | None
    name: str

    def to_dict(self) -> dict:
        return asdict(self)


def parse_duration_s(text: str) -> int | None:
    """Slurm durations: `M:SS`, `H:MM:SS`, `D-HH:MM:SS`, `D-HH`, plain minutes; None for UNLIMITED/N/A/INVALID."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "N/A", "INVALID", "NONE", "PARTITION_LIMIT"):
        return None
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
        parts = [int(p) for p in text.split(":")]
        parts += [0] * (3 - len(parts))  # D-HH and D-HH:MM
        hours, minutes, seconds = parts
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, (minutes, seconds) = 0, parts
        else:
            hours, minutes, seconds = parts
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _none_if_na(text: str) -> str | None:
    return None if text in ("", "N/A", "Unknown", "None") else text


def parse_squeue(text: str) -> list[JobState]:
    """Rows of `squeue --noheader --states=all -O SQUEUE_FORMAT`. No I/O here."""
    jobs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        cells = line.rstrip("\n").removesuffix("|").split("|", len(SQUEUE_FIELDS) - 1)
        if len(cells) != len(SQUEUE_FIELDS):
            raise ValueError(f"unexpected squeue line (wanted {len(SQUEUE_FIELDS)} fields): {line!r}")
        row = dict(zip(SQUEUE_FIELDS, (c.strip() for c in cells), strict=True))
        jobs.append(
            JobState(
                job_id=row["JobID"],
                state=row["State"],
                reason=row["Reason"] if row["Reason"] != "None" else "",
                nodelist=row["NodeList"],
                num_nodes=int(row["NumNodes"]) if row["NumNodes"].isdigit() else None,
                elapsed_s=parse_duration_s(row["TimeUsed"]),
                time_limit_s=parse_duration_s(row["TimeLimit"]),
                restarts=int(row["RestartCnt"]) if row["RestartCnt"].isdigit() else 0,
                partition=row["Partition"],
                start_time=_none_if_na(row["StartTime"]),
                name=row["Name"],
            )
        )
    return jobs


def parse_sbatch_parsable(text: str) -> str:
    """`sbatch --parsable` prints `<jobid>` or `<jobid>;<cluster>`. No I/O here."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    job_id = lines[-1].split(";")[0] if lines else ""
    if not job_id.isdigit():
        raise ValueError(f"sbatch --parsable printed {text!r}, not a job id")
    return job_id


_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=")


def parse_scontrol_show_job(text: str) -> list[dict[str, str]]:
    """`scontrol show job -o`: one job per line of `Key=Value` pairs (values may hold spaces). No I/O here."""
    jobs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or "=" not in line:
            continue
        keys = list(_KEY.finditer(line))
        job: dict[str, str] = {}
        for match, following in zip(keys, [*keys[1:], None], strict=True):
            end = following.start() if following else len(line)
            job[match.group(1)] = line[match.end() : end].strip()
        jobs.append(job)
    return jobs


def parse_scontrol_show_config(text: str) -> dict[str, str]:
    """`scontrol show config`: `Key = Value` lines. No I/O here."""
    config = {}
    for line in text.splitlines():
        key, sep, value = line.partition(" = ")
        if sep and key.strip() and " " not in key.strip():
            config[key.strip()] = value.strip()
    return config


def accounting_enabled(config: dict[str, str]) -> bool:
    return config.get("AccountingStorageType", "accounting_storage/none") not in ("", "accounting_storage/none")


def parse_sacct(text: str) -> list[dict[str, str]]:
    """`sacct --noheader --parsable2 --format=SACCT_FIELDS`. No I/O here."""
    rows = []
    for line in text.splitlines():
        if line.strip():
            cells = line.split("|")
            rows.append(dict(zip(SACCT_FIELDS, cells + [""] * (len(SACCT_FIELDS) - len(cells)), strict=False)))
    return rows


def parse_exit_code(text: str) -> tuple[int | None, int | None]:
    """Slurm's `rc:signal` (`3:0`, `0:15`) as (rc, signal). No I/O here."""
    rc, _, sig = text.partition(":")
    return (int(rc) if rc.isdigit() else None, int(sig) if sig.isdigit() else None)


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


def sbatch(script: Path, *, cwd: Path) -> str:
    """Submit a batch script; returns the job id."""
    argv = ["sbatch", "--parsable", str(script)]
    out = run(argv, cwd=cwd)
    try:
        return parse_sbatch_parsable(out)
    except ValueError as exc:
        raise CommandError(argv, 0, str(exc)) from None


def squeue_all() -> list[JobState]:
    """Every job the controller still knows (pending, running and recently finished), in one call."""
    return parse_squeue(run(["squeue", "--noheader", "--states=all", "-O", SQUEUE_FORMAT]))


def show_job(job_id: str) -> dict[str, str] | None:
    """`scontrol show job -o`; None once the controller has purged the job."""
    argv = ["scontrol", "show", "job", "-o", str(job_id)]
    try:
        jobs = parse_scontrol_show_job(run(argv))
    except CommandError as exc:
        if "Invalid job id" in exc.stderr:
            return None
        raise
    return jobs[0] if jobs else None


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
