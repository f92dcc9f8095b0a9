"""The `hpcds` command line: the only place that prints for people.

Each command group lives in its own module and registers through COMMANDS. Login-node commands (render, plan,
submit, status, logs, cancel) must stay light: heavy imports (torch, deepspeed, transformers, wandb) happen inside
the commands that train, never at module level. An `HpcdsError` becomes a message and exit code 1, no traceback.

Start-up time matters (people run `hpcds render` and `hpcds status` by hand, scripts call them in loops), so the group
is lazy: `COMMAND_TABLE` names each command's module, and `hpcds render` imports only hpcds.cli.render_cmd. `hpcds
--help` lists the table's one-line summaries without importing any command module. A test checks the table against
every module's COMMANDS, so a command added there and not here (or a changed first sentence) fails loudly.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import os
import sys
import types

import click

from hpcds import __version__
from hpcds.errors import HpcdsError

# Every command's own settings, so `-h` works however a command is reached (click caches each command's help option
# the first time it is asked for: a setting on the group alone made help text depend on what ran first).
COMMAND_SETTINGS = {"help_option_names": ["-h", "--help"]}

# name -> (module, attribute, first sentence of the command's help, as `hpcds --help` shows it).
COMMAND_TABLE: dict[str, tuple[str, str, str]] = {
    "render": (
        "hpcds.cli.render_cmd",
        "render",
        "Print the batch script for SPEC (or its DeepSpeed config) without creating or submitting anything.",
    ),
    "prepare": (
        "hpcds.cli.render_cmd",
        "prepare",
        "Create the run directory for SPEC and print its path (used inside a job by the sbatch/ templates).",
    ),
    "plan": (
        "hpcds.cli.plan_cmd",
        "plan",
        "Memory per GPU for each ZeRO stage and offload, and the strategy that fits with the least communication.",
    ),
    "import": (
        "hpcds.cli.import_cmd",
        "import_command",
        "Write a spec from another tool's training YAML or a DeepSpeed JSON; what cannot be carried over is listed.",
    ),
    "submit": (
        "hpcds.cli.submit_cmd",
        "submit",
        "Submit SPEC to Slurm as a new run (sbatch), creating its run directory.",
    ),
    "sweep": (
        "hpcds.cli.sweep_cmd",
        "sweep",
        "Submit SPEC once per point of a grid as one Slurm job array, one run directory per task.",
    ),
    "status": (
        "hpcds.cli.jobs_cmd",
        "status",
        "Queue state and training progress of runs (all runs under the runs folder by default).",
    ),
    "logs": (
        "hpcds.cli.jobs_cmd",
        "logs",
        "Print a run's Slurm output (every job of the run, oldest first).",
    ),
    "cancel": (
        "hpcds.cli.jobs_cmd",
        "cancel",
        "Cancel a run's Slurm job (scancel) and record it in the run's event log.",
    ),
    "launch": (
        "hpcds.cli.jobs_cmd",
        "launch",
        "Inside a Slurm job, once per node (srun): write the hostfile and start this node's DeepSpeed ranks.",
    ),
    "run": (
        "hpcds.cli.train_cmd",
        "run_command",
        "Train SPEC on this machine (CPU ranks on gloo, or the GPUs); Ctrl-C saves, the same command resumes.",
    ),
    "resume": (
        "hpcds.cli.resume_cmd",
        "resume",
        "Continue RUN from its last checkpoint with its own spec and --set changes (Slurm runs are submitted again).",
    ),
    "sync": (
        "hpcds.cli.train_cmd",
        "sync_command",
        "Upload a run's offline W&B logs (one folder per trainer start, all into the same W&B run).",
    ),
    "report": (
        "hpcds.cli.report_cmd",
        "report",
        "Where a run's time went: goodput, each interruption's cost, saves, GPU-hours, tokens/s, MFU, and a plot.",
    ),
    "export": (
        "hpcds.cli.export_cmd",
        "export",
        "Export a run's checkpoint as plain weights (safetensors, Hugging Face folder, or LoRA adapter).",
    ),
    "data": (
        "hpcds.cli.data_cmd",
        "data_group",
        "Prepare training data: tokenized memmaps that `data.train` in a spec points at.",
    ),
}


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use, from a table of (module, attribute, summary)."""

    def __init__(self, *args, lazy_commands: dict[str, tuple[str, str, str]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            module, attribute, _ = self.lazy_commands[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Stand-ins carrying the summary: click shortens their help exactly as it would the real command's.
        listed = {name: click.Command(name, help=summary) for name, (_, _, summary) in self.lazy_commands.items()}
        click.Group.format_commands(click.Group(commands={**listed, **self.commands}), ctx, formatter)


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMAND_TABLE,
    context_settings={**COMMAND_SETTINGS, "max_content_width": 110},
)
@click.version_option(__version__, prog_name="hpcds")
def cli() -> None:
    """Launch and babysit DeepSpeed training on Slurm (or on this machine)."""


# pydantic's own switch for its plugins (validation observers such as logfire), read when the first validator is built.
PYDANTIC_PLUGINS_ENV = "PYDANTIC_DISABLE_PLUGINS"
_PYDANTIC_PLUGIN_LOADER = "pydantic.plugin._loader"
NO_PLUGINS = ("__all__", "1", "true")  # the values with which pydantic loads none


def skip_pydantic_plugin_scan() -> None:
    """Build pydantic validators without looking for pydantic plugins, unless PYDANTIC_DISABLE_PLUGINS asks for them
    (set empty: every plugin installed; a list of names: all but those).

    The first validator pydantic builds imports its plugin loader, which imports importlib.metadata and reads the entry
    points of every installed package: about 15 ms of each `hpcds render` or `plan` in an environment with torch and
    DeepSpeed, a tenth of the command, for plugins hpcds has no use for. Validation itself is the same either way. A
    stand-in loader that finds no plugins takes the loader's place before pydantic imports it; once the real one is
    loaded, nothing changes.
    """
    if _PYDANTIC_PLUGIN_LOADER in sys.modules or os.environ.get(PYDANTIC_PLUGINS_ENV, "__all__") not in NO_PLUGINS:
        return
    stand_in = types.ModuleType(_PYDANTIC_PLUGIN_LOADER, "No pydantic plugins: hpcds.cli.skip_pydantic_plugin_scan")
    stand_in.get_plugins = lambda: ()
    sys.modules[_PYDANTIC_PLUGIN_LOADER] = stand_in


def main(argv: list[str] | None = None) -> None:
    skip_pydantic_plugin_scan()
    # Python's last garbage collection at exit walks every object the imports made (pydantic's are many): a seventh of
    # `hpcds render`'s time. Objects frozen at exit are skipped; no command needs that pass (files are closed by
    # `with`, and Python flushes stdout and stderr itself).
    atexit.unregister(gc.freeze)  # once, however often main() runs in one process
    atexit.register(gc.freeze)
    try:
        code = cli.main(args=argv, prog_name="hpcds", standalone_mode=False)
    except HpcdsError as exc:
        from rich.markup import escape

        from hpcds.cli.common import err_console

        # Escaped: error texts quote commands and stderr, where `[/...]` would read as rich markup.
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.exceptions.Abort:
        from hpcds.cli.common import err_console

        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    # Without standalone mode click returns a command's `ctx.exit(N)` code instead of exiting (e.g. `hpcds run`: 75).
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)
