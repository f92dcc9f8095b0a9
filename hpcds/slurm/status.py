"""One status row per run, merged from what Slurm still knows and what the run directory remembers. No I/O here.

Slurm's word wins while it still knows the job (one squeue row per job, from a single squeue call for all runs). Once
the controller has purged a finished job (after MinJobAge) — or on a machine without Slurm — the row comes from the
run's own event log, written by `hpcds submit`/`cancel`, the batch script (`started`, `exited` with rc, `requeue`) and
the launcher, and from accounting (`sacct`) only where the caller found some. Training progress comes from the
trainer's `progress.json` and per-node heartbeats, whatever the scheduler says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hpcds.durations import format_slurm_duration
from hpcds.facts import EXIT_REQUEUE
from hpcds.slurm.parse import JobState, parse_exit_code
from hpcds.versions import render_changes

ACTIVE_STATES = frozenset({"PENDING", "REQUEUED", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "RESIZING"})
ACTIVE_STATES |= {"REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "STOPPED"}
# Heartbeats older than this while Slurm says RUNNING mark the node as possibly hung.
HEARTBEAT_STALE_S = 300.0
# A local run (no Slurm job) counts as running while its progress or heartbeats are this fresh.
LOCAL_ALIVE_S = 120.0


@dataclass
class StatusRow:
    name: str
    job_id: str | None = None
    state: str = "UNKNOWN"
    reason: str = ""
    exit_code: int | None = None
    nodes: str = ""
    elapsed_s: int | None = None
    time_limit_s: int | None = None
    restarts: int = 0
    step: int | None = None
    max_steps: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    last_checkpoint_step: int | None = None
    last_checkpoint_age_s: float | None = None
    world_size: int | None = None
    wandb_id: str | None = None
    wandb_url: str | None = None
    wandb_dir: str | None = None
    heartbeat_age_s: float | None = None
    stale_nodes: list[str] = field(default_factory=list)
    excluded_nodes: list[str] = field(default_factory=list)  # left out of the job by its batch script (node_excluded)
    source: str = "events"  # where the state came from: squeue, sacct, events
    ending: str | None = None  # class of the last allocation's end: finished, requeued, terminated, failed, hung
    error: str | None = None  # the first error of the last allocation (the exception's last line), if it had one
    # {name: [at submit, now]}: what `hpcds launch` found changed at the last allocation's start (environment_changed)
    versions_changed: dict[str, list[Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per allocation (see job_history)
    spec_changes: list[dict[str, Any]] = field(default_factory=list)  # continues with a changed spec (spec_changed)
    sweep: str | None = None  # the sweep (`hpcds sweep`) whose job array task this run is

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def latest_job_id(meta: Mapping[str, Any], events: list[dict[str, Any]]) -> str | None:
    job_ids = [str(j) for j in meta.get("job_ids") or []]
    job_ids += [str(e["job_id"]) for e in events if e.get("event") == "submitted" and e.get("job_id")]
    return job_ids[-1] if job_ids else None


def allocation_job_id(job_id: str | None, events: list[dict[str, Any]]) -> str | None:
    """The id an array task's own events carry. A sweep's run knows its task as `123_4`; once the task starts Slurm
    gives it its own job id (SLURM_JOB_ID, kept across requeues), which the batch script, launcher and trainer log,
    and the batch script's `started` event names the task beside it (`array_task`). Any other id as it is."""
    if job_id is None or "_" not in job_id:
        return job_id
    ids = [str(e["job_id"]) for e in events if e["event"] == "started" and e.get("array_task") == job_id]
    return ids[-1] if ids else job_id


def same_job(job: JobState, job_id: str, events: list[dict[str, Any]]) -> bool:
    """False when squeue's job with this id has another name than the one submitted: the id was reused."""
    names = [e.get("job_name") for e in events if e["event"] == "submitted" and str(e.get("job_id")) == job_id]
    return not names or names[-1] is None or names[-1] == job.name


def state_from_events(job_id: str | None, events: list[dict[str, Any]]) -> tuple[str, str, int | None]:
    """(state, reason, exit code) of a job Slurm no longer knows, from the run's event log alone."""
    mine = [e for e in events if job_id is None or str(e.get("job_id", job_id)) == job_id]
    if any(e["event"] == "cancelled" for e in mine):
        return "CANCELLED", "hpcds cancel", None
    state, reason, rc = (
        ("PENDING", "submitted; Slurm no longer knows the job", None) if job_id else ("UNKNOWN", "", None)
    )
    for event in mine:
        kind = event["event"]
        if kind == "started":
            state, reason, rc = "RUNNING", "started; no exit recorded and Slurm no longer knows the job", None
        elif kind == "exited":
            rc = _as_int(event.get("rc"))
            if rc == 0:
                state, reason = "COMPLETED", ""
            else:
                state = "FAILED"
                reason = f"exit code {rc}" + (" after a TERM from Slurm" if str(event.get("terminated")) == "1" else "")
        elif kind == "requeue":
            state, reason = "REQUEUED", "saved and requeued itself"
        elif kind == "requeue_limit":
            state, reason = "FAILED", f"requeue limit reached ({event.get('max_requeues')})"
        elif kind == "requeue_failed":
            state, reason = "FAILED", f"scontrol requeue failed (rc {event.get('rc')})"
        elif kind == "not_requeued" and event.get("reason") == "no_progress":
            state, reason = "FAILED", f"no progress in {event.get('allocations')} allocations in a row"
    return state, reason, rc


def job_history(job_id: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per allocation of the job, oldest first: restart count, start and end times, the step it resumed
    from and its resume probe's verdict, the stop signal and step, the error, and how it ended (the batch script's
    class and exit code). Trainer events carry no job id; they belong to the allocation whose `started` came last
    before them. An allocation without an `exited` event followed by a later one ended `killed` (at its last event)."""
    history: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    last_time = None  # of the newest event of the current allocation
    for event in events:
        kind, owner = event["event"], event.get("job_id")
        if kind == "started" and history and history[-1]["ending"] is None:
            # A later allocation (of this job or another of the run) began, so this one is over: its batch shell
            # was killed (after KillWait, say) before it could log its exit. Not "running".
            history[-1]["ending"], history[-1]["end"] = "killed", last_time
        if owner is not None and str(owner) != job_id:
            if kind == "started":
                current = None  # another job of the run: its trainer events are not ours
            continue
        if kind == "started":
            current = {"restart": _as_int(event.get("restart")) or 0, "start": _as_float(event.get("time"))}
            current |= {"end": None, "resumed_from_step": None, "probe": None, "stop": None, "error": None}
            current["ending"], current["excluded"] = None, []
            current["rc"] = None
            history.append(current)
        elif current is None:
            continue
        last_time = _as_float(event.get("time"))
        if kind == "train_start":
            current["resumed_from_step"] = _as_int(event.get("step"))
        elif kind == "probe":  # the resume probe: the saved loss recomputed from the loaded checkpoint
            current["probe"] = "probe ok" if event.get("ok") else "probe failed"
        elif kind == "stopped":
            current["stop"] = f"{event.get('signal')} at step {event.get('step')}"
        elif kind == "error" and not current["error"]:  # the first is the cause; the other ranks' follow from it
            current["error"] = str(event.get("message", ""))
        elif kind == "hung":
            current["error"] = f"hung: no heartbeat for {event.get('heartbeat_age_s')} s"
        elif kind == "environment_changed" and isinstance(event.get("changed"), dict):
            current["changed"] = {**current.get("changed", {}), **event["changed"]}
            if event.get("action") == "fail" and not current["error"]:
                current["error"] = f"versions changed since submit: {render_changes(event['changed'])} (fail)"
        elif kind == "exited":
            current["end"], current["rc"] = _as_float(event.get("time")), _as_int(event.get("rc"))
            fallback = {0: "finished", EXIT_REQUEUE: "requeued"}.get(
                current["rc"], "failed"
            )  # scripts before the class
            current["ending"] = event.get("class") or fallback
        elif kind in ("requeue", "failure_requeue"):
            current["requeued"] = True
        elif kind == "node_excluded":
            current["excluded"].append(str(event.get("host")))
    return history


def history_lines(history: list[dict[str, Any]]) -> list[str]:
    """One line per allocation for people, e.g. `restart 1: resumed at step 12, SIGUSR2 at step 20, requeued`."""
    lines = []
    for entry in history:
        parts = [f"restart {entry['restart']}:"]
        step = entry.get("resumed_from_step")
        if entry.get("probe") and step is None:  # the probe failed: the trainer never started
            parts.append(f"resume refused ({entry['probe']})")
        elif step is None:
            parts.append("no trainer start")
        else:
            probe = f" ({entry['probe']})" if entry.get("probe") else ""
            parts.append("from scratch" if step == 0 else f"resumed at {step}{probe}")
        if entry.get("stop"):
            parts.append(entry["stop"])
        if entry.get("end") is not None and entry.get("start") is not None:
            parts.append(f"ran {format_slurm_duration(entry['end'] - entry['start'])}")
        ending = entry.get("ending") or "running"
        parts.append(ending + (f" (exit {entry['rc']})" if entry.get("rc") not in (None, 0) else ""))
        if entry.get("requeued") and ending in ("failed", "hung", "node_unhealthy"):
            parts.append("requeued" + (f" without {','.join(entry['excluded'])}" if entry.get("excluded") else ""))
        line = ", ".join(parts[1:])
        if entry.get("error"):
            line += f"; {entry['error']}"
        lines.append(f"{parts[0]} {line}")
    return lines


def spec_change_lines(changes: list[dict[str, Any]]) -> list[str]:
    """One line per continue with a changed spec, e.g. `from step 8: training.max_steps 8 -> 12`."""
    return [
        f"from step {entry.get('resume_step') or 0}: "
        + ", ".join(f"{c.get('field')} {c.get('old')} -> {c.get('new')}" for c in entry["changes"])
        for entry in changes
    ]


def local_state(events: list[dict[str, Any]], fresh_age_s: float | None) -> tuple[str, str]:
    """State of a run started with `hpcds run` (no Slurm job): the trainer's own last word since its last launch."""
    state, reason = "UNKNOWN", "never launched"
    for event in events:
        kind = event["event"]
        if kind in ("launch", "train_start"):
            state, reason = "RUNNING", "local"
        elif kind == "finished":
            state, reason = "COMPLETED", "local"
        elif kind == "error":
            state, reason = "FAILED", str(event.get("message", ""))[:80]
        elif kind == "stopped":
            state, reason = "STOPPED", f"local; {event.get('signal', 'signal')} at step {event.get('step')}"
    if state == "RUNNING" and (fresh_age_s is None or fresh_age_s > LOCAL_ALIVE_S):
        state, reason = "UNKNOWN", "local run without a recent heartbeat (killed?)"
    return state, reason


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def current_heartbeats(
    heartbeats: Mapping[str, Mapping[str, Any]], job_id: str, restart: int
) -> dict[str, Mapping[str, Any]]:
    """The beats of this allocation: a node's file from an earlier job or an earlier start of this one (the job was
    requeued onto other nodes) says nothing about now. Beats that name no job (a local run) all count."""
    return {
        host: beat
        for host, beat in heartbeats.items()
        if beat.get("job_id") is None
        or (str(beat["job_id"]) == job_id and (_as_int(beat.get("restart")) or 0) >= restart)
    }


def _restarts_from_events(job_id: str, events: list[dict[str, Any]]) -> int:
    """SLURM_RESTART_COUNT as the batch script logged it at each start (absent before the first requeue)."""
    starts = [e for e in events if e["event"] == "started" and str(e.get("job_id")) == job_id]
    return max((_as_int(e.get("restart")) or 0 for e in starts), default=0)


def run_status(
    name: str,
    meta: Mapping[str, Any],
    events: list[dict[str, Any]],
    progress: Mapping[str, Any] | None,
    heartbeats: Mapping[str, Mapping[str, Any]],
    jobs: Mapping[str, JobState] | None,
    now: float,
    accounting: Mapping[str, Mapping[str, str]] | None = None,
) -> StatusRow:
    """The row for one run. `jobs` is squeue's answer by job id (None: Slurm could not be asked); `accounting` is
    sacct's by job id (optional)."""
    row = StatusRow(name=name, wandb_id=meta.get("wandb_id"))
    job_id = latest_job_id(meta, events)
    row.job_id = job_id
    own = allocation_job_id(job_id, events)  # the id in the events (an array task's own)
    sweeps = [e["sweep"] for e in events if e["event"] == "submitted" and e.get("sweep")]
    row.sweep = sweeps[-1] if sweeps else meta.get("sweep")
    newest_beat = max((_as_float(b.get("time")) or 0.0 for b in heartbeats.values()), default=0.0)
    progress_time = _as_float((progress or {}).get("time")) or 0.0
    fresh_age_s = now - max(newest_beat, progress_time) if max(newest_beat, progress_time) > 0 else None

    job = jobs.get(job_id) if job_id and jobs else None
    if job is not None and not same_job(job, job_id, events):
        job = None
    if job is not None:
        row.source = "squeue"
        row.state = "REQUEUED" if job.state == "PENDING" and job.restarts > 0 else job.state
        row.reason, row.nodes, row.restarts = job.reason, job.nodelist, job.restarts
        row.elapsed_s, row.time_limit_s = job.elapsed_s, job.time_limit_s
        if job.state in ("FAILED", "COMPLETED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL"):
            row.exit_code = state_from_events(own, events)[2]
    elif job_id and accounting and job_id in accounting:
        row.source = "sacct"
        record = accounting[job_id]
        row.state = record.get("State", "UNKNOWN").split()[0]  # "CANCELLED by 0" -> CANCELLED
        row.exit_code = parse_exit_code(record.get("ExitCode", ""))[0]
        row.nodes = record.get("NodeList", "")
        row.restarts = _restarts_from_events(own, events)
    elif job_id:
        row.state, row.reason, row.exit_code = state_from_events(own, events)
        if jobs is not None and row.state in ("PENDING", "RUNNING"):
            # Slurm answered and does not know the job, yet its log never saw it end: it died with its node or
            # its batch shell was killed outright. Only accounting could tell more.
            row.state = "UNKNOWN"
            row.reason = f"Slurm no longer knows job {job_id} and the run's log has no exit for it"
        row.restarts = _restarts_from_events(own, events)
        row.nodes = _last_nodes(own, events)
        row.elapsed_s = _last_run_time_s(own, events)
    elif meta.get("local"):
        row.state, row.reason = local_state(events, fresh_age_s)
    else:
        row.state, row.reason = "NOT_SUBMITTED", "created with --dry-run"
    if job_id:
        row.history = job_history(own, events)
        last = row.history[-1] if row.history else {}
        row.ending, row.error = last.get("ending"), last.get("error")
        row.versions_changed = last.get("changed") or {}
        row.excluded_nodes = sorted({host for entry in row.history for host in entry.get("excluded", ())})
        if row.error and row.state == "FAILED":
            row.reason = row.error.splitlines()[-1][:120]

    if row.reason == "Dependency" and job_id:  # waiting for other runs' jobs (hpcds submit --after)
        asked = [e.get("dependency") for e in events if e["event"] == "submitted" and str(e.get("job_id")) == job_id]
        row.reason += f" ({asked[-1]})" if asked and asked[-1] else ""
    row.spec_changes = [
        {"time": e.get("time"), "resume_step": e.get("resume_step"), "changes": e.get("changes") or []}
        for e in events
        if e["event"] == "spec_changed"
    ]
    if progress:
        row.step = _as_int(progress.get("step"))
        row.max_steps = _as_int(progress.get("max_steps"))
        row.loss = _as_float(progress.get("loss"))
        row.tokens_per_s = _as_float(progress.get("tokens_per_s"))
        row.last_checkpoint_step = _as_int(progress.get("last_checkpoint_step"))
        checkpoint_time = _as_float(progress.get("last_checkpoint_time"))
        row.last_checkpoint_age_s = round(now - checkpoint_time, 1) if checkpoint_time else None
        row.world_size = _as_int(progress.get("world_size"))
        row.wandb_id = progress.get("wandb_id") or row.wandb_id
        row.wandb_url = progress.get("wandb_url")
        row.wandb_dir = progress.get("wandb_dir")
    if job_id:  # squeue may know of a restart before the batch script has logged it, or the other way round
        heartbeats = current_heartbeats(heartbeats, own, max(row.restarts, _restarts_from_events(own, events)))
    if heartbeats:
        row.heartbeat_age_s = round(now - min(_as_float(b.get("time")) or 0.0 for b in heartbeats.values()), 1)
        if row.state == "RUNNING":
            row.stale_nodes = sorted(
                host
                for host, beat in heartbeats.items()
                if now - (_as_float(beat.get("time")) or 0) > HEARTBEAT_STALE_S
            )
    return row


def _as_float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _last_nodes(job_id: str, events: list[dict[str, Any]]) -> str:
    nodes = [e.get("nodes", "") for e in events if e["event"] == "started" and str(e.get("job_id")) == job_id]
    return nodes[-1] if nodes else ""


def _last_run_time_s(job_id: str, events: list[dict[str, Any]]) -> int | None:
    start = end = None
    for event in events:
        if str(event.get("job_id")) != job_id:
            continue
        if event["event"] == "started":
            start, end = _as_float(event.get("time")), None
        elif event["event"] == "exited":
            end = _as_float(event.get("time"))
    return int(end - start) if start is not None and end is not None else None


def needs_accounting(row: StatusRow) -> bool:
    """A row only accounting could settle: Slurm forgot the job and the event log has no ending for it."""
    return row.source == "events" and row.job_id is not None and row.state == "UNKNOWN"


def table_cells(row: StatusRow) -> dict[str, str]:
    """The human table's cells for one row (the CLI draws them)."""

    def dash(value: Any, fmt: str = "{}") -> str:
        return "-" if value is None else fmt.format(value)

    state = row.state + (f" ({row.exit_code})" if row.exit_code not in (None, 0) else "")
    checkpoint = "-"
    if row.last_checkpoint_step is not None:
        checkpoint = f"{row.last_checkpoint_step}"
        if row.last_checkpoint_age_s is not None:
            checkpoint += f" ({format_slurm_duration(row.last_checkpoint_age_s)} ago)"
    offline_dir = row.wandb_dir
    if offline_dir and f"/{row.name}/" in offline_dir:  # inside the run directory: the relative part says it all
        offline_dir = offline_dir.split(f"/{row.name}/", 1)[1]
    wandb = row.wandb_url or (f"offline {offline_dir}" if offline_dir else (row.wandb_id or "-"))
    reason = row.reason + (f"; stale: {','.join(row.stale_nodes)}" if row.stale_nodes else "")
    reason += f"; excluded: {','.join(row.excluded_nodes)}" if row.excluded_nodes else ""
    return {
        "run": row.name,
        "job": row.job_id or "-",
        "state": state,
        "reason": reason or "-",
        "nodes": row.nodes or "-",
        "time": f"{format_slurm_duration(row.elapsed_s)} / {format_slurm_duration(row.time_limit_s)}",
        "restarts": str(row.restarts),
        "step": f"{dash(row.step)}/{dash(row.max_steps)}" if row.step is not None else "-",
        "loss": dash(row.loss, "{:.4f}"),
        "tok/s": dash(row.tokens_per_s, "{:.0f}"),
        "checkpoint": checkpoint,
        "world": dash(row.world_size),
        "versions changed": render_changes(row.versions_changed) or "-",
        "w&b": wandb,
    }


def node_failures(bad_nodes: Mapping[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per node, what the runs' batch scripts excluded it for (`hpcds status --nodes`), most often excluded first.
    `bad_nodes` maps a run's name to its bad_nodes.jsonl records."""
    by_node: dict[str, dict[str, Any]] = {}
    for run, records in bad_nodes.items():
        for record in sorted(records, key=lambda r: _as_float(r.get("time")) or 0.0):
            node = by_node.setdefault(str(record.get("host")), {"failures": 0, "runs": set()})
            node["failures"] += 1
            node["runs"].add(run)
            node["last_time"], node["last_reason"] = _as_float(record.get("time")), record.get("reason")
    rows = [
        {"node": name, "failures": n["failures"], "runs": sorted(n["runs"]), "last_time": n["last_time"],
         "last_reason": n["last_reason"]}
        for name, n in by_node.items()
    ]  # fmt: skip
    return sorted(rows, key=lambda r: (-r["failures"], r["node"]))


def nodes_to_avoid(bad_nodes: list[dict[str, Any]], now: float, memory_s: float) -> list[str]:
    """The nodes excluded within the last `memory_s` seconds: a new submit of the same spec leaves them out."""
    return sorted({str(r.get("host")) for r in bad_nodes if now - (_as_float(r.get("time")) or 0.0) <= memory_s})
