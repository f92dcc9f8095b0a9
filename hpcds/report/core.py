"""What a run's time went to: goodput per allocation and in total, each interruption's cost, saves, GPU-hours,
tokens and MFU, computed from the run's event log and its per-step records (losses.jsonl). No I/O here.

Allocations are `hpcds.slurm.status.job_history`'s, so the report and `hpcds status` never disagree on where one
ends. Trainer step records carry no job id: a record belongs to the allocation whose `started` came last before it,
as trainer events do. docs/report.md defines every number.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

from hpcds.plan.gpus import dense_peak_tflops, mfu
from hpcds.slurm.status import job_history


@dataclass(frozen=True)
class RunFacts:
    """What the spec and the person say about the run, beyond its logs."""

    nodes: int
    gpus_per_node: int
    precision: str  # bf16, fp16, fp32
    tokens_per_step: int | None  # global batch × sequence length
    flops_per_token: float | None  # the planner's training FLOPs per token
    gpu_name: str | None = None  # which GPU the run used (the logs do not say)


@dataclass
class Allocation:
    job_id: str
    restart: int
    start_time: float
    end_time: float | None  # `exited`, else its last sign of life (a killed or still running allocation)
    ending: str  # the batch script's class (finished, requeued, failed, hung, ...), killed, or running
    cause: str  # the stop signal or the first error, when there was one
    resumed_from_step: int | None
    last_step: int | None
    allocated_s: float
    effective_s: float  # in its steps that were kept (not trained again later)
    goodput: float | None
    steps_trained: int
    steps_recomputed: int  # of its steps, how many a later allocation trained again
    start_to_first_step_s: float | None


@dataclass
class Interruption:
    restart: int  # of the allocation that ended
    ending: str
    cause: str
    stopped_at_step: int | None  # the step the trainer saved at after a stop signal (None: no save at the end)
    signal_to_commit_max_s: float | None  # from the start of that step (the signal came during it) to the commit
    queue_wait_s: float | None  # its end to the next allocation's start (None: no next allocation)
    next_start_to_first_step_s: float | None
    resumed_from_step: int | None  # where the next allocation started training
    steps_recomputed: int


@dataclass
class StepPoint:
    time: float
    step: int
    loss: float
    tokens_per_s: float | None
    allocation: int  # index into RunReport.allocations
    recomputed: bool  # trained again by a later allocation
    interval_s: float | None  # from the previous mark of its allocation (docs/report.md); None for no mark before it


@dataclass
class RunReport:
    name: str
    allocations: list[Allocation]
    interruptions: list[Interruption]
    allocated_s: float
    effective_s: float
    goodput: float | None
    downtime_s: float  # sum of the gaps between one allocation's end and the next one's start
    steps_kept: int
    steps_recomputed: int
    saves: int
    save_blocking_s: float
    save_background_s: float  # asynchronous saves' writing while training went on
    gpu_hours: float | None
    tokens: int | None
    tokens_per_s: float | None  # kept tokens over effective training time
    gpu_name: str | None
    peak_tflops: float | None
    mfu: float | None
    notes: dict[str, str] = field(default_factory=dict)  # why a number is missing: gpu_hours, mfu, allocations
    points: list[StepPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def job_ids_of(meta: Mapping[str, Any], events: list[dict[str, Any]]) -> list[str]:
    """Every job of the run, oldest first: re-submitting `job.sbatch` gives the run a new job id."""
    found = [str(j) for j in meta.get("job_ids") or []]
    found += [str(e["job_id"]) for e in events if e["event"] in ("submitted", "started") and e.get("job_id")]
    return list(dict.fromkeys(found))


def build_report(
    name: str,
    meta: Mapping[str, Any],
    events: list[dict[str, Any]],
    losses: list[dict[str, Any]],
    facts: RunFacts,
    last_seen_time: float | None = None,
) -> RunReport:
    """The report of one run. `losses` are losses.jsonl's records in file order; `last_seen_time` the newest heartbeat
    or progress write, which ends an allocation that is still running."""
    events = sorted((e for e in events if _num(e.get("time")) is not None), key=lambda e: float(e["time"]))
    history = [{**h, "job_id": job} for job in job_ids_of(meta, events) for h in job_history(job, events)]
    history = sorted((h for h in history if h["start"] is not None), key=lambda h: h["start"])
    starts = [h["start"] for h in history]
    records = [r for r in losses if _num(r.get("time")) is not None and _num(r.get("step")) is not None]

    def owner(time: float) -> int | None:
        index = bisect_right(starts, time) - 1
        return index if index >= 0 else None

    later_steps: set[int] = set()
    recomputed_flags = []
    for record in reversed(records):  # a record is recomputed when the same step was recorded again later
        recomputed_flags.append(int(record["step"]) in later_steps)
        later_steps.add(int(record["step"]))
    recomputed_flags.reverse()

    # A step's interval starts at the previous mark of its allocation: a step record, the trainer's start, or a
    # committed checkpoint (a save is not training time); a background save also marks the end of its copy, the part
    # of it that training waited for before going on.
    marks: dict[int, list[float]] = {}
    for event in events:
        if event["event"] in ("train_start", "checkpoint") and (index := owner(float(event["time"]))) is not None:
            marks.setdefault(index, []).append(float(event["time"]))
            if event["event"] == "checkpoint" and event.get("background"):
                marks[index].append(_copied_at(event))
    for times in marks.values():
        times.sort()
    points, last_mark = [], {}
    for record, recomputed in zip(records, recomputed_flags, strict=True):
        time = float(record["time"])
        index = owner(time)
        if index is None:
            continue
        mine = marks.get(index, [])
        before = mine[: bisect_left(mine, time)][-1:] + ([last_mark[index]] if index in last_mark else [])
        interval = time - max(before) if before else None
        last_mark[index] = time
        rate = facts.tokens_per_step / interval if facts.tokens_per_step and interval else None
        loss = float(record.get("loss") or 0.0)
        points.append(StepPoint(time, int(record["step"]), loss, rate, index, recomputed, interval))

    by_allocation: dict[int, list[StepPoint]] = {}
    for point in points:
        by_allocation.setdefault(point.allocation, []).append(point)
    last_event: dict[int, float] = {}
    for event in events:
        if (index := owner(float(event["time"]))) is not None:
            last_event[index] = float(event["time"])
    allocations = []
    for index, entry in enumerate(history):
        mine = by_allocation.get(index, [])
        end = entry["end"]
        if entry["ending"] in (None, "killed"):  # its last sign of life: an event, a step record, a heartbeat
            seen = [last_event.get(index, entry["start"]), *(p.time for p in mine[-1:])]
            if entry["ending"] is None and last_seen_time is not None and index == len(history) - 1:
                seen.append(last_seen_time)
            end = max([*seen, *([end] if end is not None else [])], default=entry["start"])
        allocated_s = max(0.0, end - entry["start"])
        effective_s = sum(p.interval_s or 0.0 for p in mine if not p.recomputed)
        allocations.append(
            Allocation(
                job_id=entry["job_id"],
                restart=entry["restart"],
                start_time=entry["start"],
                end_time=end,
                ending=entry["ending"] or "running",
                cause=entry.get("stop") or entry.get("error") or "",
                resumed_from_step=entry["resumed_from_step"],
                last_step=mine[-1].step if mine else None,
                allocated_s=allocated_s,
                effective_s=effective_s,
                goodput=effective_s / allocated_s if allocated_s > 0 else None,
                steps_trained=len(mine),
                steps_recomputed=sum(p.recomputed for p in mine),
                start_to_first_step_s=mine[0].time - entry["start"] if mine else None,
            )
        )
    interruptions = [
        _interruption(index, allocations, events, points)
        for index, alloc in enumerate(allocations)
        if alloc.ending not in ("finished", "running")
    ]
    allocated_s = sum(a.allocated_s for a in allocations)
    effective_s = sum(a.effective_s for a in allocations)
    steps_kept = len({p.step for p in points})
    saves = [e for e in events if e["event"] == "checkpoint"]
    notes = {} if allocations else {"allocations": "no allocation in the event log: the job never started"}
    gpus = facts.nodes * facts.gpus_per_node
    gpu_hours = allocated_s * gpus / 3600 if gpus else None
    if not gpus:
        notes["gpu_hours"] = "CPU run: no GPUs"
    tokens = steps_kept * facts.tokens_per_step if facts.tokens_per_step else None
    tokens_per_s = tokens / effective_s if tokens is not None and effective_s > 0 else None
    peak = dense_peak_tflops(facts.gpu_name, facts.precision) if facts.gpu_name and gpus else None
    ratio = None
    if peak and tokens_per_s and facts.flops_per_token:
        ratio = mfu(tokens_per_s / gpus, facts.flops_per_token, peak)  # per GPU
    if ratio is None:
        notes["mfu"] = _why_no_mfu(facts, gpus, peak, tokens_per_s)
    return RunReport(
        name=name,
        allocations=allocations,
        interruptions=interruptions,
        allocated_s=allocated_s,
        effective_s=effective_s,
        goodput=effective_s / allocated_s if allocated_s > 0 else None,
        downtime_s=sum(
            max(0.0, nxt.start_time - cur.end_time) for cur, nxt in pairwise(allocations) if cur.end_time is not None
        ),
        steps_kept=steps_kept,
        steps_recomputed=sum(p.recomputed for p in points),
        saves=len(saves),
        save_blocking_s=sum(_blocking_s(e) for e in saves),
        save_background_s=sum((_num(e.get("seconds")) or 0.0) - _blocking_s(e) for e in saves),
        gpu_hours=gpu_hours,
        tokens=tokens,
        tokens_per_s=tokens_per_s,
        gpu_name=facts.gpu_name,
        peak_tflops=peak,
        mfu=ratio,
        notes=notes,
        points=points,
    )


def _interruption(index: int, allocations: list[Allocation], events: list[dict], points: list[StepPoint]):
    alloc = allocations[index]
    nxt = allocations[index + 1] if index + 1 < len(allocations) else None
    window = [e for e in events if alloc.start_time <= float(e["time"]) <= (alloc.end_time or alloc.start_time)]
    stops = [e for e in window if e["event"] == "stopped"]
    stopped_at = _int(stops[-1].get("step")) if stops and stops[-1].get("saved", True) else None
    signal_to_commit = None
    if stopped_at is not None:
        commits = [float(e["time"]) for e in window if e["event"] == "checkpoint" and _int(e.get("step")) == stopped_at]
        mine = [p for p in points if p.allocation == index]
        # The signal came while the stop step ran: after the record (or trainer start) before it.
        before = [p.time for p in mine if p.step == stopped_at - 1]
        before = before or [float(e["time"]) for e in window if e["event"] == "train_start"]
        if commits and before:
            signal_to_commit = commits[-1] - before[-1]
    return Interruption(
        restart=alloc.restart,
        ending=alloc.ending,
        cause=alloc.cause,
        stopped_at_step=stopped_at,
        signal_to_commit_max_s=signal_to_commit,
        queue_wait_s=nxt.start_time - alloc.end_time if nxt and alloc.end_time is not None else None,
        next_start_to_first_step_s=nxt.start_to_first_step_s if nxt else None,
        resumed_from_step=nxt.resumed_from_step if nxt else None,
        steps_recomputed=alloc.steps_recomputed,
    )


def _why_no_mfu(facts: RunFacts, gpus: int, peak: float | None, tokens_per_s: float | None) -> str:
    if not gpus:
        return "CPU run: no GPU peak"
    if not facts.gpu_name:
        return "the run does not record its GPU: give --gpu NAME"
    if peak is None:
        return f"no dense {facts.precision} peak for {facts.gpu_name!r} in the table (docs/report.md)"
    if not facts.flops_per_token:
        return "the planner has no FLOPs per token for this model"
    return "no training steps recorded"


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    number = _num(value)
    return None if number is None else int(number)


def _blocking_s(save: dict) -> float:
    """Seconds a save held training up: a synchronous save's whole `seconds`, a background save's `blocking_s`."""
    seconds = _num(save.get("seconds")) or 0.0
    blocking = _num(save.get("blocking_s"))
    return min(seconds, blocking) if save.get("background") and blocking is not None else seconds


def _copied_at(save: dict) -> float:
    """When a background save's copy was done: the save began `seconds` before its commit event; then the probe's
    forward pass and the copy."""
    phases = save.get("phases_s") or {}
    began = float(save["time"]) - (_num(save.get("seconds")) or 0.0)
    return began + (_num(phases.get("probe")) or 0.0) + (_num(phases.get("snapshot")) or 0.0)
