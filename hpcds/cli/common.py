"""Options and output helpers shared by the CLI commands.

`console` and `err_console` (rich Consoles for stdout and stderr) are made on first use: rich costs start-up time that
commands which print plain text (render, prepare) should not pay.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

_CONSOLES = {"console": {}, "err_console": {"stderr": True}}
# click context meta key: what spec_options filled from the model folder's config.json, for `plan` to print
SHAPE_NOTES_KEY = "hpcds.shape_notes"


def __getattr__(name: str) -> Any:
    # PEP 562: `from hpcds.cli.common import console` builds the Console then, once, and keeps it as a module global.
    if name not in _CONSOLES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from rich.console import Console

    globals()[name] = value = Console(highlight=False, **_CONSOLES[name])
    return value


def spec_options(func):
    """SPEC argument, --preset, repeated --set, and the explicit flags that win over everything.

    The loaded spec's unset shape fields are filled from its model folder's config.json (hpcds.model_folder), so
    every command sees the same model; the notes saying what came from where wait in the click context for `plan`.
    """

    @click.argument("spec_path", metavar="SPEC", required=False, type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--preset", help="Start from a preset instead of (or under) a SPEC file.")
    @click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a spec field, e.g. --set training.lr=1e-4 (repeatable).",
    )
    @click.option("--nodes", type=click.IntRange(min=1), help="Nodes (slurm.nodes).")
    @click.option("--gpus-per-node", type=click.IntRange(min=0), help="GPUs per node (slurm.gpus_per_node).")
    @click.option("--partition", help="Partition (slurm.partition).")
    @click.option("--time", "time_limit", help="Time limit, e.g. 24:00:00 (slurm.time).")
    @functools.wraps(func)
    def wrapper(*args, spec_path, preset, sets, nodes, gpus_per_node, partition, time_limit, **kwargs):
        from hpcds.model_folder import with_folder_shape
        from hpcds.spec import load_spec

        if spec_path is None and preset is None:
            raise click.UsageError("give a SPEC file or --preset NAME")
        flags = {"nodes": nodes, "gpus_per_node": gpus_per_node, "partition": partition, "time": time_limit}
        kwargs["spec"], notes = with_folder_shape(load_spec(spec_path, list(sets), flags, preset=preset))
        use_template_cache()
        context = click.get_current_context(silent=True)
        if context is not None:
            context.meta[SHAPE_NOTES_KEY] = notes
        kwargs["spec_path"] = spec_path
        return func(*args, **kwargs)

    return wrapper


def use_template_cache() -> None:
    """Batch-script templates compiled once and kept in hpcds's cache folder (hpcds.cli.template_cache), for the
    commands that render; set before the first render, as the renderer builds its jinja2 environment once."""
    from hpcds.cache import cache_dir
    from hpcds.cli.template_cache import TemplateCache
    from hpcds.render import sbatch

    if sbatch.bytecode_cache is not None:
        return
    folder = cache_dir()
    if folder is not None:  # else no home folder to be found: compile instead
        sbatch.bytecode_cache = TemplateCache(folder / "templates")


def force_option(func):
    """--force: go ahead over the planner's refusals (hpcds.plan.refusals); the run's event log records it."""
    return click.option(
        "--force",
        is_flag=True,
        help="Go ahead even if the planner says the ZeRO strategy does not fit or the warning lead is too short for "
        "a save (recorded in the event log).",
    )(func)


def runs_root_option(func):
    return click.option(
        "--runs-dir",
        "runs_root",
        type=click.Path(file_okay=False, path_type=Path),
        default=lambda: os.environ.get("HPCDS_RUNS_DIR", "runs"),
        show_default="./runs or $HPCDS_RUNS_DIR",
        help="Folder that holds the run directories.",
    )(func)


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")
