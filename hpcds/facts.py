"""Facts that hpcds's Python code and its batch-script templates must agree on, each defined once here.

The renderer passes them into the templates (`template_facts`), so a changed exit code or file name changes the
shell side too. No I/O here.
"""

from __future__ import annotations

import re
import signal

# Exit code of a trainer that saved at a step boundary after a stop signal and wants the job run again
# (EX_TEMPFAIL). DeepSpeed's launcher, `hpcds launch` and srun pass it on; the batch script requeues on it.
EXIT_REQUEUE = 75
# Exit code of an `hpcds launch` whose node failed its pre-flight check (EX_UNAVAILABLE): the batch script excludes
# the node and requeues the job (`preflight` events with `ok: false` name the nodes).
EXIT_UNHEALTHY = 69
# Exit code of an `hpcds launch` that found other versions or code than the run was submitted with, under
# slurm.on_version_change: fail (EX_CONFIG): the batch script ends the job without a requeue (another allocation would
# find the same). Its `environment_changed` event names each change.
EXIT_ENVIRONMENT_CHANGED = 78

# Slurm's warning before the time limit (`--signal=USR2@lead`). Not USR1: NCCL uses USR1 internally on some versions.
WARNING_SIGNAL = "USR2"
WARNING_SIGNUM = signal.Signals["SIG" + WARNING_SIGNAL]
# The signals that ask the trainer to save at the next step boundary and exit EXIT_REQUEUE: Slurm's warning, the TERM
# of requeue / preemption / time limit / scancel, and Ctrl-C. The launcher chain keeps them blocked (DeepSpeed's
# launchers die or kill the ranks on them); the ranks unblock them once their handler is in place.
STOP_SIGNUMS = (WARNING_SIGNUM, signal.SIGTERM, signal.SIGINT)

# The run directory's files.
SPEC_FILE = "spec.yaml"
SCRIPT_FILE = "job.sbatch"
DS_CONFIG_FILE = "ds_config.json"
META_FILE = "meta.json"
EVENTS_FILE = "events.jsonl"
PROGRESS_FILE = "progress.json"
LOSSES_FILE = "losses.jsonl"
HEARTBEAT_DIR = "heartbeats"
CHECKPOINT_DIR = "checkpoints"
BAD_NODES_FILE = "bad_nodes.jsonl"  # the nodes the batch script excluded from the run's job, one JSON line each

# The ranks' rendezvous port: the batch script picks a free one on the first node, at or above this and below the
# ephemeral range, and passes it to every node's `hpcds launch` in this environment variable.
MASTER_PORT_ENV = "HPCDS_MASTER_PORT"
MASTER_PORT_LOW = 20000
# With a container, `hpcds launch` runs where scontrol may be missing: the batch script passes the allocation's host
# names, and the version of the hpcds that rendered it (a different one inside the image is reported).
NODES_ENV = "HPCDS_NODES"
# With slurm.master_addr: ip, the first node's address as the batch script (which runs there) finds it.
MASTER_ADDR_ENV = "HPCDS_MASTER_ADDR"
OUTSIDE_VERSION_ENV = "HPCDS_OUTSIDE_VERSION"

# Environment names whose values are secrets: refused in a spec's `slurm.env` (they would be written into spec.yaml
# and job.sbatch) and redacted from W&B's run config. Whole words between underscores, so TOKENIZERS_PARALLELISM
# is not one while HF_TOKEN and WANDB_API_KEY are.
SECRET_NAME = re.compile(r"(?:^|_)(?:KEY|APIKEY|TOKEN|SECRET|PASSWORD|PASSWD|PASS|CREDENTIALS?)(?:_|$)", re.IGNORECASE)

# A tokenizer name (data.tokenizer, --tokenizer) that starts with this names a local Hugging Face tokenizer folder.
HF_PREFIX = "hf:"


def template_facts() -> dict[str, object]:
    """What the batch-script templates read from here."""
    return {
        "exit_requeue": EXIT_REQUEUE,
        "exit_unhealthy": EXIT_UNHEALTHY,
        "exit_environment_changed": EXIT_ENVIRONMENT_CHANGED,
        "warning_signal": WARNING_SIGNAL,
        "events_file": EVENTS_FILE,
        "heartbeat_dir": HEARTBEAT_DIR,
        "bad_nodes_file": BAD_NODES_FILE,
        "master_port_env": MASTER_PORT_ENV,
        "port_low": MASTER_PORT_LOW,
        "nodes_env": NODES_ENV,
        "master_addr_env": MASTER_ADDR_ENV,
        "outside_version_env": OUTSIDE_VERSION_ENV,
    }
