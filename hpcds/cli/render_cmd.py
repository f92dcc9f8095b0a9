"""`hpcds render` prints what a run would be given (the batch script, or the DeepSpeed JSON); `hpcds prepare` creates
a run directory inside an allocation for the generic sbatch/ templates, and finds it again when Slurm requeues the job.

`write_run_dir` is the one place that turns a spec into a run directory (resolved spec, DeepSpeed config, batch
script), for `prepare` here and for whoever else creates runs. Light on purpose (login nodes): no torch, no deepspeed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from hpcds import facts
from hpcds.cli import COMMAND_SETTINGS
from hpcds.cli.common import force_option, runs_root_option, spec_options
from hpcds.errors import HpcdsError
from hpcds.spec import JobSpec

PREPARED_JOB_KEY = "prepared_for_job"


def fitting(pinned: JobSpec, force: bool) -> str | None:
    """None when the pinned strategy fits its GPUs and the warning's lead covers a save; the planner's verdict when
    not and `force` says go ahead (the caller records it); an error otherwise, before anything is created or queued."""
    from hpcds.plan import refusals

    found = refusals(pinned)
    why = "\n".join(found) if found else None
    if why is not None and not force:
        raise HpcdsError(why)
    if why is not None:
        click.echo(f"warning (--force): {why.splitlines()[0]}", err=True)
    return why


def checked_run_files(spec: JobSpec, force: bool = False) -> tuple[JobSpec, dict[str, str], str | None]:
    """The pinned spec, the run's files (`hpcds.render.render_run_files`) and the planner's refusal that `force`
    overrode, after two checks: the planner's (`fitting`), and DeepSpeed's own config classes accept the
    DeepSpeed config (what they refuse raises here, before anything is created or queued; keys they would ignore are
    warned about on stderr)."""
    import json

    from hpcds.deepspeed_check import check_with_deepspeed
    from hpcds.render import render_run_files

    pinned, files = render_run_files(spec)
    forced = fitting(pinned, force)
    ignored = check_with_deepspeed(json.loads(files[facts.DS_CONFIG_FILE]), pinned.world_size, spec.name)
    for problem in ignored:
        click.echo(f"warning: {problem}", err=True)
    return pinned, files, forced


def write_run_dir(
    spec: JobSpec, runs_root: Path, meta: dict[str, Any] | None = None, force: bool = False
) -> tuple[Path, JobSpec]:
    """Pin the strategy and create `<runs_root>/<name>-<stamp>` with spec.yaml, ds_config.json and job.sbatch (which
    calls this interpreter's hpcds by absolute path, so the job needs no activated environment)."""
    from hpcds import runs
    from hpcds.render import check_run_dir, hpcds_command, render_sbatch

    pinned, files, forced = checked_run_files(spec, force)
    check_run_dir(str(Path(runs_root).absolute() / spec.name))  # fail before creating anything

    def files_for(run_dir: Path) -> dict[str, str]:
        script = render_sbatch(pinned, str(run_dir), hpcds_command())
        return {
            facts.SPEC_FILE: files["spec.yaml"],
            facts.DS_CONFIG_FILE: files["ds_config.json"],
            facts.SCRIPT_FILE: script,
        }

    full_meta = {"wandb_id": runs.new_wandb_id(), "spec_name": spec.name, **(meta or {})}
    run_dir = runs.create_run(Path(runs_root), spec.name, files_for, full_meta)
    record_forced(run_dir, forced)
    return run_dir, pinned


def record_forced(run_dir: Path, forced: str | None) -> None:
    """A `forced` event in a run created with --force over the planner's refusal, which it quotes."""
    if forced is not None:
        from hpcds import runs

        runs.append_event(run_dir, "forced", verdict=forced.splitlines()[0])


def find_prepared_run(runs_root: Path, job_id: str) -> Path | None:
    """The run directory `prepare` made for this Slurm job id earlier (a requeued job keeps its id)."""
    from hpcds import runs

    for run_dir in reversed(runs.list_runs(runs_root)):
        if str(runs.read_meta(run_dir).get(PREPARED_JOB_KEY)) == job_id:
            return run_dir.absolute()
    return None


@click.command(context_settings=COMMAND_SETTINGS)
@spec_options
@click.option("--ds-config", is_flag=True, help="Print the DeepSpeed JSON config instead of the batch script.")
@click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory the script names (default: where `hpcds submit` would create it now).",
)
@runs_root_option
@force_option
def render(
    spec: JobSpec, spec_path: Path | None, ds_config: bool, run_dir: Path | None, runs_root: Path, force: bool
) -> None:
    """Print the batch script for SPEC (or its DeepSpeed config) without creating or submitting anything.

    The script is what the run directory's job.sbatch would hold (it passes `bash -n` and shellcheck); the
    DeepSpeed config has the ZeRO stage pinned as `hpcds submit` would pin it.
    """
    from hpcds.plan import pin_strategy
    from hpcds.render import hpcds_command, render_ds_config_json, render_sbatch

    pinned = pin_strategy(spec)
    fitting(pinned, force)
    if ds_config:
        click.echo(render_ds_config_json(pinned), nl=False)
        return
    if run_dir is None:
        run_dir = Path(runs_root) / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    click.echo(render_sbatch(pinned, str(Path(run_dir).absolute()), hpcds_command()), nl=False)


# spec_options' arguments and flags, with the loading left to `prepare`: a requeued job must find its run directory
# even if the spec file was edited or removed since the first start.
_spec_loader = spec_options(lambda **loaded: loaded)
_SPEC_PARAMS = [param.name for param in _spec_loader.__click_params__]


def _spec_params_loaded_later(func):
    func.__click_params__ = [*getattr(func, "__click_params__", []), *_spec_loader.__click_params__]
    return func


@click.command(context_settings=COMMAND_SETTINGS)
@_spec_params_loaded_later
@runs_root_option
@click.option(
    "--job-id",
    envvar="SLURM_JOB_ID",
    help="Slurm job id the run belongs to; the same id finds the same run again (default: $SLURM_JOB_ID).",
)
def prepare(runs_root: Path, job_id: str | None, **spec_args: Any) -> None:
    """Create the run directory for SPEC and print its path (used inside a job by the sbatch/ templates).

    With a job id, a second call for the same id (a requeued job) prints the run directory made the first time and
    changes nothing in it, so the run resumes with its pinned strategy and W&B id (the spec file is not read again).
    """
    if job_id is not None:
        job_id = job_id.strip()
        if not job_id.isdigit() and not job_id.replace("_", "").isdigit():
            raise HpcdsError(f"--job-id {job_id!r} is not a Slurm job id (digits, or ARRAYID_TASK)")
        found = find_prepared_run(runs_root, job_id)
        if found is not None:
            click.echo(str(found))
            return
    loaded = _spec_loader(**{name: spec_args[name] for name in _SPEC_PARAMS})
    spec_path = loaded["spec_path"]
    meta: dict[str, Any] = {"source": str(spec_path) if spec_path else None}
    if job_id is not None:
        meta.update({PREPARED_JOB_KEY: job_id, "job_ids": [job_id]})
    run_dir, _ = write_run_dir(loaded["spec"], runs_root, meta)
    click.echo(str(run_dir))


COMMANDS = [render, prepare]
