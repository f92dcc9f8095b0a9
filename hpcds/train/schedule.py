"""The learning-rate schedule: linear warmup from 0 to the peak, then cosine, linear or no decay down to `min_lr`.

A pure function of the optimizer step, so a resumed run sets exactly the rate an uninterrupted run would have set
(the trainer writes it into the optimizer's param groups itself each step; no DeepSpeed scheduler, whose state would
be one more thing to save and restore). No I/O here.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int, decay: str = "cosine") -> float:
    """Learning rate for 0-based optimizer step `step` (the rate that produces the weights of step `step + 1`).

    Warmup: steps 0..warmup_steps-1 rise linearly and never use 0; step `warmup_steps` uses the peak `lr`. The decay
    reaches `min_lr` on the last step (`max_steps - 1`) and stays there past it.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"unknown decay {decay!r}: use cosine, linear or constant")
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if decay == "constant":
        return lr
    decay_steps = max_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if decay == "linear":
        return lr - (lr - min_lr) * progress
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_for_spec(step: int, training) -> float:
    """`lr_at` with the values of a `TrainingSpec`."""
    return lr_at(
        step,
        lr=training.lr,
        min_lr=training.min_lr,
        warmup_steps=training.warmup_steps,
        max_steps=training.max_steps,
        decay=training.decay,
    )
