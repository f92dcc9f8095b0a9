"""`hpcds resume RUN [--set ...]`: continue a run from its own spec.yaml plus changes, where it ran before.

A Slurm run gets its batch script rendered again and its run directory submitted again (a new job id, the same
run directory, checkpoints and W&B id); a local run trains on this machine again, as `hpcds run` would. The changes
go through the same checks as `hpcds run|submit SPEC --resume RUN` (hpcds.cli.continuing). Nothing here imports torch.
"""

from __future__ import annotations

import os

import click

from hpcds import facts, runs
from hpcds.cli import COMMAND_SETTINGS
from hpcds.cli.common import console, force_option, runs_root_option


@click.command(context_settings=COMMAND_SETTINGS)
@click.argument("name", metavar="RUN")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change a field of the run's spec, e.g. --set training.max_steps=2000 (repeatable).",
)
@click.option("--ranks", type=click.IntRange(min=1), help="Local runs: processes on this machine (default: as before).")
@click.option("--after", metavar="RUN[,RUN...]", help="Slurm runs: start only once these runs' jobs have succeeded.")
@runs_root_option
@force_option
def resume(name, sets, ranks, after, runs_root, force) -> None:
    """Continue RUN from its last checkpoint with its own spec and --set changes (Slurm runs are submitted again)."""
    from hpcds.spec import load_spec

    run_dir = runs.find_run(runs_root, name)
    local = bool(runs.read_meta(run_dir).get("local"))
    unused = "--after" if local and after else "--ranks" if not local and ranks else None
    if unused:  # said, not dropped: the run would go on without what was asked
        kind = "a local run: it starts when this command runs" if local else "a Slurm run: its ranks are its spec's"
        hint = "" if local else f" (--set slurm.ranks_per_node={ranks})"
        raise click.UsageError(f"{unused} does not apply to {run_dir.name}, {kind}{hint}")
    spec = load_spec(run_dir / facts.SPEC_FILE, list(sets))
    if local:
        from hpcds.cli.train_cmd import _say, local_spec, prepare_run, train_here
        from hpcds.launch import local_devices

        spec = local_spec(spec, ranks)
        devices = local_devices(spec.slurm.ranks, None, os.environ) if spec.slurm.gpus_per_node else []
        prepare_run(spec, runs_root, force=force, resume=run_dir)
        _say(f"resuming run: {run_dir}")
        train_here(run_dir, spec.slurm.ranks, devices)
        return
    from hpcds.cli.submit_cmd import submit_run

    after_dirs = [runs.find_run(runs_root, item.strip()) for item in (after or "").split(",") if item.strip()]
    _, job_id = submit_run(spec, runs_root, force=force, after=after_dirs, resume=run_dir)
    console.print(f"run [bold]{run_dir.name}[/] continued as job {job_id}", highlight=False)
    console.print(f"  status   hpcds status {run_dir.name}", highlight=False)


COMMANDS = [resume]
