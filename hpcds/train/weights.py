"""Which verified checkpoint of a run, and its fp32 weights: shared by `hpcds export` and `model.init_from`.

ZeRO shards are consolidated by DeepSpeed's own `zero_to_fp32` (the fp32 master weights; stage 0 keeps whole weights
in `mp_rank_00_model_states.pt`), so a checkpoint of any stage and world size gives the same state dict. Only
checkpoints with a COMMITTED marker whose files all match the manifest (sizes and CRC-32) are used. The top of this
module is pure (which step); the rest does the I/O.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcds import facts, runs
from hpcds.errors import HpcdsError

# ---------------------------------------------------------------------------------------------------------------------
# Pure: which checkpoint


@dataclass(frozen=True)
class Candidate:
    """One committed checkpoint as the export sees it: step, manifest, and the trainer's best step at that time."""

    step: int
    final: bool = False
    best_step: int | None = None


def choose_step(selector: str | None, candidates: list[Candidate], pointer_step: int | None) -> int:
    """The step `--step` names among committed checkpoints: a number, `best`, `final`, or (None) the latest.

    `best` is the best evaluation step recorded by the newest checkpoint (retention always keeps that one).
    """
    steps = sorted(c.step for c in candidates)
    if not steps:
        raise HpcdsError("the run has no committed checkpoint yet\nhint: train until the first checkpoint is saved")
    listed = ", ".join(map(str, steps))
    if selector is None or selector == "latest":
        return pointer_step if pointer_step in steps else steps[-1]
    if selector == "final":
        finals = [c.step for c in candidates if c.final]
        if not finals:
            raise HpcdsError(
                f"the run has no final checkpoint (it has not finished); committed steps: {listed}"
                "\nhint: --step latest, or --step N"
            )
        return max(finals)
    if selector == "best":
        newest = max(candidates, key=lambda c: c.step)
        if newest.best_step is None:
            raise HpcdsError(
                "the run recorded no evaluation, so there is no best step"
                "\nhint: set training.eval_interval_steps, or export --step latest / final / N"
            )
        if newest.best_step not in steps:
            raise HpcdsError(f"the best step {newest.best_step} has no committed checkpoint; committed: {listed}")
        return newest.best_step
    try:
        step = int(selector)
    except ValueError:
        raise HpcdsError(f"--step {selector!r}: expected a step number, best, final or latest") from None
    if step not in steps:
        raise HpcdsError(f"no committed checkpoint at step {step}; committed steps: {listed}")
    return step


# ---------------------------------------------------------------------------------------------------------------------
# I/O


def read_manifest(folder: Path) -> Any:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def committed_candidates(ckpt_dir: Path) -> tuple[list[Candidate], list[tuple[str, list[str]]]]:
    """Checkpoints whose marker, manifest and file sizes check out (cheap), and the others with their problems."""
    from hpcds.train import checkpoint as ck

    good, bad = [], []
    for tag in ck.list_tags(ckpt_dir):
        folder = ckpt_dir / tag
        manifest = read_manifest(folder)
        problems = ck.check_listing(manifest, (folder / ck.COMMITTED).is_file(), ck.sizes_under(folder))
        if problems:
            bad.append((tag, problems))
        else:
            good.append(Candidate(step=ck.step_of(tag), final=bool(manifest.get("final"))))
    return good, bad


def checksum_problems(folder: Path) -> list[str]:
    """Files whose CRC-32 differs from the manifest's: reads the whole checkpoint, so only the one being exported."""
    from hpcds.train import checkpoint as ck

    manifest = read_manifest(folder)
    return ck.check_checksums(manifest, {rel: ck.crc32_file(folder / rel) for rel in manifest["files"]})


def _best_step(folder: Path) -> int | None:
    import torch

    from hpcds.train import checkpoint as ck

    saved = torch.load(folder / ck.rank_state_name(0), map_location="cpu", weights_only=False)
    return saved.get("trainer", {}).get("best_step")


def consolidate(ckpt_dir: Path, tag: str, zero_stage: int, *, exclude_frozen: bool = False) -> dict[str, Any]:
    """fp32 weights of one checkpoint, by DeepSpeed's zero_to_fp32 (stages 1-3) or the stage-0 model file."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a login node has no GPU; spare DeepSpeed's guessing
    import torch

    if zero_stage == 0:  # no partitioning: the model file holds every weight (exclude_frozen needs no help here)
        states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # zero_to_fp32 reports progress with print()
        return get_fp32_state_dict_from_zero_checkpoint(
            str(ckpt_dir), tag=tag, exclude_frozen_parameters=exclude_frozen
        )


def choose_checkpoint(run_dir: Path, spec, step: str | None) -> tuple[int, list[str], Path, str, int]:
    """(step, notes, checkpoint folder, tag, ZeRO stage) of the verified checkpoint `step` names (a number, best,
    final, latest or None): every file checked against the manifest; an explicit choice is never swapped for another
    (also for `model.init_from`)."""
    from hpcds.train import checkpoint as ck

    ckpt_dir = Path(spec.checkpoint.dir) if spec.checkpoint.dir else run_dir / facts.CHECKPOINT_DIR
    candidates, broken = committed_candidates(ckpt_dir)
    if step == "best" and candidates:
        newest = max(candidates, key=lambda c: c.step)
        candidates = [
            Candidate(c.step, c.final, _best_step(ckpt_dir / ck.tag_for(c.step))) if c is newest else c
            for c in candidates
        ]
    pointer = runs.read_json(ckpt_dir / ck.POINTER, {}) or {}
    while True:
        notes = [f"skipped {tag}: {'; '.join(problems)}" for tag, problems in broken]
        try:
            chosen = choose_step(step, candidates, pointer.get("step"))
        except HpcdsError as exc:
            raise HpcdsError("\n".join([str(exc), *notes])) from None
        tag = ck.tag_for(chosen)
        problems = checksum_problems(ckpt_dir / tag)
        if not problems:
            break
        if step not in (None, "latest"):  # an explicit choice is never swapped for another checkpoint
            raise HpcdsError(f"{ckpt_dir / tag} is damaged: {'; '.join(problems)}\nhint: export another --step")
        broken.append((tag, problems))
        candidates = [c for c in candidates if c.step != chosen]
    manifest = read_manifest(ckpt_dir / tag)
    return chosen, notes, ckpt_dir, tag, manifest.get("zero_stage", spec.deepspeed.zero_stage)
