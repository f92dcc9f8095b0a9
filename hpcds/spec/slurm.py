"""The spec's `slurm` section: resources, batch-script settings, site flags and the container the step runs in.

No I/O here; hpcds.render.sbatch turns it into the batch script.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, ValidationInfo, model_validator

from hpcds.durations import parse_slurm_time_s
from hpcds.errors import Problem
from hpcds.facts import SECRET_NAME
from hpcds.spec.types import (
    Constraint,
    EnvName,
    SafeStr,
    SbatchFlag,
    SlurmMem,
    SlurmTime,
    SlurmWord,
    Strict,
    _pattern,
    _problems,
)

# Flags the batch script writes itself, with where to say what they say instead: given again in extra_sbatch they
# would silently override the plan, the requeue path or where `hpcds logs` looks.
_ONE_TASK_PER_NODE = (
    "hpcds runs one task per node (`hpcds launch`), which starts that node's ranks, one per GPU "
    "(slurm.ranks_per_node); one Slurm task per GPU is not supported"
)
OWNED_SBATCH = {
    "nodes": "set slurm.nodes (or --nodes on the command line)",
    "time": "set slurm.time (or --time on the command line)",
    "job-name": "set name: the job is named after the run",
    "output": "the output is RUN_DIR/slurm-%j.out, where `hpcds logs` reads it and requeued allocations append",
    "error": "stderr goes with stdout to RUN_DIR/slurm-%j.out, where `hpcds logs` reads it",
    "open-mode": "the output is appended to (a requeued job must not truncate it)",
    "requeue": "the job is always requeueable; hpcds requeues it after a save (slurm.max_requeues)",
    "no-requeue": "set slurm.max_requeues: 0 to stop self-requeues; Slurm's own requeue must stay possible",
    "signal": "set slurm.signal_lead_s (the warning signal is USR2, which the trainer handles)",
    "ntasks-per-node": _ONE_TASK_PER_NODE,
    "ntasks": _ONE_TASK_PER_NODE,
    "gpus-per-task": _ONE_TASK_PER_NODE,
    "gpus-per-node": "set slurm.gpus_per_node (or --gpus-per-node on the command line)",
    "gpus": "set slurm.gpus_per_node",
    "cpus-per-task": "set slurm.cpus_per_task",
    "mem": "set slurm.mem",
    "partition": "set slurm.partition (or --partition on the command line)",
    "account": "set slurm.account",
    "qos": "set slurm.qos",
    "constraint": "set slurm.constraint",
    "array": "hpcds submits one job per run",
    "tasks-per-node": _ONE_TASK_PER_NODE,
}
OWNED_SRUN = {
    "kill-on-bad-exit": "always 1: a node that fails ends the step instead of leaving the others in a collective",
    "ntasks-per-node": _ONE_TASK_PER_NODE,
    "ntasks": _ONE_TASK_PER_NODE,
    "nodes": "the step spans the whole allocation (slurm.nodes)",
    # A step on part of the allocation: the hostfile lists every node, and the rendezvous would wait for the rest.
    "nodelist": "the step spans the whole allocation (exclude nodes from the job: slurm.extra_sbatch --exclude=...)",
    "exclude": "the step spans the whole allocation (exclude nodes from the job: slurm.extra_sbatch --exclude=...)",
    "relative": "the step spans the whole allocation",
    "tasks-per-node": _ONE_TASK_PER_NODE,
    "gpus-per-task": _ONE_TASK_PER_NODE,
    **dict.fromkeys(
        ("container-image", "container-mounts", "container-workdir"),
        "set slurm.container (kind: pyxis), which also binds the run directory and the spec's folders",
    ),
    "cpus-per-task": "set slurm.cpus_per_task (srun gets it from there)",
    "export": "the step needs the batch script's environment (the rendezvous port, slurm.env)",
    "output": "the step's output goes to RUN_DIR/slurm-%j.out, where `hpcds logs` reads it",
    "error": "the step's stderr goes to RUN_DIR/slurm-%j.out, where `hpcds logs` reads it",
}
OWNED_GRES = "set slurm.gpus_per_node, and slurm.gpu_request: gres where the site asks for --gres=gpu:N"


# A bind mount as pyxis and apptainer both write it: SRC[:DST[:OPTIONS]], absolute paths; commas separate mounts.
Mount = Annotated[
    SafeStr,
    AfterValidator(_pattern(r"/[^\s,:'\"]*(:/[^\s,:'\"]*(:[A-Za-z0-9=+_-]+)?)?", "mount (/src[:/dst[:options]])")),
]
_CONTAINER_FLAGS = {"container-image": "image", "container-mounts": "mounts", "container-workdir": "workdir"}


class ContainerSpec(Strict):
    kind: Literal["pyxis", "apptainer", "wrapper"] = Field(
        description="pyxis: srun --container-image (enroot); apptainer: apptainer exec IMAGE; wrapper: a command "
        "line of your own (podman-hpc, shifter, bwrap) placed before `hpcds launch`."
    )
    image: SafeStr | None = Field(None, description="pyxis/apptainer: the image (docker://..., a .sqsh or .sif file).")
    mounts: list[Mount] = Field(
        default=[],
        description="More bind mounts (/src[:/dst[:opts]]); the run directory and the spec's data, model, tokenizer, "
        "checkpoint and NVMe folders are bound by themselves.",
    )
    workdir: SafeStr | None = Field(None, description="pyxis: the working directory inside the container.")
    args: list[SbatchFlag] = Field(
        default=[], description="More flags: pyxis: srun's (--container-env=X); apptainer: exec's (--cleanenv)."
    )
    wrapper: list[SafeStr] = Field(default=[], description="wrapper: the command line before `hpcds launch`.")
    hpcds: list[SafeStr] = Field(
        default=[],
        description="How the image runs hpcds, e.g. [python3, -m, hpcds]; default: the path it has outside.",
    )

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> ContainerSpec:
        problems = _problems(info)
        needs = {"pyxis": {"image"}, "apptainer": {"image"}, "wrapper": {"wrapper"}}[self.kind]
        allowed = (
            needs
            | {"pyxis": {"mounts", "workdir", "args"}, "apptainer": {"mounts", "args"}, "wrapper": set()}[self.kind]
        )
        for field in ("image", "mounts", "workdir", "args", "wrapper"):
            value = getattr(self, field)
            if field in needs and not value:
                example = (
                    "docker://nvcr.io#nvidia/pytorch:24.05-py3" if field == "image" else "[podman-hpc, run, IMAGE]"
                )
                problems.append(Problem(f"slurm.container.{field}", f"a {self.kind} container needs it", example))
            elif field not in allowed and value:
                problems.append(
                    Problem(
                        f"slurm.container.{field}",
                        f"means nothing to a {self.kind} container",
                        "put everything the wrapper needs into slurm.container.wrapper"
                        if self.kind == "wrapper"
                        else f"remove it (used by: {', '.join(k for k in ('pyxis', 'apptainer') if k != self.kind)})",
                    )
                )
        for i, flag in enumerate(self.args):
            name = flag.split("=", 1)[0][2:]
            if self.kind == "apptainer" and name in ("cleanenv", "containall"):
                problems.append(
                    Problem(
                        f"slurm.container.args[{i}]",
                        f"{flag} hides the job's environment from `hpcds launch` (SLURM_*, HPCDS_*)",
                        "leave it out; pass variables with slurm.env",
                    )
                )
            if name in _CONTAINER_FLAGS:
                problems.append(
                    Problem(
                        f"slurm.container.args[{i}]",
                        f"{flag} is written from a field",
                        f"set slurm.container.{_CONTAINER_FLAGS[name]}",
                    )
                )
        return self


class SlurmSpec(Strict):
    nodes: int = Field(1, ge=1, description="Nodes to allocate.")
    gpus_per_node: int = Field(1, ge=0, description="GPUs per node; 0 = CPU ranks (tests, debugging).")
    ranks_per_node: int | None = Field(
        None, ge=1, description="Training processes per node; default gpus_per_node (or 1 without GPUs)."
    )
    gpu_mem_gb: float = Field(80.0, gt=0, description="Memory of one GPU in GB; the planner sizes ZeRO for it.")
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs for the per-node launcher and its ranks.")
    mem: SlurmMem | None = Field(None, description="Memory per node (--mem), e.g. 256G; 0 = all of it.")
    time: SlurmTime = Field("24:00:00", description="Time limit per allocation (the run requeues past it).")
    partition: SlurmWord | None = Field(None, description="Partition(s).")
    account: SlurmWord | None = Field(None, description="Account to charge.")
    qos: SlurmWord | None = Field(None, description="Quality of service.")
    constraint: Constraint | None = Field(None, description="Node features, e.g. a100&ib.")
    signal_lead_s: int = Field(300, ge=10, description="Seconds before the time limit to warn the job.")
    max_requeues: int = Field(20, ge=0, description="Self-requeues allowed before the run gives up.")
    max_failure_requeues: int = Field(
        2, ge=0, description="Requeues per job after a failure or hang that followed new progress (then FAILED)."
    )
    max_no_progress: int = Field(
        3,
        ge=1,
        description="Allocations of a job in a row that commit no checkpoint beyond the newest step before them, "
        "whatever their ending: after this many the run stops (ending no_progress) instead of being requeued.",
    )
    preflight: bool = Field(
        True,
        description="Check each node before its ranks start (writable run directory, room for a checkpoint, host "
        "memory and /dev/shm for the plan, GPUs, a gloo all-reduce between the nodes); a failing node exits 69 "
        "(docs/multinode.md). HPCDS_PREFLIGHT=0 in the environment also skips it.",
    )
    on_version_change: Literal["warn", "fail"] = Field(
        "warn",
        description="At every start of the job, each node compares its hpcds code and version, torch, DeepSpeed, "
        "transformers, mamba-ssm, causal-conv1d and python with what submit recorded in meta.json: warn logs the "
        "change and trains on; fail ends the job (exit 78) without a requeue (docs/jobs.md).",
    )
    snapshot: bool = Field(
        False,
        description="Copy the hpcds package into the run directory at submit (RUN_DIR/snapshot) and run the job "
        "from the copy, so an upgrade of hpcds after submit does not change the run's requeues.",
    )
    exclude_bad_nodes: bool = Field(
        True,
        description="Requeue a failed or hung job without the node its evidence points at (a failed pre-flight "
        "check, the first rank's error, the heartbeat that fell behind), while the partition keeps enough nodes.",
    )
    hang_limit_s: int = Field(
        1800, ge=0, description="End the step when no heartbeat came for this long (0 = no hang watchdog)."
    )
    setup: list[SafeStr] = Field(
        default=[],
        description="Shell lines run before launch (module load, conda activate); run verbatim, they are yours.",
    )
    env: dict[EnvName, SafeStr] = Field(default={}, description="Environment variables exported (values shell-quoted).")
    extra_sbatch: list[SbatchFlag] = Field(
        default=[], description="More #SBATCH flags, e.g. --exclusive or --reservation=x."
    )
    srun_args: list[SbatchFlag] = Field(
        default=[], description="More options for the job step's srun, e.g. --cpu-bind=cores, --wait=60, --label."
    )
    container: ContainerSpec | None = Field(
        None,
        description="Run `hpcds launch` and the ranks in a container (docs/containers.md); the batch script stays "
        "outside.",
    )
    master_addr: Literal["hostname", "ip"] = Field(
        "hostname",
        description="How the other nodes reach the first for the rendezvous: its host name, or its IP address (where "
        "node names do not resolve between nodes; the address of GLOO_SOCKET_IFNAME from slurm.env, else the first "
        "of `hostname -I`).",
    )
    gpu_request: Literal["gpus_per_node", "gres"] = Field(
        "gpus_per_node", description="How GPUs are asked for: --gpus-per-node=N, or --gres=gpu:N where a site needs it."
    )

    @property
    def ranks(self) -> int:
        return self.ranks_per_node or self.gpus_per_node or 1

    @property
    def time_limit_s(self) -> int:
        return parse_slurm_time_s(self.time)  # never None: the SlurmTime pattern admits durations only

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> SlurmSpec:
        if self.gpus_per_node and self.ranks_per_node and self.ranks_per_node > self.gpus_per_node:
            _problems(info).append(
                Problem(
                    "slurm.ranks_per_node",
                    f"{self.ranks_per_node} ranks per node share {self.gpus_per_node} GPU(s): each rank takes the "
                    "GPU of its local rank number, and the ones beyond the last GPU would fail at start",
                    f"at most {self.gpus_per_node} (or leave it unset: one rank per GPU)",
                )
            )
        for name in self.env:
            if SECRET_NAME.search(name):
                _problems(info).append(
                    Problem(
                        f"slurm.env.{name}",
                        "looks like a secret; env values are written into the run's spec.yaml and job.sbatch",
                        "export it in the shell you submit from (sbatch passes your environment on), or use "
                        "~/.netrc for W&B",
                    )
                )
        for field, flags, owned in (
            ("extra_sbatch", self.extra_sbatch, OWNED_SBATCH),
            ("srun_args", self.srun_args, OWNED_SRUN),
        ):
            for i, flag in enumerate(flags):
                name = flag.split("=", 1)[0][2:]
                # sbatch and srun take any unambiguous abbreviation of a long option (getopt_long): --out is --output.
                meant = name if name in owned else next((o for o in owned if o.startswith(name)), None)
                if meant or (name == "gres" and field == "extra_sbatch" and "gpu" in flag):
                    what = (
                        f"{flag} is set by hpcds itself"
                        if meant in (name, None)
                        else f"{flag} is --{meant}, which hpcds sets itself"
                    )
                    _problems(info).append(Problem(f"slurm.{field}[{i}]", what, owned.get(meant, OWNED_GRES)))
                if name in ("mem-per-cpu", "mem-per-gpu") and self.mem is not None:
                    _problems(info).append(
                        Problem(
                            f"slurm.{field}[{i}]",
                            f"{flag} beside slurm.mem ({self.mem}): sbatch refuses the two together",
                            "keep one of them",
                        )
                    )
        if self.snapshot and self.container is not None:
            _problems(info).append(
                Problem(
                    "slurm.snapshot",
                    "runs the copy with the python outside, but with slurm.container the job step runs the image's "
                    "python and hpcds",
                    "pin hpcds in the image instead (slurm.container.hpcds), or leave out one of the two",
                )
            )
        if self.signal_lead_s >= self.time_limit_s:
            _problems(info).append(
                Problem(
                    "slurm.signal_lead_s",
                    f"{self.signal_lead_s} s is not shorter than the time limit {self.time}",
                    "lower it, or raise slurm.time",
                )
            )
        return self
