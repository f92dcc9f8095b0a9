"""Is a stopped-and-resumed run the same as an uninterrupted one? Per-step losses and final fp32 weights, bit for bit.

One comparison for the resume test of record (tests/test_resume.py, 2 CPU ranks) and the GPU check's resume part
(bench/gpu_parts/training.py): both read two run directories the trainer wrote.
"""

from __future__ import annotations

import json
from pathlib import Path


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Per-step losses rank 0 recorded; a step trained twice (after a kill) keeps its last record."""
    found = {}
    for line in (Path(run_dir) / "losses.jsonl").read_text().splitlines():
        record = json.loads(line)
        found[record["step"]] = record["loss"]
    return found


def final_weights(run_dir: Path, step: int, stage: int) -> dict:
    """The fp32 weights of the checkpoint at `step`: the module itself at ZeRO-0, else gathered from the shards."""
    import torch

    from hpcds import facts
    from hpcds.train import checkpoint as ck

    ckpt_dir, tag = Path(run_dir) / facts.CHECKPOINT_DIR, ck.tag_for(step)
    if stage == 0:
        states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def resume_differences(reference: Path, resumed: Path, steps: int, stage: int) -> list[str]:
    """Every way `resumed` differs from `reference` over steps 1..`steps`; empty when they are bit-identical."""
    import torch

    want, got = losses_by_step(reference), losses_by_step(resumed)
    problems = []
    if sorted(want) != list(range(1, steps + 1)):
        problems.append(f"the reference recorded steps {sorted(want)}, not 1..{steps}")
    differing = [step for step in sorted(set(want) | set(got)) if want.get(step) != got.get(step)]
    if differing:
        first = differing[0]
        where = f"first {first}: {want.get(first)} vs {got.get(first)}"
        problems.append(f"losses differ at {len(differing)} steps, {where}")
    ref_weights, new_weights = final_weights(reference, steps, stage), final_weights(resumed, steps, stage)
    if ref_weights.keys() != new_weights.keys():
        problems.append(f"weight names differ: {sorted(ref_weights.keys() ^ new_weights.keys())[:4]}")
    for name in sorted(ref_weights.keys() & new_weights.keys()):
        a, b = ref_weights[name], new_weights[name]
        if not torch.equal(a, b):
            gap = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
            problems.append(f"{name} differs (largest gap {gap:.3g})")
    return problems
