"""The rules of a checkpoint folder, as pure functions: names, the files one DeepSpeed save writes, the manifest,
the checks a listing and the checksums must pass, and which checkpoints retention keeps. No I/O here; the I/O is in
hpcds.train.checkpoint, which re-exports these names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MANIFEST = "manifest.json"
COMMITTED = "COMMITTED"
POINTER = "latest.json"
SET_ASIDE = ".bad"
# DeepSpeed copies each rank's NVMe optimizer swap files here, under names it does not fix.
NVME_COPY = "offloaded_tensors"
_TAG = re.compile(r"step_(\d+)")


def tag_for(step: int) -> str:
    return f"step_{step}"


def step_of(tag: str) -> int | None:
    match = _TAG.fullmatch(tag)
    return int(match.group(1)) if match else None


def rank_state_name(rank: int) -> str:
    return f"rank_{rank}_state.pt"


# ---------------------------------------------------------------------------------------------------------------------
# Pure: expected files, manifest, verification, retention


@dataclass(frozen=True)
class Expected:
    """What one save leaves in step_<N>/: files by name, and folders whose file names DeepSpeed does not fix."""

    files: frozenset[str]
    folders: frozenset[str] = frozenset()


def expected_files(
    world_size: int, *, zero_stage: int, bf16: bool, partitioned_optimizer: bool, nvme_optimizer: bool = False
) -> Expected:
    """The files DeepSpeed 0.19's `save_checkpoint` writes for one save, plus hpcds's per-rank state files.

    Names as DeepSpeed's engine makes them (`_get_ckpt_name`, `_get_rank_zero_ckpt_name`; no tensor or pipeline
    parallelism, so the model-parallel rank is always 00): the model states come from data-parallel rank 0, or from
    every rank under ZeRO-3, which partitions the weights; a partitioned optimizer (every ZeRO stage 1-3 optimizer,
    and DeepSpeed's BF16_Optimizer) adds one optimizer-state file per rank, prefixed `bf16_` when bf16 is on; with the
    optimizer offloaded to NVMe, each rank also copies its swap files into `offloaded_tensors/rank<NN>/`.
    """
    ranks = range(world_size)
    if zero_stage == 3:
        files = {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in ranks}
    else:
        files = {"mp_rank_00_model_states.pt"}
    if partitioned_optimizer:
        prefix = "bf16_" if bf16 else ""
        files |= {f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in ranks}
    files |= {rank_state_name(r) for r in ranks}
    folders = {f"{NVME_COPY}/rank{r:02d}" for r in ranks} if nvme_optimizer else set()
    return Expected(frozenset(files), frozenset(folders))


def check_written(expected: Expected, listed: Iterable[str]) -> list[str]:
    """Problems with a fresh save's listing: expected files it lacks, and files this save did not write.

    A lacking file was not written, or is not yet visible to the lister (another node's write on a shared file
    system); an extra one is stale (a cached entry, an earlier save's leftover) or another job's. Either way the
    manifest would silently vouch for the wrong set, so both are errors.
    """
    listed = set(listed)
    in_folder = {folder: {rel for rel in listed if rel.startswith(f"{folder}/")} for folder in sorted(expected.folders)}
    problems = [f"{rel} is missing" for rel in sorted(expected.files - listed)]
    problems += [f"{folder}/ holds no file" for folder, rels in in_folder.items() if not rels]
    unexpected = listed - expected.files - set().union(*in_folder.values())
    return problems + [f"{rel} was not written by this save" for rel in sorted(unexpected)]


def render_manifest(step: int, files: dict[str, tuple[int, int]], **info: Any) -> dict[str, Any]:
    """The manifest for one checkpoint: {relative path: (size_bytes, crc32)} plus free-form info (stage, world)."""
    return {
        "step": step,
        "files": {rel: {"size_bytes": size, "crc32": crc} for rel, (size, crc) in sorted(files.items())},
        "total_bytes": sum(size for size, _ in files.values()),
        **info,
    }


def check_listing(manifest: Any, committed: bool, sizes_on_disk: dict[str, int]) -> list[str]:
    """Problems visible without reading file contents: marker, manifest shape, missing or resized files."""
    if not committed:
        return ["no COMMITTED marker (the save never finished: killed, out of disk, or still running)"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return ["manifest.json is missing or unreadable"]
    problems = []
    for rel, entry in manifest["files"].items():
        if rel not in sizes_on_disk:
            problems.append(f"{rel} is missing")
        elif sizes_on_disk[rel] != entry.get("size_bytes"):
            problems.append(f"{rel} has {sizes_on_disk[rel]} bytes, the manifest says {entry.get('size_bytes')}")
    if not manifest["files"]:
        problems.append("the manifest lists no files")
    return problems


def check_checksums(manifest: dict, crcs: dict[str, int]) -> list[str]:
    """Problems from contents: files whose CRC-32 differs from the manifest's."""
    return [
        f"{rel} fails its checksum (corrupt or overwritten)"
        for rel, crc in sorted(crcs.items())
        if manifest["files"].get(rel, {}).get("crc32") != crc
    ]


def choose_retained(
    committed_steps: Iterable[int],
    *,
    keep_last: int,
    best_step: int | None = None,
    final_step: int | None = None,
    keep_every_steps: int | None = None,
) -> set[int]:
    """Steps whose checkpoints stay: the newest `keep_last`, the best, the final, and multiples of keep_every_steps."""
    steps = sorted(set(committed_steps))
    keep = set(steps[-keep_last:]) if keep_last > 0 else set()
    keep |= {s for s in (best_step, final_step) if s is not None and s in steps}
    if keep_every_steps:
        keep |= {s for s in steps if s % keep_every_steps == 0}
    return keep


def choose_deleted(all_steps: Iterable[int], committed_steps: Iterable[int], retained: set[int]) -> list[int]:
    """Folders to remove after a commit: committed ones not retained, and broken ones older than the newest commit.

    Broken folders newer than the newest commit are left alone: they are only ever the save in progress (or one
    about to be overwritten by the same step's next save).
    """
    committed = set(committed_steps)
    if not committed:
        return []
    newest = max(committed)
    return sorted(s for s in set(all_steps) if s not in retained and (s in committed or s < newest))
