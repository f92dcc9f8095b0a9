"""`hpcds submit`: the run directory (resolved spec, DeepSpeed config, batch script, W&B id, versions) + one
`sbatch --parsable`. When sbatch is missing or refuses, the run directory is removed again and the error shows
Slurm's stderr. Nodes that earlier runs of the same spec excluded recently are left out (`--exclude`). Nothing here
imports torch or DeepSpeed.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from hpcds import facts, runs, slurm
from hpcds.cli import COMMAND_SETTINGS
from hpcds.cli.common import console, err_console, force_option, print_json, runs_root_option, spec_options
from hpcds.errors import HpcdsError


@click.command(context_settings=COMMAND_SETTINGS)
@spec_options
@runs_root_option
@click.option("--name", help="Run name prefix (default: the spec's name).")
@click.option("--dry-run", is_flag=True, help="Create the run directory and print its paths; do not submit.")
@click.option("--check-memory", is_flag=True, help="Print the memory plan and exit without submitting.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--resume",
    metavar="RUN",
    help="Continue RUN (its checkpoints, optimizer state, W&B id) with SPEC's safe changes instead of a new run.",
)
@click.option(
    "--after",
    metavar="RUN[,RUN...]",
    help="Start only once these runs' jobs have finished successfully (sbatch --dependency=afterok).",
)
@force_option
def submit(spec, spec_path, runs_root: Path, name, dry_run, check_memory, as_json, resume, after, force) -> None:
    """Submit SPEC to Slurm as a new run (sbatch), creating its run directory."""
    if name:
        from hpcds.spec import deep_merge, validate_spec

        spec = validate_spec(deep_merge(spec.model_dump(mode="json"), {"name": name}), "--name")
    if check_memory:
        from hpcds.cli.plan_cmd import print_plan

        print_plan(spec)
        return
    after_dirs = [runs.find_run(runs_root, item.strip()) for item in (after or "").split(",") if item.strip()]
    resumed = runs.find_run(runs_root, resume) if resume else None
    if resumed is not None and dry_run:
        raise HpcdsError("--dry-run creates a new run directory; --resume changes an existing one: give one of them")
    run_dir, job_id = submit_run(spec, runs_root, dry_run=dry_run, force=force, after=after_dirs, resume=resumed)
    result = {
        "name": run_dir.name,
        "job_id": job_id,
        "run_dir": str(run_dir),
        "script": str(run_dir / facts.SCRIPT_FILE),
        "output": str(run_dir / f"slurm-{job_id or '%j'}.out"),
        "wandb_id": runs.read_meta(run_dir).get("wandb_id"),
    }
    if as_json:
        print_json(result)
        return
    verb = "created (not submitted)" if dry_run else f"submitted as job {job_id}"
    if resumed is not None:
        verb = f"continued as job {job_id}"
    console.print(f"run [bold]{result['name']}[/] {verb}")
    for key in ("run_dir", "script", "output"):
        console.print(f"  {key:8} {result[key]}")
    if not dry_run:
        console.print(f"  status   hpcds status {result['name']}")


def submit_run(
    spec,
    runs_root: Path,
    *,
    dry_run: bool = False,
    force: bool = False,
    after: list[Path] = (),
    resume: Path | None = None,
) -> tuple[Path, str | None]:
    """Create the run directory (or continue `resume`'s) and (unless dry_run) submit it, after the jobs of the runs
    in `after`; a new run directory is not left behind when sbatch fails."""
    from hpcds.cli.continuing import continue_run, dependency_jobs, describe, pin_init_from, pin_to_run
    from hpcds.cli.render_cmd import checked_run_files, record_forced
    from hpcds.render import hpcds_command, render_sbatch
    from hpcds.snapshot import write_snapshot_of_new_run

    spec = pin_to_run(resume, spec) if resume is not None else pin_init_from(spec, runs_root, after)
    pinned, files, forced = checked_run_files(spec, force)
    hpcds_cmd = hpcds_command(snapshot=pinned.slurm.snapshot)
    waits_for = dependency_jobs(after)

    def files_for(run_dir: Path) -> dict[str, str]:
        return {**files, facts.SCRIPT_FILE: render_sbatch(pinned, str(run_dir), hpcds_cmd)}

    if resume is not None:
        record = continue_run(resume, files_for(resume), local=False)
        for line in describe(record):
            err_console.print(line, highlight=False, markup=False)
        run_dir = resume
    else:
        meta = {"wandb_id": runs.new_wandb_id(), "spec_name": spec.name, "hpcds_command": hpcds_cmd}
        run_dir = runs.create_run(runs_root, pinned.name, files_for, meta=meta)
        if pinned.slurm.snapshot:  # the copy of hpcds the job runs; the new run directory goes if it fails
            write_snapshot_of_new_run(run_dir)
    record_forced(run_dir, forced)
    if after:
        runs.update_meta(run_dir, after=[d.name for d in after])
    if dry_run:
        return run_dir, None
    exclude = exclude_at_submit(pinned, runs_root, but=run_dir)
    try:
        job_id = sbatch_run(run_dir, exclude=exclude, after_jobs=waits_for)
    except BaseException:
        if resume is None:
            runs.remove_run(run_dir)
        raise
    return run_dir, job_id


def sbatch_run(run_dir: Path, exclude: list[str] = (), after_jobs: list[str] = ()) -> str:
    """Submit a run directory's batch script (from inside the run directory) and record the job id. `exclude`
    replaces the script's own `--exclude` (sbatch's command line wins over #SBATCH lines): give them all.
    `after_jobs`: job ids that must end successfully first (afterok; a requeued job keeps its id)."""
    script = run_dir / facts.SCRIPT_FILE
    extra = [f"--exclude={','.join(exclude)}"] if exclude else []
    extra += [f"--dependency=afterok:{':'.join(after_jobs)}"] if after_jobs else []
    job_id = slurm.sbatch(script, cwd=run_dir, extra_args=extra)
    job_ids = [str(j) for j in runs.read_meta(run_dir).get("job_ids") or []]
    runs.update_meta(run_dir, job_ids=[*job_ids, job_id])
    # The job name lets status tell this job from a later one that got the same id (a reinstalled controller).
    names = [
        line.split("=", 1)[1].strip() for line in script.read_text().splitlines() if line.startswith(JOB_NAME_FLAG)
    ]
    runs.append_event(
        run_dir,
        "submitted",
        job_id=job_id,
        job_name=names[0] if names else None,
        exclude=list(exclude),
        **({"dependency": f"afterok:{':'.join(after_jobs)}"} if after_jobs else {}),
    )
    return job_id


# How long a node that a run's batch script excluded is left out of new submits of the same spec: long enough for
# the next tries of a week's work, short enough that a repaired node comes back.
BAD_NODE_MEMORY_S = 7 * 86400


def exclude_at_submit(pinned, runs_root: Path, *, but: Path) -> list[str]:
    """sbatch's `--exclude` nodes for a new job of `pinned`: its own plus those earlier runs of the spec excluded
    recently (said on stderr), or [] when there are none of the latter (the script's own line then stands)."""
    avoid = recently_bad_nodes(runs_root, pinned.name, but=but) if pinned.slurm.exclude_bad_nodes else []
    if not avoid:
        return []
    err_console.print(
        f"leaving out {','.join(avoid)}: excluded by earlier runs of {pinned.name} within "
        f"{BAD_NODE_MEMORY_S // 86400} days (hpcds status --nodes)",
        highlight=False,
    )
    own = [flag.split("=", 1)[1] for flag in pinned.slurm.extra_sbatch if flag.startswith("--exclude=")]
    return [*own, *avoid]


def recently_bad_nodes(runs_root: Path, name: str, *, but: Path) -> list[str]:
    """Nodes excluded by the batch scripts of earlier runs named `name` (run directories `<name>-<time>`)."""
    from hpcds.slurm.status import nodes_to_avoid

    records = [
        r
        for d in runs.list_runs(runs_root)
        if d.name.startswith(f"{name}-") and d != but
        for r in runs.read_bad_nodes(d)
    ]
    return nodes_to_avoid(records, time.time(), BAD_NODE_MEMORY_S)


JOB_NAME_FLAG = "#SBATCH --job-name="


COMMANDS = [submit]
