"""A rank's host settings, made once at start: torch's intra-op threads and glibc's allocator thresholds.

Threads: torch starts one intra-op thread per core it may use, in every rank, so N ranks on a node run N times as
many threads as there are cores. torchrun sets OMP_NUM_THREADS=1 per rank for that reason; DeepSpeed's launcher leaves
it (its `--bind_cores_to_rank` is off by default). hpcds gives each rank its share of the CPUs it may use (Slurm's
cpuset included; torch's own count, one per physical core, where it is lower), never more than torch chose; an
OMP_NUM_THREADS from the user is left as it is.

Allocator: glibc serves each block above its mmap threshold with a fresh mapping and gives freed heap back to the
kernel above its trim threshold; both thresholds move with what the process freed before, so the same step
page-faulted its activations in anew up to twice as often in the trainer as in a bare loop. Fixing them (32 MiB,
the ceiling glibc's moving threshold can reach, and a 1 GiB trim threshold) keeps a step's buffers under 32 MiB in
the heap from one step to the next; each arena may then keep up to 1 GiB of freed heap, which no test has measured in
resident memory. Threshold variables (MALLOC_MMAP_THRESHOLD_ and the like, or glibc.malloc tunables in
GLIBC_TUNABLES) or a preloaded allocator (jemalloc, tcmalloc) from the user leave it alone.

`bench/bench_train.py` measures both; docs/training.md has the numbers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the moving threshold's ceiling
TRIM_THRESHOLD_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def threads_per_rank(cores: int, local_ranks: int, torch_threads: int, env: Mapping[str, str]) -> int | None:
    """The intra-op threads for one of `local_ranks` ranks sharing `cores` (logical CPUs); None: leave torch's
    choice. torch's default, one thread per physical core, is the smaller count where cores are hyperthreaded. No I/O
    here."""
    if env.get("OMP_NUM_THREADS"):
        return None
    share = max(1, min(cores, torch_threads) // max(1, local_ranks))
    return share if share < torch_threads else None


def allocator_left_alone(env: Mapping[str, str]) -> bool:
    """The user chose the allocator or its thresholds. No I/O here."""
    chosen = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
    return (
        any(env.get(name) for name in chosen)
        or "glibc.malloc." in env.get("GLIBC_TUNABLES", "")
        or "malloc" in env.get("LD_PRELOAD", "")
    )


def apply_host_settings(local_ranks: int) -> dict:
    """Set this rank's threads and allocator thresholds; return what holds now, for the `host` event."""
    import torch

    env = os.environ
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = threads_per_rank(cores, local_ranks, torch.get_num_threads(), env)
    if threads is not None:
        torch.set_num_threads(threads)
    return {
        "cores": cores,
        "local_ranks": local_ranks,
        "threads": torch.get_num_threads(),  # read back: what torch uses, whoever chose it
        "threads_from": "OMP_NUM_THREADS" if env.get("OMP_NUM_THREADS") else "hpcds" if threads else "torch",
        "allocator_tuned": not allocator_left_alone(env) and _tune_glibc_malloc(),
    }


def _tune_glibc_malloc() -> bool:
    """True when glibc took both thresholds (False off glibc, e.g. musl)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
