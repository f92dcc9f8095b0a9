"""Resume on another number of ranks: convert a ZeRO checkpoint to DeepSpeed's universal format when the
data-parallel size changed, then load it with `load_universal`.

ZeRO stages 1, 2 and 3 keep each rank's slice of the optimizer states (and of the fp32 master weights) in a file per
rank; those slices only fit the same data-parallel size. DeepSpeed's `ds_to_universal` rewrites them as one file per
parameter (`zero/<param>/fp32.pt`, `exp_avg.pt`, `exp_avg_sq.pt`), which any data-parallel size can slice again; the
engine reads that layout when its config has `checkpoint.load_universal`. Every checkpoint's manifest records
`data_parallel_size` (the world size: hpcds uses neither tensor nor pipeline parallelism), so the trainer knows when
to convert; the ZeRO stage stays pinned. Stage 0 needs nothing (whole weights and optimizer states in one file).
Checked with DeepSpeed 0.19 on CPU ranks: weights and Adam moments bit-identical after 2 -> 1 ranks for stages 2 and
3, and training continues across 4 -> 2 -> 4 ranks (2 -> 1 -> 2 nodes) with stage 2.

The converted copy lives beside the checkpoint it came from, `<checkpoints>/step_<N>.universal/`, with its own
COMMITTED marker, so a second resume reuses it and a conversion cut short is redone. The top part is pure; from
`convert` on, the functions do the I/O and the collectives.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from hpcds.errors import HpcdsError

SUFFIX = ".universal"
MARKER = "COMMITTED"
# ds_to_universal also writes this pointer into the folder above its output; hpcds keeps its own (latest.json).
STRAY_POINTER = "latest_universal"


def saved_world_size(manifest: dict) -> int | None:
    """The data-parallel size a checkpoint was written with (hpcds runs use neither tensor nor pipeline parallelism,
    so it is the world size)."""
    value = manifest.get("data_parallel_size", manifest.get("world_size"))
    return int(value) if isinstance(value, int) else None


def needs_conversion(manifest: dict, *, zero_stage: int, world_size: int) -> bool:
    """True when the checkpoint's ZeRO partitioning does not fit `world_size` ranks and must go through universal."""
    saved = saved_world_size(manifest)
    return saved is not None and saved != world_size and zero_stage > 0


def refusal(manifest: dict, *, zero_stage: int, ckpt_path: Path) -> str | None:
    """Why this resume cannot happen, else None: the ZeRO stage changed (every stage converts to another size)."""
    saved_stage = manifest.get("zero_stage")
    if saved_stage is not None and saved_stage != zero_stage:
        return (
            f"checkpoint {ckpt_path} was written with ZeRO stage {saved_stage}, but this run uses stage {zero_stage}. "
            f"A run's ZeRO stage is pinned for its whole life. hint: set deepspeed.zero_stage: {saved_stage} "
            "(in spec.yaml of the run directory), or start a new run (hpcds run --new / a new hpcds submit)"
        )
    return None


def universal_dir(ckpt_dir: Path, tag: str) -> Path:
    return Path(ckpt_dir) / f"{tag}{SUFFIX}"


# ---------------------------------------------------------------------------------------------------------------------
# I/O


def convert(src: Path, dest: Path, *, workers: int = 1) -> float:
    """Run DeepSpeed's ds_to_universal on `src` into `dest` (one process: rank 0 calls this); returns seconds taken.

    `inject_missing_state` adds the universal-checkpoint version record that DeepSpeed expects in client state and
    that plain `save_checkpoint` calls do not write. The result gets a COMMITTED marker only once complete.
    """
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    started = time.perf_counter()
    if dest.exists():
        shutil.rmtree(dest)
    args = argparse.Namespace(
        input_folder=str(src),
        output_folder=str(dest),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    chatter = io.StringIO()  # progress bars and per-file prints: hundreds of lines for a large model
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as exc:
        shutil.rmtree(dest, ignore_errors=True)
        tail = "\n".join(chatter.getvalue().splitlines()[-5:])
        raise HpcdsError(
            f"converting {src} to a universal checkpoint failed: {type(exc).__name__}: {exc}\n{tail}\n"
            "hint: resume with the node count the checkpoint was written with"
        ) from exc
    (dest.parent / STRAY_POINTER).unlink(missing_ok=True)
    (dest / MARKER).write_text(f"{time.time():.3f}\n")
    return time.perf_counter() - started


def remove_stale(ckpt_dir: Path, keep: Path) -> None:
    """Converted copies of other checkpoints are never read again once a newer one exists."""
    for path in Path(ckpt_dir).glob(f"*{SUFFIX}"):
        if path.is_dir() and path != keep:
            shutil.rmtree(path, ignore_errors=True)


def prepare(ckpt_dir: Path, tag: str, *, rank: int) -> tuple[Path, float | None]:
    """Every rank calls this: rank 0 converts `tag` unless a complete converted copy exists; all wait for it.

    Returns the universal folder and the conversion time (rank 0, None when reused or on other ranks).
    """
    import torch.distributed as dist

    dest = universal_dir(ckpt_dir, tag)
    seconds: float | None = None
    failure: list[Any] = [None]
    if rank == 0:
        try:
            if not (dest / MARKER).is_file():
                seconds = convert(Path(ckpt_dir) / tag, dest)
            remove_stale(ckpt_dir, dest)
        except HpcdsError as exc:
            failure = [str(exc)]
    dist.broadcast_object_list(failure, src=0)
    if failure[0]:
        raise HpcdsError(failure[0] if rank == 0 else f"rank 0 could not convert {tag}: {failure[0]}")
    return dest, seconds


def load_universal(engine, dest: Path) -> None:
    """Load a universal folder into `engine`: its config switches to `load_universal` for this one load.

    `load_universal` is read when loading, not when the engine is built, so the switch is set on the engine's parsed
    config and restored afterwards (later saves are ordinary ZeRO checkpoints of the new size).
    """
    config = engine._config
    saved = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        engine.load_checkpoint(str(dest.parent), tag=dest.name)
    finally:
        config.load_universal_checkpoint = saved


def load_for_resume(
    engine, ckpt_dir: Path, tag: str, manifest: dict, *, zero_stage: int, rank: int, world_size: int
) -> tuple[dict, dict | None]:
    """Load checkpoint `tag` into `engine` on every rank, through the universal format when the number of ranks
    changed. Returns this rank's saved state (trainer state, RNG states, `saved_time`) and, when converted, what to log.

    With more ranks than the checkpoint had, a new rank takes the saved state of the rank it maps onto: the trainer
    state is the same on every rank, and the RNG streams only need to differ between ranks.
    """
    import os

    import torch

    from hpcds.train.checkpoint import rank_state_name

    path = Path(ckpt_dir) / tag
    problem = refusal(manifest, zero_stage=zero_stage, ckpt_path=path)
    if problem:
        raise HpcdsError(problem)
    saved_world = saved_world_size(manifest) or world_size
    converted = None
    if needs_conversion(manifest, zero_stage=zero_stage, world_size=world_size):
        started = time.perf_counter()
        dest, convert_s = prepare(Path(ckpt_dir), tag, rank=rank)
        load_universal(engine, dest)
        converted = {
            "tag": tag,
            "from_world_size": saved_world,
            "to_world_size": world_size,
            "zero_stage": zero_stage,
            "convert_s": None if convert_s is None else round(convert_s, 3),
            "load_s": round(time.perf_counter() - started, 3),
        }
    else:
        engine.load_checkpoint(str(ckpt_dir), tag=tag)
    own = path / rank_state_name(rank)
    rank_file = own if own.is_file() else path / rank_state_name(rank % saved_world)
    saved = torch.load(rank_file, weights_only=False)
    saved["saved_time"] = os.path.getmtime(rank_file)
    return saved, converted
