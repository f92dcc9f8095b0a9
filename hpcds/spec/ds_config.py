"""A DeepSpeed config the user already has, read into the spec: one source of truth for what both can say.

`deepspeed.config` is the raw DeepSpeed JSON (a mapping, or a file that `load_spec` reads). Settings the spec also
holds (ZeRO stage, offload devices, precision, micro batch, accumulation, clipping, and the optimizer's and
scheduler's numbers) are taken out of it into the spec's own fields before the spec is validated and planned, so the
plan, the pinned spec.yaml, ds_config.json and the trainer all see the same values. A value the user set in both
places that differs is an error naming both; a spec field the user left unset takes the raw value. `"auto"`
(transformers' convention: "whatever the trainer uses") takes the spec's value; `resolve_auto` fills those the
spec's own DeepSpeed config does not hold. The trainer runs its own AdamW and learning-rate schedule, so `optimizer`
and `scheduler` sections are read into `training.*` and then dropped; what cannot be expressed there is refused.
No I/O here.
"""

from __future__ import annotations

import copy
from typing import Any

from hpcds.errors import Problem
from hpcds.spec.tree import get_path, set_path

AUTO = "auto"
RAW = "deepspeed.config"

# (spec field, key path in the DeepSpeed config) for every setting both can state.
MIRRORED = (
    ("deepspeed.zero_stage", "zero_optimization.stage"),
    ("deepspeed.offload_optimizer", "zero_optimization.offload_optimizer.device"),
    ("deepspeed.offload_params", "zero_optimization.offload_param.device"),
    ("training.micro_batch_size", "train_micro_batch_size_per_gpu"),
    ("training.grad_accum_steps", "gradient_accumulation_steps"),
    ("training.grad_clip", "gradient_clipping"),
    ("training.lr", "optimizer.params.lr"),
    ("training.weight_decay", "optimizer.params.weight_decay"),
    ("training.adam_betas", "optimizer.params.betas"),
    ("training.lr", "scheduler.params.warmup_max_lr"),
    ("training.warmup_steps", "scheduler.params.warmup_num_steps"),
    ("training.max_steps", "scheduler.params.total_num_steps"),
)
INTEGER_FIELDS = {
    "deepspeed.zero_stage",
    "training.micro_batch_size",
    "training.grad_accum_steps",
    "training.warmup_steps",
    "training.max_steps",
}
# DeepSpeed's schedulers as hpcds's decay after warmup; all of them warm up from warmup_min_lr.
SCHEDULERS = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}
OPTIMIZERS = ("Adam", "AdamW")
# ZeRO keys of older DeepSpeed releases that current ones no longer read the same way, with today's spelling.
RENAMED_ZERO_KEYS = {
    "cpu_offload": 'offload_optimizer: {"device": "cpu"}',
    "cpu_offload_params": 'offload_param: {"device": "cpu"}',
    "cpu_offload_use_pin_memory": 'offload_optimizer: {"pin_memory": true}',
}
# Optimizer parameters torch's AdamW (the trainer's) has at these values; the spec has no field for them.
FIXED_OPTIMIZER_PARAMS = {"eps": 1e-8, "adam_w_mode": True, "torch_adam": None}


def merge_raw_config(user_tree: dict) -> tuple[dict, list[Problem]]:
    """The user's spec tree (YAML, --set and flags; no preset) with the raw DeepSpeed config's settings moved into
    the spec's fields, and every conflict found. The input is not changed."""
    tree = copy.deepcopy(user_tree)
    raw = get_path(tree, RAW)
    if not isinstance(raw, dict) or not raw:
        return tree, []
    problems: list[Problem] = []

    def take(field: str, key: str, value: Any, shown: Any = None) -> None:
        if value is None or value == AUTO:
            return
        if field in INTEGER_FIELDS and isinstance(value, float) and value.is_integer():
            value = int(value)  # JSON files write 1e3 where an integer is meant
        value = tuple(value) if isinstance(value, list) else value
        current = get_path(tree, field)
        if current is None or current == AUTO:  # zero_stage: auto leaves the stage to whoever names one
            set_path(tree, field, value)
        elif (tuple(current) if isinstance(current, list) else current) != value:
            problems.append(
                Problem(
                    f"{RAW}.{key}",
                    f"is {value if shown is None else shown!r}, but {field} is {current!r}",
                    f'say it in one place: remove one of them, or set {key} to "auto"',
                )
            )

    problems += _check_sections(raw)
    for field, key in MIRRORED:
        take(field, key, get_path(raw, key))
    precision = _precision(raw, problems)
    if precision is not None:
        take("training.precision", f"{precision}.enabled", precision, shown=True)
    scheduler = raw.get("scheduler")
    if isinstance(scheduler, dict) and scheduler.get("type") in SCHEDULERS:
        take("training.decay", "scheduler.type", SCHEDULERS[scheduler["type"]], shown=scheduler["type"])
        if scheduler["type"] == "WarmupDecayLR":  # decays to 0
            take("training.min_lr", "scheduler.type", 0.0, shown=scheduler["type"])
    kept = {key: value for key, value in raw.items() if key not in ("optimizer", "scheduler")}
    set_path(tree, RAW, kept)
    return tree, problems


def raw_origins(tree: dict) -> dict[str, str]:
    """Spec field -> the place in `deepspeed.config` its value can come from, for the fields that place sets: a
    problem found in such a field is reported with where the value was written."""
    raw = get_path(tree, RAW)
    if not isinstance(raw, dict):
        return {}
    origins = {field: f"{RAW}.{key}" for field, key in reversed(MIRRORED) if get_path(raw, key) not in (None, AUTO)}
    for name in ("fp16", "bf16"):
        if get_path(raw, f"{name}.enabled") is True:
            origins["training.precision"] = f"{RAW}.{name}.enabled"
    return origins


def _precision(raw: dict, problems: list[Problem]) -> str | None:
    enabled = [name for name in ("fp16", "bf16") if get_path(raw, f"{name}.enabled") is True]
    if len(enabled) == 2:
        problems.append(
            Problem(f"{RAW}.fp16.enabled", "and bf16.enabled are both true", "DeepSpeed trains in one of them")
        )
        return None
    return enabled[0] if enabled else None


def _check_sections(raw: dict) -> list[Problem]:
    """What hpcds cannot honour: old ZeRO spellings, and optimizer or scheduler settings its trainer has no way to
    follow."""
    problems = []
    zero = raw.get("zero_optimization")
    for key in RENAMED_ZERO_KEYS:
        if isinstance(zero, dict) and key in zero:
            problems.append(
                Problem(
                    f"{RAW}.zero_optimization.{key}",
                    "is an old DeepSpeed spelling that hpcds does not plan for",
                    f"write {RENAMED_ZERO_KEYS[key]} inside zero_optimization instead",
                )
            )
    optimizer = raw.get("optimizer")
    if optimizer is not None:
        kind = optimizer.get("type") if isinstance(optimizer, dict) else None
        if kind not in OPTIMIZERS:
            problems.append(
                Problem(
                    f"{RAW}.optimizer.type",
                    f"is {kind!r}; hpcds trains with torch's AdamW (DeepSpeed's CPU Adam when offloading on GPUs)",
                    "remove the optimizer section and set training.lr, adam_betas and weight_decay",
                )
            )
        # Another optimizer's parameters are not compared one by one: the type's refusal already covers them.
        params = optimizer.get("params", {}) if kind in OPTIMIZERS else {}
        for name, value in params.items():
            fixed = FIXED_OPTIMIZER_PARAMS.get(name, AUTO)
            if name in FIXED_OPTIMIZER_PARAMS and value not in (AUTO, fixed):
                problems.append(
                    Problem(
                        f"{RAW}.optimizer.params.{name}",
                        f"is {value!r}; the trainer's AdamW uses {fixed!r}",
                        'remove it or set it to "auto"',
                    )
                )
            elif name not in FIXED_OPTIMIZER_PARAMS and name not in ("lr", "betas", "weight_decay"):
                problems.append(
                    Problem(f"{RAW}.optimizer.params.{name}", "has no counterpart in hpcds's AdamW", "remove it")
                )
    scheduler = raw.get("scheduler")
    if scheduler is not None:
        kind = scheduler.get("type") if isinstance(scheduler, dict) else None
        params = scheduler.get("params", {}) if isinstance(scheduler, dict) else {}
        if kind not in SCHEDULERS:
            problems.append(
                Problem(
                    f"{RAW}.scheduler.type",
                    f"is {kind!r}; hpcds runs its own schedule (linear warmup, then cosine, linear or no decay)",
                    "remove the scheduler section and set training.warmup_steps, decay, lr and min_lr; "
                    f"or use one of {', '.join(SCHEDULERS)}",
                )
            )
        concrete_warmup = params.get("warmup_num_steps") not in (None, AUTO, 0)
        if concrete_warmup and params.get("warmup_type", "log") != "linear":
            problems.append(
                Problem(
                    f"{RAW}.scheduler.params.warmup_type",
                    f"is {params.get('warmup_type', 'log (DeepSpeed default)')}; hpcds warms up linearly",
                    'set "warmup_type": "linear", or remove the scheduler section and set training.warmup_steps',
                )
            )
        if kind == "WarmupCosineLR" and "cos_min_ratio" not in params:
            problems.append(
                Problem(
                    f"{RAW}.scheduler.params.cos_min_ratio",
                    "is unset, and DeepSpeed's default ends the decay at 0.0001 x lr",
                    'set it to 0 (or "auto") and say where the decay ends in training.min_lr',
                )
            )
        for name in ("warmup_min_lr", "warmup_min_ratio", "cos_min_ratio"):
            if params.get(name) not in (None, AUTO, 0, 0.0):
                problems.append(
                    Problem(
                        f"{RAW}.scheduler.params.{name}",
                        f"is {params[name]!r}; hpcds warms up from 0 and decays to training.min_lr",
                        'remove it (or "auto") and set training.min_lr',
                    )
                )
    return problems


# "auto" switches hpcds's own config may leave out: on exactly when the spec trains in that precision.
AUTO_PRECISION = {"fp16.enabled": "fp16", "bf16.enabled": "bf16", "bfloat16.enabled": "bf16"}


def resolve_auto(ours: dict, raw: dict, spec) -> tuple[dict, list[Problem]]:
    """`raw` merged over `ours` (the config hpcds renders from the spec), each `"auto"` leaf keeping ours or resolved
    from the spec. An "auto" with no value anywhere is a problem, except a ZeRO setting under stage 0, which has none
    to set (dropped: DeepSpeed's default stands)."""
    problems: list[Problem] = []

    def merge(base: dict, over: dict, prefix: str) -> dict:
        result = dict(base)
        for key, value in over.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                result[key] = merge(result[key] if isinstance(result.get(key), dict) else {}, value, path + ".")
            elif value != AUTO:
                result[key] = value
            elif key in result:
                continue  # hpcds's own value for it
            elif path in AUTO_PRECISION:
                result[key] = spec.training.precision == AUTO_PRECISION[path]
            elif path.startswith("zero_optimization.") and get_path(ours, "zero_optimization.stage") == 0:
                continue
            else:
                problems.append(Problem(f"{RAW}.{path}", 'is "auto", and hpcds has no value for it', "write the value"))
        return result

    return merge(ours, raw, ""), problems
