"""The conversion to DeepSpeed's universal format, in the child process rank 0 starts for it
(`python -m hpcds.train.universal_convert SRC DEST`; hpcds.train.universal says why and when).

`ds_to_universal` extracts every rank's slices into `DEST/tmp/`, then merges them per parameter. `convert` wraps the
extraction: once it returns, the slices are fsynced and `DEST/EXTRACTED` records the source digest and their count
and bytes, so a conversion cut short after that point reuses them and redoes only the merge.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from hpcds.train.universal import (
    EXTRACTED,
    MARKER,
    SLICES,
    STRAY_POINTER,
    source_digest,
    worker_counts,
)


def walk_files(folder: Path, *, fsync: bool = False) -> tuple[int, int]:
    """(files, bytes) under `folder`; with `fsync`, each file and folder is synced first, so that a marker written
    after this cannot reach the disk before the data it vouches for."""
    files = total_bytes = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if fsync:
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
            files, total_bytes = files + 1, total_bytes + os.path.getsize(path)
        if fsync:
            fd = os.open(root, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return files, total_bytes


def reusable_slices(dest: Path, digest: str) -> bool:
    """True when `dest` holds the complete slices of this very source: the marker's digest, count and bytes agree."""
    try:
        record = json.loads((dest / EXTRACTED).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("source") != digest or not (dest / SLICES).is_dir():
        return False
    return list(walk_files(dest / SLICES)) == [record.get("files"), record.get("bytes")]


def _largest_param(src: Path) -> tuple[int, int] | None:
    """(parameters, fp32 bytes of the largest) from a model-states file's `param_shapes`, read without its tensors."""
    import torch

    for path in sorted(src.glob("*mp_rank_00_model_states.pt")):
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        shapes = {name: shape for group in state.get("param_shapes") or [] for name, shape in group.items()}
        if shapes:
            return len(shapes), 4 * max(int(torch.Size(shape).numel()) for shape in shapes.values())
    return None


def available_memory_bytes() -> int:
    """What this process may still allocate: the machine's available memory, or less under a cgroup v2 limit
    (Slurm's memory enforcement)."""
    import psutil

    available = psutil.virtual_memory().available
    try:
        cgroup = Path("/proc/self/cgroup").read_text().splitlines()[0].split("::", 1)[1]
        folder = Path("/sys/fs/cgroup") / cgroup.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((folder / "memory.current").read_text()))
    except (OSError, IndexError, ValueError):
        pass  # cgroup v1 or none: the machine's figure
    return max(0, available)


def convert(src: Path, dest: Path) -> dict[str, Any]:
    """Run DeepSpeed's ds_to_universal on `src` into `dest`, reusing complete slices of an earlier try; returns what
    to log. `dest` gets a COMMITTED marker (the source digest) only once complete and on disk.

    `inject_missing_state` adds the universal-checkpoint version record that DeepSpeed expects in client state and
    that plain `save_checkpoint` calls do not write.
    """
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    from hpcds.runs import write_text_atomic
    from hpcds.train.preempt import faults_from_env

    started = time.perf_counter()
    digest = source_digest(json.loads((src / "manifest.json").read_text()))
    reused = reusable_slices(dest, digest)
    if reused:  # everything but the slices: a merge cut short can leave a half-written file of any name
        for path in dest.iterdir():
            if path.name not in (SLICES, EXTRACTED):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    shards = list(src.glob("*optim_states.pt"))
    shard_bytes = max(path.stat().st_size for path in shards)
    # Without the shapes, no parameter is larger than a whole shard, and any number of them may be merged at once.
    params, param_bytes = _largest_param(src) or (1 << 30, shard_bytes)
    extract_workers, merge_workers = worker_counts(
        cpus=len(os.sched_getaffinity(0)),
        source_ranks=len(shards),
        params=params,
        shard_bytes=shard_bytes,
        param_bytes=param_bytes,
        available_bytes=available_memory_bytes(),
    )
    args = argparse.Namespace(
        input_folder=str(src),
        output_folder=str(dest),
        num_extract_workers=extract_workers,
        num_merge_workers=merge_workers,
        keep_temp_folder=True,  # hpcds removes the slices itself, after the commit is decided
        strict=True,
        inject_missing_state=True,
    )
    sleep_s = faults_from_env().convert_sleep_s

    def marked(extract):
        def run(*a, **k):
            if not reused:
                extract(*a, **k)
                files, total_bytes = walk_files(dest / SLICES, fsync=True)
                record = {"source": digest, "files": files, "bytes": total_bytes}
                write_text_atomic(dest / EXTRACTED, json.dumps(record) + "\n")
            if sleep_s:  # HPCDS_TEST_FAULT convert_sleep:S, a slow conversion, after the slices are safe
                time.sleep(sleep_s)

        return run

    # DeepSpeed 0.19's extraction steps of stages 1-2 and 3; a version without them converts, but cannot resume.
    names = ("_extract_zero_shard_files", "_extract_zero_shard_files_stage3")
    originals = {name: getattr(ds_to_universal, name) for name in names if hasattr(ds_to_universal, name)}
    for name, extract in originals.items():
        setattr(ds_to_universal, name, marked(extract))
    try:
        ds_to_universal.main(args)
    finally:
        for name, extract in originals.items():
            setattr(ds_to_universal, name, extract)
    (dest / EXTRACTED).unlink(missing_ok=True)
    shutil.rmtree(dest / SLICES, ignore_errors=True)
    (dest.parent / STRAY_POINTER).unlink(missing_ok=True)
    walk_files(dest, fsync=True)
    write_text_atomic(dest / MARKER, digest + "\n")
    return {
        "reused_slices": reused,
        "extract_workers": extract_workers,
        "merge_workers": merge_workers,
        "convert_s": round(time.perf_counter() - started, 3),
    }


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when the rank that started it dies (a SIGKILLed rank leaves no converter
    behind to race the next try), then check that it had not died already."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m hpcds.train.universal_convert")
    parser.add_argument("src", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--parent-pid", type=int)
    args = parser.parse_args(argv)
    if args.parent_pid:
        _die_with_parent(args.parent_pid)
    import multiprocessing

    # ds_to_universal's worker pools use the default start method, fork on Linux: forked from a process that has
    # already run torch (shard loading, the in-process extraction), merge workers hung for good in a futex here.
    # A fork server forks them from a fresh process instead.
    multiprocessing.set_start_method("forkserver", force=True)
    result = convert(args.src, args.dest)
    print("RESULT " + json.dumps(result), file=sys.stdout, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
