"""Everything hpcds does with Slurm: `commands` runs its tools (the only module that does), `parse` reads their
output, `status` merges Slurm's word with a run directory's into one row per run.

`from hpcds import slurm` gives the commands and parsers under one name: `slurm.squeue_mine()`, `slurm.parse_squeue`.
"""

from hpcds.slurm.commands import (
    CALLS,
    NO_SLURM_HINT,
    configured,
    run,
    sacct,
    sbatch,
    scancel,
    show_config,
    show_hostnames,
    squeue_mine,
)
from hpcds.slurm.parse import (
    SACCT_FIELDS,
    SQUEUE_FIELDS,
    SQUEUE_FORMAT,
    JobState,
    accounting_enabled,
    parse_exit_code,
    parse_sacct,
    parse_sbatch_parsable,
    parse_scontrol_show_config,
    parse_squeue,
)

__all__ = [
    "CALLS",
    "NO_SLURM_HINT",
    "SACCT_FIELDS",
    "SQUEUE_FIELDS",
    "SQUEUE_FORMAT",
    "JobState",
    "accounting_enabled",
    "configured",
    "parse_exit_code",
    "parse_sacct",
    "parse_sbatch_parsable",
    "parse_scontrol_show_config",
    "parse_squeue",
    "run",
    "sacct",
    "sbatch",
    "scancel",
    "show_config",
    "show_hostnames",
    "squeue_mine",
]
