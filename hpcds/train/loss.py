"""The loss the trainer optimises, the evaluation loss, and the resume probe built on it.

The probe proves that a resume loaded the state that was saved: every checkpoint stores the loss the model gave on
one fixed batch at save time (eval mode, no dropout, the same sequences on every rank and at every world size), and a
resume recomputes it before the first step. Files can pass every size and checksum check and still hold the wrong
state (a universal conversion that mapped the wrong weights, a checkpoint written by other code, a library that
changed under the run); the loss on a fixed batch tells.
"""

from __future__ import annotations

from typing import Any

# Same world size and stage: the same weights give the same loss (on CPU bit for bit); the margin is for GPU kernels
# that may sum in another order. After a universal conversion the weights come from the fp32 master copy, re-sliced
# (and re-rounded where the module trains in bf16): on CPU in fp32 the tests see the same loss bit for bit, and the
# wider margin is for bf16 and GPUs, where no test has measured it yet.
SAME_LAYOUT_RTOL = 1e-5
CONVERTED_RTOL = 1e-3


def loss_of(engine, x, y):
    """Mean cross-entropy over the targets of a micro-batch (positions marked -100 are not targets)."""
    import torch.nn.functional as F

    logits = engine(input_ids=x.to(engine.device)).logits
    targets = y.to(logits.device).reshape(-1)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, reduction="sum")
    # An SFT micro-batch can hold no target (prompts longer than the sequence): 0, not NaN.
    return total / (targets != -100).sum().clamp(min=1)


def eval_loss(engine, batches) -> float:
    """Mean loss over (x, y) batches in eval mode, without gradients; the engine is left in train mode."""
    import torch

    engine.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            total += loss_of(engine, x, y).item()
            count += 1
    engine.train()
    return total / max(1, count)


def probe_batch(data, batch_size: int):
    """The probe's fixed batch: the first validation sequences as one rank of one would read them, so every rank
    and every world size sees the same; the first training sequences when the data has no validation split."""
    if data.val:
        return data.val_batch(0, rank=0, world=1, batch_size=batch_size)
    return data.train_batch(0, 0, rank=0, world=1, batch_size=batch_size)


def probe_record(loss: float, *, step: int, lr: float, sequences: int) -> dict[str, Any]:
    """What a checkpoint stores of the probe (the data position is the step: batches are a function of it)."""
    return {"loss": loss, "step": step, "data_step": step, "lr": lr, "sequences": sequences}


def probe_verdict(saved: dict[str, Any], measured: float, *, converted: bool, checkpoint: str) -> str | None:
    """None when the recomputed loss matches the saved one; otherwise the error for people. No I/O here."""
    rtol = CONVERTED_RTOL if converted else SAME_LAYOUT_RTOL
    expected = float(saved["loss"])
    if abs(measured - expected) <= rtol * max(1.0, abs(expected)):
        return None
    after = ", after a universal conversion" if converted else ""
    return (
        f"the resume probe failed: the model gives loss {measured:.6f} on the probe batch, the checkpoint was saved "
        f"with {expected:.6f} (tolerance {rtol:g} relative{after}); checkpoint {checkpoint} is not used\n"
        "hint: if the software changed since the save (kernels, transformers, torch), restore it; if the checkpoint "
        "is damaged, move it aside (add .bad to its folder's name) and start again to resume from the one before"
    )
