"""`hpcds run` (train on this machine through DeepSpeed's launcher) and `hpcds sync` (upload offline W&B runs).

`hpcds run SPEC` resolves the spec for one node with `--ranks` processes, then reuses the newest unfinished run
directory under the runs root whose resolved spec is identical (so running the same command again resumes), or
creates a new one like `hpcds submit` does, and starts the same launcher path as a Slurm node. Torch, DeepSpeed and
wandb are never imported here: the ranks import them, in their own processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click

from hpcds import facts, runs
from hpcds.cli import COMMAND_SETTINGS
from hpcds.cli.common import console, force_option, runs_root_option, spec_options
from hpcds.cli.continuing import is_finished
from hpcds.errors import CommandError, HpcdsError
from hpcds.facts import EXIT_REQUEUE

# Trainer events that end a launch, newest wins.
_ENDINGS = ("finished", "stopped", "error")


def _say(text: str) -> None:
    # Paths must survive copy-paste: no wrapping, no markup parsing of '[' in folder names.
    console.print(text, soft_wrap=True, markup=False, highlight=False)


def local_spec(spec, ranks: int | None, gpus: list[int] | None = None):
    """The spec as one node with `ranks` processes (default: the spec's ranks per node, or one per GPU of `gpus`)."""
    from hpcds.spec import deep_merge, validate_spec

    slurm: dict = {"nodes": 1}
    if gpus:
        if ranks and ranks != len(gpus):
            raise HpcdsError(f"--gpus names {len(gpus)} GPUs but --ranks is {ranks}: hpcds runs one rank per GPU")
        slurm |= {"gpus_per_node": len(gpus)}
        ranks = len(gpus)
    slurm["ranks_per_node"] = ranks or spec.slurm.ranks
    return validate_spec(deep_merge(spec.model_dump(mode="json"), {"slurm": slurm}), "hpcds run")


def parse_gpus(ctx, param, value: str | None) -> list[int] | None:
    from hpcds.launch import device_ids

    if value is None:
        return None
    ids = device_ids(value)
    if ids is None:
        raise click.BadParameter(f"{value!r} is not a list of GPU indices such as 0,1")
    return ids


def find_resumable_run(root: Path, spec_text: str) -> Path | None:
    """The newest unfinished run under `root` whose resolved spec.yaml is exactly `spec_text`."""
    for run_dir in reversed(runs.list_runs(root)):
        try:
            same = (run_dir / facts.SPEC_FILE).read_text() == spec_text
        except OSError:
            continue
        if same and not is_finished(run_dir):
            return run_dir
    return None


def same_name_run(root: Path, name: str) -> Path | None:
    """The newest local run under `root` made from a spec named `name` (a Slurm run of the name is no run that
    `hpcds run` would have resumed)."""
    for run_dir in reversed(runs.list_runs(root)):
        meta = runs.read_meta(run_dir)
        if meta.get("spec_name") == name and meta.get("local"):
            return run_dir
    return None


def other_spec_error(run_dir: Path, spec_text: str) -> HpcdsError:
    """`hpcds run` found a run of the same name that it will not silently reuse or pass over: say what differs and
    name --resume and --new."""
    import yaml

    from hpcds.spec.continuation import compare_specs

    progress = runs.read_json(run_dir / facts.PROGRESS_FILE, {}) or {}
    step = progress.get("step")
    where = f"finished at step {step}" if is_finished(run_dir) else f"unfinished (step {step or 0})"
    comparison = compare_specs(yaml.safe_load((run_dir / facts.SPEC_FILE).read_text()), yaml.safe_load(spec_text))
    changes = [*comparison.safe, *comparison.refused]
    listed = "".join(f"\n  - {c}" for c in changes[:10])
    listed += f"\n  ... {len(changes) - 10} more" if len(changes) > 10 else ""
    what = f"a spec that differs from this one:{listed}" if changes else "this same spec"
    resume = ""
    if changes and not comparison.refused:
        resume = f"`hpcds run SPEC --resume {run_dir.name}` to continue it with these changes, or "
    elif not changes:
        resume = f"`--resume {run_dir.name}` with a larger training.max_steps to train it on, or "
    return HpcdsError(
        f"run {run_dir.name} ({where}) was made from {what}\nhint: {resume}`--new` to start a new run from step 0"
    )


def prepare_run(
    spec, root: Path, *, new: bool = False, force: bool = False, resume: Path | None = None
) -> tuple[Path, bool]:
    """(run directory, reused?) for a local run of `spec` (already one node): `resume`'s run continued with the spec
    (changes recorded), else the newest unfinished run with the identical spec, else a new run (`new`, or no run of
    this name: a run of the same name with another spec, or finished, is an error naming --resume and --new)."""
    from hpcds.cli.continuing import continue_run, describe, pin_init_from, pin_to_run
    from hpcds.cli.render_cmd import checked_run_files, record_forced

    spec = pin_to_run(resume, spec) if resume is not None else pin_init_from(spec, root)
    pinned, files, forced = checked_run_files(spec, force)
    if resume is not None:
        record = continue_run(resume, files, local=True)
        for line in describe(record):
            _say(line)
        return resume, True
    if not new:
        found = find_resumable_run(root, files[facts.SPEC_FILE])
        if found is not None:
            return found, True
        named = same_name_run(root, spec.name)
        if named is not None:
            raise other_spec_error(named, files[facts.SPEC_FILE])
    run_dir = runs.create_run(
        root,
        pinned.name,
        lambda _: files,
        meta={"wandb_id": runs.new_wandb_id(), "spec_name": spec.name, "local": True},
    )
    record_forced(run_dir, forced)
    return run_dir, False


def last_ending(run_dir: Path, since_time: float) -> dict | None:
    found = None
    for event in runs.read_events(run_dir):
        if event["event"] in _ENDINGS and event.get("time", 0) >= since_time:
            found = event
    return found


@click.command("run", context_settings=COMMAND_SETTINGS)
@spec_options
@click.option("--ranks", type=click.IntRange(min=1), help="Processes on this machine (default: the spec's ranks).")
@click.option(
    "--gpus",
    callback=parse_gpus,
    metavar="IDS",
    help="GPU indices to train on, one rank each (e.g. 0,1); default: CUDA_VISIBLE_DEVICES, else the first GPUs.",
)
@click.option("--new", is_flag=True, help="Start a new run even if a run of this name exists.")
@click.option(
    "--resume",
    "resume",
    metavar="RUN",
    help="Continue RUN (its checkpoints, optimizer state, W&B id) with SPEC's safe changes, e.g. more steps.",
)
@runs_root_option
@force_option
def run_command(spec, spec_path, ranks, gpus, new, resume, runs_root, force):
    """Train SPEC on this machine (CPU ranks on gloo, or the GPUs); Ctrl-C saves, the same command resumes."""
    from hpcds.launch import local_devices

    spec = local_spec(spec, ranks, gpus)
    devices = local_devices(spec.slurm.ranks, gpus, os.environ) if spec.slurm.gpus_per_node else []
    if new and resume:
        raise HpcdsError("--new starts a new run and --resume continues one: give one of them")
    resumed = runs.find_run(runs_root, resume) if resume else None
    run_dir, reused = prepare_run(spec, runs_root, new=new, force=force, resume=resumed)
    _say(f"{'resuming run' if reused else 'new run'}: {run_dir}")
    train_here(run_dir, spec.slurm.ranks, devices)


def train_here(run_dir: Path, ranks: int, devices: list[int]) -> None:
    """Start DeepSpeed's ranks on this machine for `run_dir` and say how it ended (exit 75 when stopped)."""
    import time

    from hpcds.launch import launch_local

    started = time.time()
    code = launch_local(run_dir, ranks, devices)
    ending = last_ending(run_dir, started)
    kind = ending["event"] if ending else None
    if kind == "finished":
        _say(f"finished at step {ending.get('step')}: {run_dir}")
        return
    if kind == "stopped":
        _say(f"stopped at step {ending.get('step')}; run the same command to resume")
        # sys.exit, not click's Exit: the CLI runs click with standalone_mode=False, which returns Exit's code.
        sys.exit(EXIT_REQUEUE)
    message = ending.get("message") if ending else None
    raise HpcdsError(
        f"training exited with code {code}"
        + (f": {message}" if message else "")
        + f"\nhint: the ranks' output is above; events are in {run_dir / facts.EVENTS_FILE}"
    )


def _wandb_key_available() -> bool:
    from hpcds.train.logging import read_netrc_text

    return bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in read_netrc_text()


@click.command("sync", context_settings=COMMAND_SETTINGS)
@click.argument("run")
@runs_root_option
def sync_command(run, runs_root):
    """Upload a run's offline W&B logs (one folder per trainer start, all into the same W&B run)."""
    from hpcds.train.logging import offline_run_dirs

    run_dir = runs.find_run(runs_root, run)
    folders = offline_run_dirs(run_dir)
    if not folders:
        raise HpcdsError(f"{run_dir} has no offline W&B logs (wandb/offline-run-*): W&B was online or disabled")
    if not _wandb_key_available():
        raise HpcdsError(
            "W&B has no API key here: run `wandb login` (or set WANDB_API_KEY) on a machine with "
            f"network, then `hpcds sync {run}` again"
        )
    beside = Path(sys.executable).parent / "wandb"
    wandb_cmd = str(beside) if beside.is_file() else shutil.which("wandb") or "wandb"
    argv = [wandb_cmd, "sync", *map(str, folders)]
    _say(f"uploading {len(folders)} offline folder{'s' if len(folders) != 1 else ''} of {run_dir.name}")
    try:
        result = subprocess.run(argv, capture_output=True, text=True)
    except OSError as exc:
        raise CommandError(argv, None, str(exc), hint="install wandb in this environment") from None
    if result.returncode != 0:
        raise CommandError(argv, result.returncode, result.stderr or result.stdout)
    _say(result.stdout.strip())


COMMANDS = [run_command, sync_command]
