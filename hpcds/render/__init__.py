"""What hpcds hands to Slurm and DeepSpeed, rendered from a validated spec: the batch script (`sbatch`), the DeepSpeed
JSON (`deepspeed`) and the hostfile (`hostfile`). Pure text, no I/O (`hpcds_command` only looks at the running
interpreter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpcds.facts import DS_CONFIG_FILE, SPEC_FILE
from hpcds.plan import pin_strategy
from hpcds.render.deepspeed import render_ds_config, render_ds_config_json
from hpcds.render.hostfile import parse_hostfile, render_hostfile
from hpcds.render.sbatch import (
    RESERVED_ENV,
    SUBMIT_TEMPLATES,
    check_run_dir,
    hpcds_command,
    render_sbatch,
    render_submit_template,
    render_submit_templates,
)

if TYPE_CHECKING:
    from hpcds.spec import JobSpec

__all__ = [
    "RESERVED_ENV",
    "SUBMIT_TEMPLATES",
    "check_run_dir",
    "hpcds_command",
    "parse_hostfile",
    "render_ds_config",
    "render_ds_config_json",
    "render_hostfile",
    "render_run_files",
    "render_sbatch",
    "render_submit_template",
    "render_submit_templates",
]


def render_run_files(spec: JobSpec) -> tuple[JobSpec, dict[str, str]]:
    """Pin the strategy (ZeRO stage etc., fixed for the life of the run) and render the files that do not depend on
    where the run lives: `spec.yaml` (the resolved, pinned spec) and `ds_config.json`. The batch script needs the run
    directory, so whoever creates it calls `render_sbatch(pinned, run_dir, hpcds_command())`."""
    pinned = pin_strategy(spec)
    return pinned, {SPEC_FILE: pinned.to_yaml(), DS_CONFIG_FILE: render_ds_config_json(pinned)}
