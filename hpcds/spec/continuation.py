"""Continuing a run with a changed spec: which changes a run's checkpoints survive, and which they do not.

`compare_specs(old, new)` takes two resolved specs (spec.yaml's tree, as `JobSpec.model_dump(mode="json")` gives it)
and sorts every changed field into `safe` (the checkpoint's weights, optimizer state and data position still mean the
same after it: step budget, learning-rate schedule, intervals, resources) and `refused` (anything else: the model's
shape, the data, the batch per rank, the ZeRO stage, the optimizer's own numbers). A field not named here is refused,
so a field added to the spec later is refused until someone decides otherwise. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpcds.errors import HpcdsError

# Fields (or whole sections, ending in '.') that a continued run may change. Why each is safe:
# - the schedule is a pure function of the step (hpcds.train.schedule), written into the optimizer every step;
# - intervals, retention and patience are read by the trainer loop each step, and stored nowhere;
# - grad_clip is DeepSpeed's config, applied at each step; activation checkpointing only trades memory for compute;
# - slurm.* is where and how long the run goes: a changed rank count goes through the universal checkpoint;
# - kernels pick an implementation of the same weights' forward, and async_save only when saves are written;
# - wandb mode and tags do not move the run (its id stays); preset names where defaults came from, already resolved.
SAFE_FIELDS = (
    "training.max_steps",
    "training.lr",
    "training.min_lr",
    "training.warmup_steps",
    "training.decay",
    "training.eval_interval_steps",
    "training.eval_iters",
    "training.log_interval_steps",
    "training.early_stopping_patience",
    "training.grad_clip",
    "training.activation_checkpointing",
    "model.kernels",
    "checkpoint.async_save",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "checkpoint.keep_every_steps",
    "checkpoint.write_gbps",
    "slurm.",
    "wandb.mode",
    "wandb.tags",
    "preset",
)

# Why a refused field cannot change under a run, for the error's hint (the first matching prefix wins).
REFUSED_WHY = (
    ("model.", "the checkpoint holds this model's weights"),
    ("data.", "the data position is the step: batches are a function of the data and the step"),
    ("training.micro_batch_size", "the data position is the step: batches per step would change"),
    ("training.grad_accum_steps", "the data position is the step: batches per step would change"),
    ("training.seed", "the data order and the weights' initialisation come from it"),
    ("training.precision", "the checkpoint's weights and optimizer state are kept in this precision"),
    ("training.weight_decay", "the optimizer state saved with the checkpoint restores the old value"),
    ("training.adam_betas", "the optimizer state saved with the checkpoint restores the old value"),
    ("deepspeed.zero_stage", "a run's ZeRO stage is pinned for its whole life"),
    ("deepspeed.", "the optimizer state is partitioned and placed as these settings say"),
    ("checkpoint.dir", "the run's checkpoints are in the old folder"),
    ("slurm.snapshot", "the copy of hpcds a run runs from is made when the run is created"),
    ("wandb.", "the run's W&B id belongs to the old project"),
    ("name", "the run directory is named after it"),
)


@dataclass(frozen=True)
class Change:
    path: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.path}: {_show(self.old)} -> {_show(self.new)}"


@dataclass(frozen=True)
class Comparison:
    safe: tuple[Change, ...]
    refused: tuple[Change, ...]

    @property
    def changed(self) -> bool:
        return bool(self.safe or self.refused)


def _show(value: Any) -> str:
    return "(unset)" if value is None else str(value)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths to leaf values; lists and empty mappings are leaves (compared whole)."""
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.removesuffix("."): tree}


# Inside a safe section, but not safe: the job runs hpcds from the run's copy, made only when the run is created.
UNSAFE_WITHIN = ("slurm.snapshot",)


def is_safe(path: str) -> bool:
    if path in UNSAFE_WITHIN:
        return False
    return any(path == field or (field.endswith(".") and path.startswith(field)) for field in SAFE_FIELDS)


def compare_specs(old: dict[str, Any], new: dict[str, Any]) -> Comparison:
    """Every field whose value differs between two resolved spec trees, sorted into safe and refused."""
    before, after = flatten(old), flatten(new)
    changes = [
        Change(path, before.get(path), after.get(path))
        for path in sorted(set(before) | set(after))
        if _normal(before.get(path)) != _normal(after.get(path))
    ]
    return Comparison(
        safe=tuple(c for c in changes if is_safe(c.path)),
        refused=tuple(c for c in changes if not is_safe(c.path)),
    )


def _normal(value: Any) -> Any:
    # YAML gives tuples back as lists (adam_betas), and an empty mapping reads the same as an absent one.
    if isinstance(value, tuple):
        return list(value)
    return None if value == {} else value


def why_refused(path: str) -> str:
    return next((why for prefix, why in REFUSED_WHY if path == prefix or path.startswith(prefix)), "not known safe")


def refusal(comparison: Comparison, run_name: str) -> HpcdsError | None:
    """The error for a continue whose changes the run's checkpoints do not survive (every refused field listed with
    both values), else None."""
    if not comparison.refused:
        return None
    count = len(comparison.refused)
    lines = [f"{run_name} cannot continue with {count} of these change{'s' if count != 1 else ''}:"]
    lines += [f"  - {change} ({why_refused(change.path)})" for change in comparison.refused]
    lines.append(
        "hint: undo them to continue the run, or start a new run from its weights with "
        f"model.init_from: {run_name}:final (fresh optimizer state, step 0)"
    )
    return HpcdsError("\n".join(lines))


def change_records(comparison: Comparison) -> list[dict[str, Any]]:
    """The safe changes as the `spec_changed` event stores them."""
    return [{"field": c.path, "old": c.old, "new": c.new} for c in comparison.safe]
