"""Slurm's output as data: pure parsers for squeue, sbatch, scontrol and sacct text, tested on output captured from
a real Slurm 22.05. No I/O here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hpcds.durations import parse_slurm_time_s

# squeue -O fields, each followed by '|' (a field with a suffix and no width is printed whole; without one it is cut
# to 20 characters). Name is last so a '|' in a job name cannot shift the other columns. JobArrayID is a plain job's
# id, and `<array job id>_<task>` for a task of a job array (the tasks still pending together: `123_[2-5%2]`).
SQUEUE_FIELDS = ("JobArrayID", "State", "Reason", "NodeList", "NumNodes", "TimeUsed", "TimeLimit", "RestartCnt")
SQUEUE_FIELDS += ("Partition", "StartTime", "Name")
SQUEUE_FORMAT = ",".join(f"{field}:|" for field in SQUEUE_FIELDS)
SACCT_FIELDS = ("JobID", "State", "ExitCode", "Start", "End", "NodeList", "Elapsed")


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
        for job_id in array_task_ids(row["JobArrayID"]):
            jobs.append(
                JobState(
                    job_id=job_id,
                    state=row["State"],
                    reason=row["Reason"] if row["Reason"] != "None" else "",
                    nodelist=row["NodeList"],
                    num_nodes=int(row["NumNodes"]) if row["NumNodes"].isdigit() else None,
                    elapsed_s=parse_slurm_time_s(row["TimeUsed"]),
                    time_limit_s=parse_slurm_time_s(row["TimeLimit"]),
                    restarts=int(row["RestartCnt"]) if row["RestartCnt"].isdigit() else 0,
                    partition=row["Partition"],
                    start_time=_none_if_na(row["StartTime"]),
                    name=row["Name"],
                )
            )
    return jobs


def array_task_ids(job_id: str) -> list[str]:
    """squeue's id of one row as the ids of the jobs it stands for: `123` and `123_4` as they are, the tasks of a job
    array still pending together (`123_[2-5,8%2]`: tasks 2 to 5 and 8, at most 2 at once) one `123_<task>` each,
    as `--array` (`squeue -r`) would list them. No I/O here."""
    array, sep, tasks = job_id.partition("_[")
    if not sep or not tasks.endswith("]"):
        return [job_id]
    ids = []
    for part in tasks[:-1].split("%")[0].split(","):
        span, _, step = part.partition(":")
        first, _, last = span.partition("-")
        if not first.isdigit() or not (last or first).isdigit() or not (step or "1").isdigit():
            return [job_id]
        ids += [f"{array}_{task}" for task in range(int(first), int(last or first) + 1, int(step or 1) or 1)]
    return ids


def parse_sbatch_parsable(text: str) -> str:
    """`sbatch --parsable` prints `<jobid>` or `<jobid>;<cluster>`. No I/O here."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    job_id = lines[-1].split(";")[0] if lines else ""
    if not job_id.isdigit():
        raise ValueError(f"sbatch --parsable printed {text!r}, not a job id")
    return job_id


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
