"""The learning-rate schedule: linear warmup from 0 to the peak, then cosine, linear or no decay down to `min_lr`.

A pure function of the optimizer step, so a resumed run sets exactly the rate an uninterrupted run would have set
(the trainer writes it into the optimizer's param groups itself each step; no DeepSpeed scheduler, whose state would
be one more thing to save and restore). A continued run with a changed schedule keeps its rate continuous through an
anchor (`continuation_anchor`), kept in the run's meta.json. No I/O here.
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


# ---------------------------------------------------------------------------------------------------------------------
# Continued runs: the rate stays where it was at the resume step unless the new schedule asks for another peak.

SCHEDULE_FIELDS = ("lr", "min_lr", "warmup_steps", "decay", "max_steps")


def continuation_anchor(old, new, resume_step: int, old_anchor: dict | None = None) -> dict | None:
    """Where a continued run's schedule starts: {"step", "lr"}, or None when the new schedule applies as written.

    `old` and `new` are the `TrainingSpec`s before and after the change, `resume_step` the step the run goes on from.
    Kept continuous (the rate the old schedule had reached at `resume_step`, decaying from there to the new `min_lr`
    at the new `max_steps` in the new `decay` shape) when the peak and the warmup are unchanged: raising max_steps
    then neither jumps the rate back up nor drops it. A changed `lr` or `warmup_steps` is a new schedule the user asked
    for: it applies as written from the resume step. A resume step inside the warmup needs no anchor (the warmup does
    not depend on max_steps). No I/O here.
    """
    if (old.lr, old.warmup_steps) != (new.lr, new.warmup_steps) or resume_step < new.warmup_steps:
        return None
    if all(getattr(old, name) == getattr(new, name) for name in SCHEDULE_FIELDS):
        return old_anchor  # the schedule did not change: an earlier continuation's anchor still holds
    return {"step": resume_step, "lr": anchored_lr(resume_step, old, old_anchor)}


def anchored_lr(step: int, training, anchor: dict | None) -> float:
    """The rate of step `step` with a continuation anchor: from the anchor's step on, a decay from the anchor's rate to
    `min_lr` at `max_steps`; before it (and without one), `lr_for_spec`."""
    if not anchor or step < anchor["step"]:
        return lr_for_spec(step, training)
    return lr_at(
        step,
        lr=anchor["lr"],
        min_lr=training.min_lr,
        warmup_steps=anchor["step"],
        max_steps=training.max_steps,
        decay=training.decay,
    )


def anchored_training(training, anchor: dict | None, resume_step: int | None):
    """A `TrainingSpec` whose own schedule (`lr_for_spec`) gives `anchored_lr` from the resume step on, for the trainer
    (which computes the rate from its spec each step): peak = the anchor's rate, warmup = up to the anchor's step.
    Unchanged without an anchor, or when the trainer resumes from before it (an older checkpoint)."""
    if not anchor or resume_step is None or resume_step < anchor["step"]:
        return training
    return training.model_copy(update={"lr": anchor["lr"], "warmup_steps": anchor["step"]})
