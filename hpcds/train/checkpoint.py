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
holds exactly the files the save writes. A save is two halves: `write_shards` (every file written and checksummed
as it is written, or snapshotted for a background writer: hpcds.train.shard_write) and `commit`, which every rank
calls once every rank's files are written. The rules (names, expected files, manifest checks, retention choice) are
pure functions in hpcds.train.ckpt_rules; this module does the I/O and the collectives.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcds.errors import HpcdsError
from hpcds.train.ckpt_rules import (  # noqa: F401 (re-exported: the checkpoint's names in one place)
    COMMITTED,
    MANIFEST,
    NVME_COPY,
    POINTER,
    SET_ASIDE,
    Expected,
    check_checksums,
    check_listing,
    check_written,
    choose_deleted,
    choose_retained,
    expected_files,
    rank_state_name,
    render_manifest,
    step_of,
    tag_for,
)
from hpcds.train.progress import PhaseTimer

# 8 MiB reads keep CRC-32 (about 2 GB/s per core) near disk speed without holding a shard in memory.
_CHUNK_BYTES = 8 << 20


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


@dataclass
class Pending:
    """A save whose files are written (synchronous) or being written by a `BackgroundWrite` (asynchronous), and not
    yet committed. `written`: this rank's files as {path relative to the folder: (size_bytes, crc32)}."""

    step: int
    folder: Path
    written: dict[str, tuple[int, int]] = field(default_factory=dict)
    background: Any = None
    phases_s: dict[str, float] = field(default_factory=dict)

    def done(self) -> bool:
        return self.background is None or self.background.done()

    def wait(self) -> None:
        if self.background is not None:
            self.background.wait()


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
    pending = write_shards(engine, ckpt_dir, step, client_state, rank_state, rank=rank)
    return commit(engine, ckpt_dir, pending, rank=rank, world=world, info=info, fault_kill_at_step=fault_kill_at_step)


def write_shards(
    engine,
    ckpt_dir: Path,
    step: int,
    client_state: dict,
    rank_state: dict,
    *,
    rank: int,
    snapshot: bool = False,
    pin: bool = False,
    buffers: Any = None,
    write_fault: dict | None = None,
) -> Pending:
    """Every rank: DeepSpeed's save of `step_<step>` plus this rank's state file, written now and checksummed as
    written, or (`snapshot`) copied to host memory and handed to a background writer; nothing is committed here.

    `buffers`: a `shard_write.HostBuffers` to take the snapshot's tensors from (released by the caller once written);
    `write_fault`: the tests' faults for the background writer (`kill_before_done`, `sleep_s`)."""
    import torch.distributed as dist

    from hpcds.train import shard_write

    tag = tag_for(step)
    folder = ckpt_dir / tag
    phase = PhaseTimer()
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if folder.exists():  # leftovers of a save that died at this same step: never mix two saves' files
            shutil.rmtree(folder)
    dist.barrier()
    with shard_write.torch_zip_crc_off(), shard_write.recording(engine, snapshot, pin, buffers) as recorder:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        folder.mkdir(parents=True, exist_ok=True)
        recorder.save(rank_state, str(folder / rank_state_name(rank)))
    pending = Pending(step, folder)
    if snapshot:
        pending.background = shard_write.BackgroundWrite(recorder.items, **(write_fault or {})).start()
        phase("snapshot")
    else:
        pending.written = {str(Path(path).relative_to(folder)): entry for path, entry in recorder.written.items()}
        phase("deepspeed_save")
    pending.phases_s = phase.phases_s
    return pending


def commit(
    engine,
    ckpt_dir: Path,
    pending: Pending,
    *,
    rank: int,
    world: int,
    info: dict,
    fault_kill_at_step: int | None = None,
) -> dict:
    """Every rank, once every rank's files of `pending` are written: check rank 0's listing against what the save
    writes and what each rank recorded, checksum what nobody recorded, then rank 0 writes the manifest, COMMITTED
    and latest.json. Returns the manifest plus `timings_s` (on every rank)."""
    import torch.distributed as dist

    from hpcds.runs import fsync_dir, write_json_atomic

    step, folder, tag = pending.step, pending.folder, pending.folder.name
    phase = PhaseTimer()
    pending.wait()
    background = pending.background
    if background is not None:
        pending.written = {str(Path(p).relative_to(folder)): entry for p, entry in background.written.items()}
    mine = (pending.written, background.error if background else None, background.seconds if background else 0.0)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    dist.barrier()
    # One listing for every rank: on a shared file system each node's view of the folder may differ.
    listing: list[Any] = [sizes_under(folder) if rank == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    sizes: dict[str, int] = listing[0]
    recorded = {rel: entry for part, _, _ in gathered for rel, entry in part.items()}
    # Every rank checks the same listing, so every rank raises together and none waits in a collective.
    problems = [f"rank {r} could not write: {error}" for r, (_, error, _) in enumerate(gathered) if error]
    problems += check_written(_expected_of(engine, world), sizes)
    problems += [
        f"{rel} has {sizes[rel]} bytes, {size} were written"
        for rel, (size, _) in recorded.items()
        if rel in sizes and sizes[rel] != size
    ]
    if problems:
        raise HpcdsError(
            f"checkpoint {folder} is not committed: rank 0's listing of it is not the set of files this save "
            f"writes (ZeRO stage {engine.zero_optimization_stage()}, {world} ranks): " + "; ".join(problems) + ". "
            f"{ckpt_dir / POINTER} still names the previous checkpoint. hint: every node must see the same "
            "checkpoint.dir, with other nodes' writes visible once closed, and no other job may write into it"
        )
    if background is not None:
        phase.phases_s["write"] = round(max(seconds for _, _, seconds in gathered), 3)
    rels = sorted(sizes)
    # Files written past the recorder (DeepSpeed's NVMe swap copies) are read for their CRC-32 and fsynced here (each
    # rank its share), so that COMMITTED never reaches the disk before the data it vouches for.
    unrecorded = [rel for rel in rels if rel not in recorded]
    crcs = {rel: crc for rel, (_, crc) in recorded.items()}
    crcs |= _shared_crcs(folder, unrecorded, rank, world, fsync=True) if unrecorded else {}
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
    return {**manifest, "timings_s": {**pending.phases_s, **phase.phases_s}}


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
