"""The pre-flight check of one node, run by `hpcds launch` before DeepSpeed starts its ranks.

Each node checks, in a few seconds: the run directory (and the checkpoint folder when it lives elsewhere) takes a
file and an fsync; its file system has room for one more checkpoint of the planner's size; host memory covers the
planner's CPU bytes per node (`hpcds plan`'s CPU per node: offloaded optimizer and parameters, the fp32 model every
rank builds first; the planner counts CPU ranks' own model states as device memory, so they are not in it); /dev/shm
has room for the ranks' shared-memory buffers; on GPU specs the GPUs are visible, have the planned memory free and no
uncorrected ECC errors (NVML, where pynvml is installed); and with several nodes, the `hpcds launch` processes form a
gloo group on the first node (rendezvous port + 1) and all-reduce a small and an 8 MiB tensor within a time limit.
Every node joins that group even when a check of its own failed, so the healthy ones never wait beyond the limit.

The `judge_*` functions, `needs_of` and `render_failures` are pure; `measure_*` and `run_preflight` are the thin I/O
around them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from hpcds.facts import CHECKPOINT_DIR

# DeepSpeed's CPU all-reduce buffer is 69 MB per rank in /dev/shm, and NCCL's shared-memory transport maps its
# buffers there too; a container's default 64 MiB /dev/shm is the failure this catches.
SHM_PER_RANK_BYTES = 128 * 2**20
# Long enough for srun's per-node start skew (imports from a cold shared file system), short enough that a node
# that cannot reach the first fails within seconds instead of NCCL's 30-minute default.
NETWORK_TIMEOUT_S = 10.0
BANDWIDTH_TENSOR_BYTES = 8 * 2**20
PROBE_FILE = ".hpcds-preflight-probe"


@dataclass(frozen=True)
class Check:
    """One verdict: what was measured against what limit, and what to do when it fails."""

    name: str
    ok: bool
    message: str
    values: dict[str, Any] = field(default_factory=dict)
    hint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**self.values, "ok": self.ok, "message": self.message}


@dataclass(frozen=True)
class Needs:
    """What the pinned spec asks of one node, from the planner."""

    checkpoint_bytes: int
    host_bytes: int
    shm_bytes: int
    gpus: int
    gpu_free_bytes: int  # per GPU; 0 on CPU ranks


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def needs_of(spec) -> Needs:
    """The planner's figures for the pinned spec's strategy (its zero_stage is never `auto` in a run directory)."""
    from hpcds.plan import checkpoint_bytes, plan_job

    plan = plan_job(spec)
    row = plan.chosen or plan.recommended
    slurm = spec.slurm
    return Needs(
        checkpoint_bytes=checkpoint_bytes(plan.params, spec.training.precision),
        host_bytes=row.cpu_bytes_per_node if row else 0,
        shm_bytes=SHM_PER_RANK_BYTES * slurm.ranks if slurm.ranks > 1 else 0,
        gpus=slurm.gpus_per_node,
        gpu_free_bytes=row.total_bytes if (row and slurm.gpus_per_node) else 0,
    )


def judge_writable(errors: Mapping[str, str | None]) -> Check:
    """`errors`: per folder, why a file could not be written and fsynced there (None: it could)."""
    values = {"paths": list(errors)}
    failed = {path: error for path, error in errors.items() if error is not None}
    if not failed:
        return Check("writable", True, f"{', '.join(errors)} take(s) a file and an fsync", values)
    return Check(
        "writable",
        False,
        "; ".join(f"{path} is not writable: {error}" for path, error in failed.items()),
        {**values, "errors": failed},
        "check the folder's permissions and that its file system is mounted read-write on this node",
    )


def judge_disk(free_bytes: int, need_bytes: int, path: Path) -> Check:
    values = {"path": str(path), "free_bytes": free_bytes, "limit_bytes": need_bytes}
    if free_bytes >= need_bytes:
        return Check("disk", True, f"{_gib(free_bytes)} free at {path}, a checkpoint takes {_gib(need_bytes)}", values)
    return Check(
        "disk",
        False,
        f"{_gib(free_bytes)} free at {path}, but one checkpoint takes {_gib(need_bytes)} ({need_bytes} bytes)",
        values,
        "free space there, or point checkpoint.dir at a file system with room (checkpoint.keep_last bounds how "
        "many are kept)",
    )


def judge_memory(available_bytes: int, need_bytes: int) -> Check:
    values = {"available_bytes": available_bytes, "limit_bytes": need_bytes}
    if available_bytes >= need_bytes:
        return Check("memory", True, f"{_gib(available_bytes)} available, the plan needs {_gib(need_bytes)}", values)
    return Check(
        "memory",
        False,
        f"{_gib(available_bytes)} of host memory available (MemAvailable), but the plan needs {_gib(need_bytes)} "
        "per node (`hpcds plan` shows CPU per node)",
        values,
        "free the node's memory (leftover processes, files in /dev/shm), or plan less CPU offload / more nodes",
    )


def judge_shm(free_bytes: int, need_bytes: int) -> Check:
    values = {"free_bytes": free_bytes, "limit_bytes": need_bytes}
    if free_bytes >= need_bytes:
        return Check("shm", True, f"{_gib(free_bytes)} free in /dev/shm, the ranks need {_gib(need_bytes)}", values)
    return Check(
        "shm",
        False,
        f"{_gib(free_bytes)} free in /dev/shm, but the node's ranks need {_gib(need_bytes)} for shared-memory buffers",
        values,
        "remove stale files from /dev/shm, or give a container a larger one (docker --shm-size, pyxis/apptainer "
        "share the host's)",
    )


def judge_gpus(free_bytes: Sequence[int], need_gpus: int, need_free_bytes: int, ecc_errors: Sequence[int]) -> Check:
    """`free_bytes` per visible GPU; `ecc_errors` the uncorrected volatile ECC count per GPU (empty without NVML)."""
    values = {
        "visible": len(free_bytes),
        "limit_gpus": need_gpus,
        "free_bytes": list(free_bytes),
        "limit_free_bytes": need_free_bytes,
        "ecc_errors": list(ecc_errors),
    }
    problems = []
    if len(free_bytes) < need_gpus:
        problems.append(f"{len(free_bytes)} GPU(s) visible, the spec asks for {need_gpus}")
    short = [i for i, free in enumerate(free_bytes[:need_gpus]) if free < need_free_bytes]
    if short:
        problems.append(
            "GPU " + ", ".join(f"{i} has {_gib(free_bytes[i])} free" for i in short) + f", the plan needs "
            f"{_gib(need_free_bytes)} each"
        )
    bad = [i for i, count in enumerate(ecc_errors) if count > 0]
    if bad:
        problems.append("uncorrected ECC errors on GPU " + ", ".join(f"{i} ({ecc_errors[i]})" for i in bad))
    if not problems:
        return Check("gpus", True, f"{len(free_bytes)} GPU(s) visible with the planned memory free", values)
    return Check(
        "gpus",
        False,
        "; ".join(problems),
        values,
        "another process may hold the GPUs (nvidia-smi), or the node needs draining; check --gpus-per-node",
    )


def judge_network(error: str | None, seconds: float, gbps: float | None, peer: str, timeout_s: float) -> Check:
    values = {"peer": peer, "seconds": round(seconds, 3), "allreduce_gbps": gbps, "limit_s": timeout_s}
    if error is None:
        return Check("network", True, f"all-reduce with every node via {peer}: {gbps:.2f} Gb/s", values)
    return Check(
        "network",
        False,
        f"no all-reduce with every node via {peer} within {timeout_s:g} s: {error}",
        {**values, "error": error},
        "the nodes must reach the first node's address on the rendezvous port + 1 (firewall, routes, "
        "GLOO_SOCKET_IFNAME in slurm.env)",
    )


def render_failures(host: str, checks: Sequence[Check]) -> str:
    """What a failing node prints to stderr: one line per failed check with its numbers, then its hint."""
    lines = []
    for check in checks:
        if not check.ok:
            lines.append(f"hpcds launch: pre-flight check failed on {host}: {check.name}: {check.message}")
            if check.hint:
                lines.append(f"  hint: {check.hint}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Measurements (I/O)


def _existing(path: Path) -> Path:
    """The folder itself, or the nearest existing parent that the trainer will create it in."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def measure_writable(folder: Path) -> str | None:
    """Create, fsync and remove a small file; the error text, or None."""
    probe = folder / f"{PROBE_FILE}-{os.uname().nodename}-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"hpcds\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def measure_free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def measure_mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{meminfo} has no MemAvailable line")


def measure_gpus() -> tuple[list[int], list[int]]:
    """Free bytes per visible GPU (torch) and uncorrected ECC errors per GPU (NVML, empty when pynvml is absent)."""
    import torch

    free = (
        [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    try:
        import pynvml
    except ImportError:
        return free, []
    ecc = []
    try:
        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            try:
                ecc.append(
                    pynvml.nvmlDeviceGetTotalEccErrors(
                        handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
                    )
                )
            except pynvml.NVMLError:  # ECC off or not supported on this GPU
                ecc.append(0)
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return free, []
    return free, ecc


def measure_network(
    node_rank: int, nodes: int, addr: str, port: int, timeout_s: float
) -> tuple[str | None, float, float | None]:
    """Join a gloo group of the nodes' `hpcds launch` processes and all-reduce twice: (error, seconds, Gb/s).

    The bandwidth is the 8 MiB all-reduce's size over its time (algorithm bandwidth), a sanity figure, not a limit.
    """
    # c10d logs every failed connect with a C++ stack trace; the verdict says what failed. Read when torch loads,
    # and the ranks get the environment launch_node took before this.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    import torch
    import torch.distributed as dist

    start = time.monotonic()
    timeout = timedelta(seconds=timeout_s)
    error, gbps = None, None
    try:
        store = dist.TCPStore(addr, port, nodes, is_master=node_rank == 0, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=node_rank, world_size=nodes, timeout=timeout)
        small = torch.ones(1)
        dist.all_reduce(small)
        if int(small.item()) != nodes:
            error = f"the small all-reduce gave {small.item()}, not {nodes}"
        else:
            big = torch.ones(BANDWIDTH_TENSOR_BYTES // 4)
            begin = time.monotonic()
            dist.all_reduce(big)
            gbps = round(BANDWIDTH_TENSOR_BYTES * 8 / max(time.monotonic() - begin, 1e-9) / 1e9, 3)
    except Exception as exc:  # every way of not getting through (timeout, refused, reset) is the verdict
        error = " ".join(str(exc).split())[:300] or type(exc).__name__
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return error, time.monotonic() - start, gbps


def run_preflight(
    run_dir: Path, spec, hosts: Sequence[str], node_rank: int, master_addr: str, port: int
) -> tuple[list[Check], float]:
    """Every check of this node (the network one with the other nodes): the verdicts and the seconds they took."""
    start = time.monotonic()
    needs = needs_of(spec)
    ckpt_dir = Path(spec.checkpoint.dir) if spec.checkpoint.dir else run_dir / CHECKPOINT_DIR
    folders = [run_dir] + ([_existing(ckpt_dir)] if spec.checkpoint.dir else [])
    checks = [judge_writable({str(folder): measure_writable(folder) for folder in folders})]
    checks.append(judge_disk(measure_free_bytes(_existing(ckpt_dir)), needs.checkpoint_bytes, ckpt_dir))
    checks.append(judge_memory(measure_mem_available_bytes(), needs.host_bytes))
    checks.append(judge_shm(measure_free_bytes(Path("/dev/shm")), needs.shm_bytes))
    if needs.gpus:
        free, ecc = measure_gpus()
        checks.append(judge_gpus(free, needs.gpus, needs.gpu_free_bytes, ecc))
    if len(hosts) > 1:
        error, seconds, gbps = measure_network(node_rank, len(hosts), master_addr, port, NETWORK_TIMEOUT_S)
        checks.append(judge_network(error, seconds, gbps, f"{master_addr}:{port}", NETWORK_TIMEOUT_S))
    return checks, time.monotonic() - start
