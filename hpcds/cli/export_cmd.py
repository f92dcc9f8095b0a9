"""`hpcds export RUN`: a run's checkpoint as plain weights (safetensors, a Hugging Face folder, or a LoRA adapter).

Runs anywhere the run directory is readable, GPUs or not: torch, DeepSpeed and transformers are imported only once
the command runs (see hpcds.export).
"""

from __future__ import annotations

from pathlib import Path

import click

from hpcds import runs
from hpcds.cli import COMMAND_SETTINGS
from hpcds.cli.common import console, runs_root_option


@click.command("export", context_settings=COMMAND_SETTINGS)
@click.argument("run")
@click.option(
    "--step",
    default="latest",
    show_default=True,
    metavar="N|best|final|latest",
    help="Which committed checkpoint: a step number, the best evaluation, the final one, or the newest.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "hf", "lora"]),
    default="hf",
    show_default=True,
    help="safetensors: the state dict; hf: a transformers model folder (LoRA merged); lora: the peft adapter alone.",
)
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), help="Output folder (new or empty)."
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default="fp32",
    show_default=True,
    help="Precision of the written weights (consolidated from the fp32 master copy).",
)
@runs_root_option
def export(run, step, fmt, out_dir, dtype, runs_root):
    """Export a run's checkpoint as plain weights (safetensors, Hugging Face folder, or LoRA adapter)."""
    from hpcds.export import export_run

    run_dir = runs.find_run(runs_root, run)
    done = export_run(run_dir, fmt=fmt, step=step, out_dir=out_dir, dtype=dtype)
    for note in done.notes:
        console.print(f"note: {note}", soft_wrap=True, markup=False, highlight=False)
    console.print(
        f"exported step_{done.step} of {run_dir.name} as {done.fmt} to {done.out_dir}: {', '.join(done.files)}",
        soft_wrap=True,
        markup=False,
        highlight=False,
    )


COMMANDS = [export]

if __name__ == "__main__":
    import sys

    from hpcds.errors import HpcdsError

    try:
        export.main(standalone_mode=False)
    except HpcdsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
