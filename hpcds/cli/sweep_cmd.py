"""`hpcds sweep`: one spec over a grid of values as ONE Slurm job array, one run directory per task.

Every grid point is validated first, then planned and checked with DeepSpeed, every problem of every point at once.
Then the sweep folder `<runs>/<name>-sweep-<time>/` (not a run: no meta.json) and one ordinary run directory per task
`<runs>/<name>-t<i>-<time>/` (its resolved spec, DeepSpeed config, own W&B id; the W&B group is the sweep's name
through WANDB_RUN_GROUP, which wandb.init reads) are created, and one `sbatch --array=0-N[%K]` of the sweep folder's
job.sbatch is submitted. Task i finds its run directory in the script's table by SLURM_ARRAY_TASK_ID; its Slurm output
reaches it through the sweep folder's `t<i>` link. Each task's job.sbatch is the same job for that run directory
alone (`sbatch job.sbatch` there reruns one task). Nothing here imports torch or DeepSpeed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import click

from hpcds import facts, runs, slurm
from hpcds.cli import COMMAND_SETTINGS
from hpcds.cli.common import console, force_option, print_json, runs_root_option, spec_options
from hpcds.errors import HpcdsError

SWEEP_FILE = "sweep.json"  # in the sweep folder: the grid, the array job id, and task -> run directory
WANDB_GROUP_ENV = "WANDB_RUN_GROUP"


@click.command(context_settings=COMMAND_SETTINGS)
@spec_options
@runs_root_option
@click.option(
    "--grid",
    "axes",
    multiple=True,
    metavar="KEY=V1,V2,...",
    help="A field and its values, e.g. --grid training.lr=1e-4,3e-4 (repeatable: every combination is a task).",
)
@click.option(
    "--max-parallel",
    type=click.IntRange(min=1),
    help="Tasks running at once (--array=0-N%K; default: as many as Slurm starts).",
)
@click.option("--name", help="Name prefix of the sweep and its runs (default: the spec's name).")
@click.option("--dry-run", is_flag=True, help="Create the sweep folder and run directories; do not submit.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@force_option
def sweep(spec, spec_path, runs_root: Path, axes, max_parallel, name, dry_run, as_json, force) -> None:
    """Submit SPEC once per point of a grid as one Slurm job array, one run directory per task."""
    if name:
        from hpcds.spec import deep_merge, validate_spec

        spec = validate_spec(deep_merge(spec.model_dump(mode="json"), {"name": name}), "--name")
    record = submit_sweep(spec, list(axes), runs_root, max_parallel=max_parallel, dry_run=dry_run, force=force)
    if as_json:
        print_json(record)
        return
    verb = "created (not submitted)" if dry_run else f"submitted as job array {record['job_id']}"
    console.print(f"sweep [bold]{record['name']}[/] {verb}: {len(record['tasks'])} tasks")
    for task in record["tasks"]:
        console.print(f"  {task['index']:>3}  {task['run']}  {task['label']}", highlight=False, markup=False)
    console.print(f"  script  {record['script']}")
    if not dry_run:
        console.print(f"  status  hpcds status {record['name']}   cancel  hpcds cancel {record['name']}")


def submit_sweep(
    spec, axes: list[str], runs_root: Path, *, max_parallel: int | None = None, dry_run: bool = False, force=False
) -> dict[str, Any]:
    """Validate and check every point, create the sweep folder and one run directory per task, and (unless dry_run)
    submit the job array; nothing is left behind when a check or sbatch fails."""
    from hpcds.cli.continuing import pin_init_from
    from hpcds.spec.grid import expand, parse_grid, point_label, point_specs

    grid = parse_grid(axes)
    points = expand(grid)
    base = spec.model_dump(mode="json")
    point_specs(base, points, "hpcds sweep")  # every point's problems before anything is created
    runs_root = Path(runs_root).absolute()
    sweep_dir = _new_sweep_dir(runs_root, spec.name)
    created: list[Path] = []
    try:
        env = base.setdefault("slurm", {}).setdefault("env", {})
        env.setdefault(WANDB_GROUP_ENV, sweep_dir.name)  # one W&B group, unless the spec names its own
        specs = [pin_init_from(point_spec, runs_root) for point_spec in point_specs(base, points, "hpcds sweep")]
        checked = _checked_points(specs, points, force)
        record = _create_tasks(sweep_dir, runs_root, checked, points, max_parallel, created)
        record["axes"] = [[key, values] for key, values in grid]
        for task, point in zip(record["tasks"], points, strict=True):
            task["label"] = point_label(point)
        runs.write_json_atomic(sweep_dir / SWEEP_FILE, record)
        job_id = None if dry_run else _sbatch(sweep_dir, checked[0][0], runs_root)
    except BaseException:
        for path in [*created, sweep_dir]:
            shutil.rmtree(path, ignore_errors=True)
        raise
    if job_id is not None:  # from here on the array's jobs use the directories: nothing is removed
        _record_job(sweep_dir, record, job_id, runs_root)
    return record


def _new_sweep_dir(runs_root: Path, name: str) -> Path:
    """`<runs>/<name>-sweep-<time>[-N]`, made with one mkdir (which fails when another sweep got the name first)."""
    from hpcds.render import check_run_dir

    runs_root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    check_run_dir(str(runs_root / f"{name}-sweep-{stamp}"))  # a path an #SBATCH line can hold, before anything
    for attempt in range(1, 1000):
        path = runs_root / (f"{name}-sweep-{stamp}" if attempt == 1 else f"{name}-sweep-{stamp}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise HpcdsError(f"no free sweep name for {name!r} under {runs_root}")


def _checked_points(specs: list, points: list[dict], force: bool) -> list[tuple[Any, dict[str, str], str | None]]:
    """Each point's pinned spec and files after the planner's and DeepSpeed's checks; all refusals at once."""
    from hpcds.cli.render_cmd import checked_run_files
    from hpcds.spec.grid import point_label

    checked, problems = [], []
    for index, (point_spec, point) in enumerate(zip(specs, points, strict=True)):
        try:
            checked.append(checked_run_files(point_spec, force))
        except HpcdsError as exc:
            problems.append(f"task {index} ({point_label(point)}): {exc}")
    if problems:
        raise HpcdsError("\n".join(problems))
    return checked


def _create_tasks(sweep_dir: Path, runs_root: Path, checked, points, max_parallel, created: list[Path]) -> dict:
    """One run directory per task, the links the array's output goes through, and the array's batch script, which
    must be the same for every point (one job array runs one script)."""
    from hpcds.cli.render_cmd import record_forced
    from hpcds.render import hpcds_command, render_sbatch

    snapshot = bool(getattr(checked[0][0].slurm, "snapshot", False))
    hpcds_cmd = hpcds_command(snapshot=snapshot)
    tasks = []
    for index, (pinned, files, forced) in enumerate(checked):

        def files_for(run_dir: Path, pinned=pinned, files=files) -> dict[str, str]:
            return {**files, facts.SCRIPT_FILE: render_sbatch(pinned, str(run_dir), hpcds_cmd)}

        meta = {"wandb_id": runs.new_wandb_id(), "spec_name": pinned.name, "hpcds_command": hpcds_cmd}
        meta |= {"sweep": sweep_dir.name, "sweep_task": index, "grid_point": points[index]}
        run_dir = runs.create_run(runs_root, f"{pinned.name}-t{index}", files_for, meta=meta)
        created.append(run_dir)
        if snapshot:
            from hpcds.snapshot import write_snapshot_of_new_run

            write_snapshot_of_new_run(run_dir)
        record_forced(run_dir, forced)
        os.symlink(os.path.join("..", run_dir.name), sweep_dir / f"t{index}")
        tasks.append({"index": index, "run": run_dir.name, "point": points[index]})
    dirs = [str(runs_root / task["run"]) for task in tasks]
    scripts = [
        render_sbatch(pinned, str(sweep_dir), hpcds_cmd, array_tasks=dirs, max_parallel=max_parallel)
        for pinned, _, _ in checked
    ]
    differ = [index for index, script in enumerate(scripts) if script != scripts[0]]
    if differ:
        raise HpcdsError(
            f"the batch script of task {differ[0]} differs from task 0's (the planner pinned other Slurm settings "
            f"for its point), and one job array runs one script\nhint: give the sweep settings that fit every point "
            f"(--set deepspeed.zero_stage=..., slurm.*), or sweep those points separately"
        )
    runs.write_text_atomic(sweep_dir / facts.SCRIPT_FILE, scripts[0])
    created_s = time.time()
    return {
        "name": sweep_dir.name,
        "created": created_s,
        "spec_name": checked[0][0].name,
        "max_parallel": max_parallel,
        "job_id": None,
        "sweep_dir": str(sweep_dir),
        "script": str(sweep_dir / facts.SCRIPT_FILE),
        "tasks": tasks,
    }


def _sbatch(sweep_dir: Path, pinned, runs_root: Path) -> str:
    """One sbatch of the array's script, leaving out the nodes earlier runs of the spec excluded; its job id."""
    from hpcds.cli.submit_cmd import exclude_at_submit

    exclude = exclude_at_submit(pinned, runs_root, but=sweep_dir)
    extra = [f"--exclude={','.join(exclude)}"] if exclude else []
    return slurm.sbatch(sweep_dir / facts.SCRIPT_FILE, cwd=sweep_dir, extra_args=extra)


def _record_job(sweep_dir: Path, record: dict, job_id: str, runs_root: Path) -> None:
    """The array's job id in sweep.json, and each task's `<array job>_<task>` in its run directory (meta.json and a
    `submitted` event naming the sweep)."""
    from hpcds.cli.submit_cmd import JOB_NAME_FLAG

    record["job_id"] = job_id
    runs.write_json_atomic(sweep_dir / SWEEP_FILE, record)
    script = (sweep_dir / facts.SCRIPT_FILE).read_text().splitlines()
    job_name = next(line.split("=", 1)[1].strip() for line in script if line.startswith(JOB_NAME_FLAG))
    for task in record["tasks"]:
        run_dir, task_job = runs_root / task["run"], f"{job_id}_{task['index']}"
        runs.update_meta(run_dir, job_ids=[task_job])
        runs.append_event(
            run_dir, "submitted", job_id=task_job, job_name=job_name, sweep=record["name"], task=task["index"]
        )


def read_sweep(runs_root: Path, name: str) -> dict[str, Any] | None:
    """The sweep folder's record, by the sweep's name or path; None when `name` names no sweep."""
    for folder in (Path(name), Path(runs_root) / name):
        try:
            record = json.loads((folder / SWEEP_FILE).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("tasks"):
            return {**record, "sweep_dir": str(folder.absolute())}
    return None


def sweep_runs(runs_root: Path, name: str) -> list[Path]:
    """The run directories of a sweep's tasks in task order (those still there); none when `name` is no sweep."""
    record = read_sweep(runs_root, name)
    if record is None:
        return []
    root = Path(record["sweep_dir"]).parent
    return [root / task["run"] for task in record["tasks"] if (root / task["run"] / facts.META_FILE).is_file()]


def cancel_sweep(runs_root: Path, name: str, status_rows) -> bool:
    """`hpcds cancel SWEEP`: one scancel of the array job (every task, pending or running), recorded in the event
    log of each task it stopped; `status_rows` is hpcds status's rows for run directories. False when `name` is no
    sweep."""
    from hpcds.slurm.status import allocation_job_id

    record = read_sweep(runs_root, name)
    if record is None:
        return False
    if not record.get("job_id"):
        raise HpcdsError(f"sweep {record['name']} was never submitted (created with --dry-run)")
    task_dirs = sweep_runs(runs_root, name)
    rows = status_rows(task_dirs)
    active = [(d, row) for d, row in zip(task_dirs, rows, strict=True) if row.source == "squeue" and row.active]
    if not active:
        raise HpcdsError(f"sweep {record['name']}: no task of job array {record['job_id']} is pending or running")
    slurm.scancel(str(record["job_id"]))
    for run_dir, row in active:
        runs.append_event(run_dir, "cancelled", job_id=allocation_job_id(row.job_id, runs.read_events(run_dir)))
    console.print(f"cancelled job array {record['job_id']} of sweep {record['name']} ({len(active)} tasks)")
    return True


def sweep_titles(rows: list, cells: list[dict[str, str]]) -> tuple[list, list[dict[str, str]], dict[int, dict]]:
    """`hpcds status` rows with each sweep's tasks together (where its first task was, in task order), and a title
    line before each sweep's first task: its name, the array job and how many tasks are in which state."""
    order: dict[str, int] = {}
    for row in rows:
        order.setdefault(row.sweep or row.name, len(order))

    def key(pair) -> tuple[int, int]:
        row = pair[0]
        task = (row.job_id or "").rpartition("_")[2] if row.sweep else ""
        return order[row.sweep or row.name], int(task) if task.isdigit() else 0

    pairs = sorted(zip(rows, cells, strict=True), key=key)
    titles: dict[int, dict[str, str]] = {}
    for index, (row, _) in enumerate(pairs):
        if row.sweep and (index == 0 or pairs[index - 1][0].sweep != row.sweep):
            tasks = [r for r, _ in pairs if r.sweep == row.sweep]
            states: dict[str, int] = {}
            for task in tasks:
                states[task.state] = states.get(task.state, 0) + 1
            counts = ", ".join(f"{n} {state}" for state, n in states.items())
            array = (row.job_id or "-").partition("_")[0]
            titles[id(row)] = {"run": f"sweep {row.sweep}", "job": array, "state": f"{len(tasks)} tasks: {counts}"}
    return [row for row, _ in pairs], [cell for _, cell in pairs], titles


COMMANDS = [sweep]
