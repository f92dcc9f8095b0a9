"""Verified checkpoints: DeepSpeed's shards, then a manifest, a commit marker and an atomically replaced pointer.

Layout under the checkpoint folder (`checkpoint.dir`, default `<run dir>/checkpoints`):

    step_<N>/             DeepSpeed's `save_checkpoint(dir, tag="step_<N>", save_latest=False)` output
      rank_<r>_state.pt   per-rank RNG states (DeepSpeed keeps client state from rank 0 only)
      manifest.json       every other file with its size and CRC-32, plus step, ZeRO stage, world and data-parallel size
      COMMITTED           written last, after every rank finished and the manifest is on disk
    step_<N>.bad/         a committed checkpoint that resume rejected, set aside: never resumed from, never deleted
    latest.json           {"tag", "step"}: replaced atomically once COMMITTED is durable

A checkpoint counts only when COMMITTED exists and every file matches the manifest; resume takes the newest one that
does and reports each one it skips. DeepSpeed's own `latest` file is never written (it is written before DeepSpeed's
final barrier, and a stale one silently restarts training from step 0). On a shared file system a node's listing can
lag other nodes' writes or keep stale entries: a save commits only when rank 0's listing, the one every rank uses,
holds exactly the files the save writes. The top half of this module is pure (names, expected files, manifest checks,
retention choice); the bottom half does the I/O and the collectives.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcds.errors import HpcdsError
from hpcds.train.progress import PhaseTimer

MANIFEST = "manifest.json"
COMMITTED = "COMMITTED"
POINTER = "latest.json"
SET_ASIDE = ".bad"
# DeepSpeed copies each rank's NVMe optimizer swap files here, under names it does not fix.
NVME_COPY = "offloaded_tensors"
_TAG = re.compile(r"step_(\d+)")
# 8 MiB reads keep CRC-32 (about 2 GB/s per core) near disk speed without holding a shard in memory.
_CHUNK_BYTES = 8 << 20


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


# ---------------------------------------------------------------------------------------------------------------------
# I/O: listing, checksums, save, resume


@dataclass
class Resumed:
    """What `find_resumable` picked: the tag and its manifest, what it skipped on the way (newest first), and on rank 0
    the new names of the skipped folders it set aside."""

    tag: str | None
    manifest: dict = field(default_factory=dict)
    skipped: list[tuple[str, list[str]]] = field(default_factory=list)
    set_aside: dict[str, str] = field(default_factory=dict)


def list_tags(ckpt_dir: Path) -> list[str]:
    """step_<N> folders, newest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p.name) is not None]
    return sorted(tags, key=step_of, reverse=True)


def sizes_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def crc32_file(path: Path, fsync: bool = False) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            crc = zlib.crc32(chunk, crc)
        if fsync:
            os.fsync(handle.fileno())
    return crc


def _shared_crcs(folder: Path, rels: list[str], rank: int, world: int, fsync: bool) -> dict[str, int]:
    """CRC-32 of `rels` with the work split over the ranks (file i goes to rank i % world), gathered on every rank."""
    import torch.distributed as dist

    mine = {rel: crc32_file(folder / rel, fsync) for i, rel in enumerate(rels) if i % world == rank}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return {rel: crc for part in gathered for rel, crc in part.items()}


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def _torch_zip_crc_off():
    """torch.save's per-record CRC-32 (miniz, slower than zlib's) cost ~40% of a save in measurements; the manifest's
    whole-file CRC-32s, computed with zlib and split over the ranks, replace it. torch.load does not need it."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # torch < 2.6: no switch, nothing to do
        yield
        return
    saved = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = saved


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    client_state: dict,
    rank_state: dict,
    *,
    rank: int,
    world: int,
    info: dict,
    fault_kill_at_step: int | None = None,
) -> dict:
    """Save `step_<step>` on every rank and commit it; returns the manifest plus `timings_s` (on every rank).

    Every rank must call this. `fault_kill_at_step` is the fault-injection hook the tests use to SIGKILL rank 0
    after the shards are written but before the commit (HPCDS_TEST_FAULT=kill_in_save:N).
    """
    import torch
    import torch.distributed as dist

    from hpcds.runs import fsync_dir, write_json_atomic

    tag = tag_for(step)
    folder = ckpt_dir / tag
    phase = PhaseTimer()
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # leftovers of a save that died at this same step: never mix two saves' files
            shutil.rmtree(folder)
    dist.barrier()
    with _torch_zip_crc_off():
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(rank_state, folder / rank_state_name(rank))
    dist.barrier()
    phase("deepspeed_save")
    # One listing for every rank: on a shared file system each node's view of the folder may differ.
    listing: list[Any] = [sizes_under(folder) if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    sizes: dict[str, int] = listing[0]
    # Every rank checks the same listing, so every rank raises together and none waits in a collective.
    problems = check_written(_expected_of(engine, world), sizes)
    if problems:
        raise HpcdsError(
            f"checkpoint {folder} is not committed: rank 0's listing of it is not the set of files this save "
            f"writes (ZeRO stage {engine.zero_optimization_stage()}, {world} ranks): " + "; ".join(problems) + ". "
            f"{ckpt_dir / POINTER} still names the previous checkpoint. hint: every node must see the same "
            "checkpoint.dir, with other nodes' writes visible once closed, and no other job may write into it"
        )
    rels = sorted(sizes)
    # fsync here (each rank its share) so that COMMITTED never reaches the disk before the data it vouches for.
    crcs = _shared_crcs(folder, rels, rank, world, fsync=True)
    # The data-parallel size tells a later resume on another node count to go through the universal format.
    info = {"data_parallel_size": world, **info}
    manifest = render_manifest(step, {rel: (sizes[rel], crcs[rel]) for rel in rels}, **info)
    phase("checksum_fsync")
    if rank == 0:
        if fault_kill_at_step == step:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        _write_durable(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _write_durable(folder / COMMITTED, f"{time.time():.3f}\n")
        fsync_dir(folder)
        write_json_atomic(ckpt_dir / POINTER, {"tag": tag, "step": step, "time": round(time.time(), 3)})
    # Nobody leaves before the commit: a rank exiting early (EXIT_REQUEUE) makes the launcher kill the others.
    dist.barrier()
    phase("commit")
    return {**manifest, "timings_s": phase.phases_s}


def _expected_of(engine, world: int) -> Expected:
    """`expected_files` with the facts read from the engine DeepSpeed built (the data-parallel size is the world)."""
    return expected_files(
        world,
        zero_stage=engine.zero_optimization_stage(),
        bf16=engine.bfloat16_enabled(),
        # DeepSpeed's own test for writing per-rank optimizer files: the optimizer has a data-parallel group.
        partitioned_optimizer=hasattr(engine.optimizer, "dp_process_group"),
        nvme_optimizer=bool(engine.zero_nvme_offload_optimizer()),
    )


def apply_retention(ckpt_dir: Path, retained_for: Any) -> list[str]:
    """Delete what `choose_deleted` names; `retained_for(committed_steps) -> set[int]`. Rank 0 only. Returns tags."""
    tags = list_tags(ckpt_dir)
    steps = [step_of(t) for t in tags]
    committed = [step_of(t) for t in tags if (ckpt_dir / t / COMMITTED).is_file()]
    doomed = choose_deleted(steps, committed, retained_for(committed))
    for step in doomed:
        # Drop the marker first: a deletion cut short must leave an uncommitted folder, never a committed torso.
        marker = ckpt_dir / tag_for(step) / COMMITTED
        marker.unlink(missing_ok=True)
        shutil.rmtree(ckpt_dir / tag_for(step), ignore_errors=True)
    return [tag_for(s) for s in doomed]


def set_aside(ckpt_dir: Path, tag: str) -> str:
    """Rename a rejected checkpoint to `<tag>.bad` (`.bad.2`, `.bad.3`, ... when taken); returns the new name.

    Kept rather than deleted: the rejection may be the file system's fault, and the files show what went wrong.
    """
    from hpcds.runs import fsync_dir

    name, count = f"{tag}{SET_ASIDE}", 1
    while (ckpt_dir / name).exists():
        count += 1
        name = f"{tag}{SET_ASIDE}.{count}"
    os.rename(ckpt_dir / tag, ckpt_dir / name)
    fsync_dir(ckpt_dir)
    return name


def _read_manifest(folder: Path) -> Any:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def find_resumable(ckpt_dir: Path, *, rank: int, world: int, verify_checksums: bool = True) -> Resumed:
    """The newest checkpoint that checks out, agreed by every rank (rank 0 lists, all ranks share the checksums)."""
    import torch.distributed as dist

    listing: list[Any] = [None]
    if rank == 0:
        found = []
        for tag in list_tags(ckpt_dir):
            folder = ckpt_dir / tag
            manifest, committed = _read_manifest(folder), (folder / COMMITTED).is_file()
            found.append((tag, manifest, committed, check_listing(manifest, committed, sizes_under(folder))))
        listing = [found]
    dist.broadcast_object_list(listing, src=0)
    result = Resumed(tag=None)
    for tag, manifest, committed, problems in listing[0]:
        if not problems and verify_checksums:
            crcs = _shared_crcs(ckpt_dir / tag, sorted(manifest["files"]), rank, world, fsync=False)
            problems = check_checksums(manifest, crcs)
        if problems:
            result.skipped.append((tag, problems))
            # A committed folder that fails is newer than any that passes: left as it is, retention would count it
            # among the newest and delete good checkpoints for it. No rank reads it again (the checksums are in).
            if committed and rank == 0:
                result.set_aside[tag] = set_aside(ckpt_dir, tag)
            continue
        result.tag, result.manifest = tag, manifest
        break
    return result
