"""`hpcds status`, `logs`, `cancel` (login node) and `launch` (inside a job, once per node).

status reads every run directory and asks Slurm once (squeue) per refresh for all of them; accounting (sacct) only
where Slurm has forgotten a job the event log cannot settle and the cluster has accounting. Nothing here imports torch
or DeepSpeed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from hpcds import facts, runs, slurm
from hpcds.cli import COMMAND_SETTINGS
from hpcds.cli.common import console, err_console, print_json, runs_root_option
from hpcds.errors import HpcdsError
from hpcds.slurm.status import (
    ACTIVE_STATES,
    StatusRow,
    allocation_job_id,
    history_lines,
    latest_job_id,
    needs_accounting,
    run_status,
    same_job,
    spec_change_lines,
    table_cells,
)


def read_run(run_dir: Path, jobs: dict[str, slurm.JobState]) -> dict[str, Any]:
    """What status needs from one run directory: events, progress, and meta and heartbeats only where they matter.

    With 10,000 runs per refresh every file open counts: meta is read only when the events lack the job id or the
    progress lacks the W&B id, heartbeats only for a job that may still run. Plain string paths, bytes and one JSON
    parse per event log, because pathlib objects, text decoding and a parse per line each cost a large share of the
    one-second budget.
    """
    base = os.fspath(run_dir)
    events = runs.parse_events(_read_bytes(os.path.join(base, facts.EVENTS_FILE)) or b"")
    progress = _load_json(_read_bytes(os.path.join(base, facts.PROGRESS_FILE)))
    progress = progress if isinstance(progress, dict) else None
    meta: Any = {}
    if not any(e["event"] == "submitted" for e in events) or not (progress or {}).get("wandb_id"):
        meta = _load_json(_read_bytes(os.path.join(base, facts.META_FILE)))
        meta = meta if isinstance(meta, dict) else {}
    job_id = latest_job_id(meta, events)
    job = jobs.get(job_id) if job_id else None
    job = job if job is None or same_job(job, job_id, events) else None
    own = allocation_job_id(job_id, events)  # an array task logs its own job id
    ended = any(e["event"] in ("exited", "cancelled") and str(e.get("job_id")) == own for e in events)
    may_run = job.state in ACTIVE_STATES if job else (not ended or job_id is None)
    heartbeats = {}
    if may_run:
        try:
            with os.scandir(os.path.join(base, facts.HEARTBEAT_DIR)) as entries:
                for entry in entries:
                    if entry.name.endswith(".json"):
                        beat = _load_json(_read_bytes(entry.path))
                        if isinstance(beat, dict):
                            heartbeats[entry.name[:-5]] = beat
        except (FileNotFoundError, NotADirectoryError):
            pass
    return {"meta": meta, "events": events, "progress": progress, "heartbeats": heartbeats, "job_id": job_id}


def _read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _load_json(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a torn or foreign file: status shows what it can


class StatusSource:
    """Collects status rows; remembers between refreshes whether the cluster has accounting (asked at most once)."""

    def __init__(self) -> None:
        self.accounting: bool | None = None
        self.note = ""

    def rows(self, run_dirs: list[Path]) -> list[StatusRow]:
        jobs: dict[str, slurm.JobState] = {}
        error = None
        if run_dirs:
            try:
                jobs = {job.job_id: job for job in slurm.squeue_mine()}
            except HpcdsError as exc:
                error = exc
        snapshots = [(run_dir, read_run(run_dir, jobs)) for run_dir in run_dirs]
        answered = jobs if error is None else None
        self.note = ""
        if error is not None and any(snap["job_id"] for _, snap in snapshots):
            why = (error.stderr.strip().splitlines() or [str(error)])[-1]
            self.note = f"Slurm not reachable ({why}): states come from the run directories' event logs"
        now = time.time()
        rows = [
            run_status(run_dir.name, s["meta"], s["events"], s["progress"], s["heartbeats"], answered, now)
            for run_dir, s in snapshots
        ]
        unsettled = [row for row in rows if needs_accounting(row)]
        if unsettled and not self.note and self._has_accounting():
            try:
                records = {r["JobID"]: r for r in slurm.sacct([row.job_id for row in unsettled])}
            except HpcdsError:
                records = {}
            by_name = dict(snapshots)
            for index, row in enumerate(rows):
                if row.job_id in records:
                    snap = by_name[run_dirs[index]]
                    rows[index] = run_status(
                        row.name,
                        snap["meta"],
                        snap["events"],
                        snap["progress"],
                        snap["heartbeats"],
                        answered,
                        now,
                        records,
                    )
        return rows

    def _has_accounting(self) -> bool:
        if self.accounting is None:
            try:
                self.accounting = slurm.accounting_enabled(slurm.show_config())
            except HpcdsError:
                self.accounting = False
        return self.accounting


COLUMNS = ("run", "job", "state", "reason", "nodes", "time", "restarts", "step", "loss", "tok/s", "checkpoint", "world")
COLUMNS += ("versions changed", "w&b")
STATE_STYLES = {"RUNNING": "green", "COMPLETED": "bold green", "FAILED": "bold red", "PENDING": "yellow"}
STATE_STYLES |= {"REQUEUED": "yellow", "CANCELLED": "magenta", "TIMEOUT": "red", "PREEMPTED": "yellow"}


def render_table(rows: list[StatusRow]):
    """A rich table; progress columns that no run has filled yet are left out to keep it narrow."""
    from rich.table import Table

    cells = [table_cells(row) for row in rows]
    always = {"run", "job", "state", "time", "restarts"}
    columns = [c for c in COLUMNS if c in always or any(cell[c] not in ("-", "-/-") for cell in cells)]
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        wraps = column in ("reason", "versions changed", "w&b")
        table.add_column(column.upper(), no_wrap=not wraps, overflow="fold" if wraps else "ellipsis")
    titles = {}
    if any(row.sweep for row in rows):  # a sweep's tasks together, under one line for the sweep
        from hpcds.cli.sweep_cmd import sweep_titles

        rows, cells, titles = sweep_titles(rows, cells)
    for row, cell in zip(rows, cells, strict=True):
        if id(row) in titles:
            table.add_row(*[titles[id(row)].get(c, "") for c in columns], style="bold")
        style = STATE_STYLES.get(row.state, "")
        table.add_row(*[f"[{style}]{cell[c]}[/]" if c == "state" and style else cell[c] for c in columns])
    return table


def select_runs(runs_root: Path, names: tuple[str, ...]) -> list[Path]:
    """Runs by name or path; a bare prefix (`quickstart`) selects every run named `quickstart-<time>`; a sweep's name
    its tasks' runs."""
    if not names:
        return runs.list_runs(runs_root)
    selected: list[Path] = []
    for name in names:
        try:
            selected.append(runs.find_run(runs_root, name))
        except HpcdsError:
            from hpcds.cli.sweep_cmd import sweep_runs

            if tasks := sweep_runs(runs_root, name):
                selected += tasks
                continue
            matches = [p for p in runs.list_runs(runs_root) if p.name.startswith(f"{name}-")]
            if not matches:
                raise
            selected += matches
    return list(dict.fromkeys(selected))


@click.command(context_settings=COMMAND_SETTINGS)
@click.argument("names", metavar="[RUN]...", nargs=-1)
@runs_root_option
@click.option("--json", "as_json", is_flag=True, help="A JSON list of objects, one per run (null where unknown).")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.5), default=5.0, show_default=True)
@click.option("--nodes", "by_node", is_flag=True, help="Per node, how often the runs' batch scripts excluded it.")
def status(names, runs_root: Path, as_json, watch, interval_s, by_node) -> None:
    """Queue state and training progress of runs (all runs under the runs folder by default)."""
    if by_node:
        print_node_failures(select_runs(runs_root, names), as_json)
        return
    source = StatusSource()
    if as_json and not watch:
        print_json([row.to_dict() for row in source.rows(select_runs(runs_root, names))])
        return
    if not watch:
        rows = source.rows(select_runs(runs_root, names))
        if not rows:
            console.print(f"no runs under {runs_root.absolute()}")
            return
        # Piped output gets no terminal width from rich (80): give it room instead of cutting names.
        wide = console if console.is_terminal else Console(width=250, highlight=False)
        wide.print(render_table(rows))
        if len(rows) == 1 and len(rows[0].history) > 1:  # one run asked for: how each allocation went
            wide.print("history:", highlight=False)
            for line in history_lines(rows[0].history):
                wide.print(f"  {line}", highlight=False, markup=False)
        if len(rows) == 1 and rows[0].spec_changes:  # continued with another spec (hpcds resume, --resume)
            wide.print("spec changes:", highlight=False)
            for line in spec_change_lines(rows[0].spec_changes):
                wide.print(f"  {line}", highlight=False, markup=False)
        if source.note:
            err_console.print(source.note)
        return
    if as_json:
        while True:
            print_json([row.to_dict() for row in source.rows(select_runs(runs_root, names))])
            sys.stdout.flush()
            time.sleep(interval_s)
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    with Live(console=console, auto_refresh=False) as live:
        while True:
            rows = source.rows(select_runs(runs_root, names))
            caption = f"{time.strftime('%H:%M:%S')}, every {interval_s:g} s, Ctrl-C to stop. {source.note}"
            live.update(Group(render_table(rows), Text(caption, style="dim")), refresh=True)
            time.sleep(interval_s)


def print_node_failures(run_dirs: list[Path], as_json: bool) -> None:
    from rich.table import Table

    from hpcds.durations import format_slurm_duration
    from hpcds.slurm.status import node_failures

    rows = node_failures({d.name: runs.read_bad_nodes(d) for d in run_dirs})
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no node was excluded by these runs")
        return
    table = Table("node", "excluded", "runs", "last", "why", box=None, header_style="bold")
    for row in rows:
        ago = f"{format_slurm_duration(time.time() - row['last_time'])} ago" if row["last_time"] else "-"
        table.add_row(row["node"], str(row["failures"]), ", ".join(row["runs"]), ago, str(row["last_reason"]))
    console.print(table)


def select_run(runs_root: Path, name: str) -> Path:
    """One run by name or path, or by a prefix that names exactly one run (`quickstart` for quickstart-<time>)."""
    matches = select_runs(runs_root, (name,))
    if len(matches) > 1:
        listed = ", ".join(p.name for p in matches[-5:])
        raise HpcdsError(f"{name!r} names {len(matches)} runs ({listed}); give the full run name")
    return matches[0]


def log_files(run_dir: Path) -> list[Path]:
    """The run's Slurm output files, one per job id, in submission order (a requeued job appends to its own)."""
    job_ids = [str(j) for j in runs.read_meta(run_dir).get("job_ids") or []]
    files = [run_dir / f"slurm-{job_id}.out" for job_id in job_ids]
    known = set(files)
    files += sorted((p for p in run_dir.glob("slurm-*.out") if p not in known), key=lambda p: p.stat().st_mtime)
    return files


@click.command(context_settings=COMMAND_SETTINGS)
@click.argument("name", metavar="RUN")
@runs_root_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the job ends (or Ctrl-C).")
def logs(name, runs_root: Path, follow) -> None:
    """Print a run's Slurm output (every job of the run, oldest first)."""
    run_dir = select_run(runs_root, name)
    files = log_files(run_dir)
    if not files and not follow:
        raise HpcdsError(f"run {run_dir.name} has no output yet (no slurm-*.out in {run_dir})")
    offsets = {}
    for path in files:
        offsets[path] = _copy_from(path, 0)
    if not follow:
        return
    job_id = (runs.read_meta(run_dir).get("job_ids") or [None])[-1]
    last_check = 0.0
    while True:
        time.sleep(0.5)
        for path in log_files(run_dir):
            offsets[path] = _copy_from(path, offsets.get(path, 0))
        if job_id is None or time.monotonic() - last_check < 2.0:
            continue
        last_check = time.monotonic()
        jobs = {job.job_id: job for job in slurm.squeue_mine()}
        job = jobs.get(str(job_id))
        if job is None or (job.state not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED")):
            for path in log_files(run_dir):
                offsets[path] = _copy_from(path, offsets.get(path, 0))
            return


def _copy_from(path: Path, offset: int) -> int:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read()
    except FileNotFoundError:
        return offset
    if chunk:
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    return offset + len(chunk)


@click.command(context_settings=COMMAND_SETTINGS)
@click.argument("name", metavar="RUN")
@runs_root_option
def cancel(name, runs_root: Path) -> None:
    """Cancel a run's Slurm job (scancel) and record it in the run's event log."""
    from hpcds.cli.sweep_cmd import cancel_sweep

    if cancel_sweep(runs_root, name, StatusSource().rows):  # a sweep: its whole job array
        return
    run_dir = select_run(runs_root, name)
    job_ids = runs.read_meta(run_dir).get("job_ids") or []
    if not job_ids:
        raise HpcdsError(f"run {run_dir.name} has no Slurm job (created with --dry-run or run locally)")
    job_id = str(job_ids[-1])
    # scancel exits 0 even for a job id Slurm does not know: ask first, so a finished run is not marked cancelled.
    (row,) = StatusSource().rows([run_dir])
    if row.source != "squeue" or not row.active:
        raise HpcdsError(f"run {run_dir.name}: job {job_id} is not pending or running ({row.state}); nothing to cancel")
    slurm.scancel(job_id)
    runs.append_event(run_dir, "cancelled", job_id=allocation_job_id(job_id, runs.read_events(run_dir)))
    console.print(f"cancelled job {job_id} of run {run_dir.name}")


@click.command(context_settings=COMMAND_SETTINGS)
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
def launch(run_dir: Path) -> None:
    """Inside a Slurm job, once per node (srun): write the hostfile and start this node's DeepSpeed ranks."""
    from hpcds.launch import launch_node

    launch_node(run_dir)


COMMANDS = [status, logs, cancel, launch]
