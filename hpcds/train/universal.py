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
COMMITTED marker naming the source (a digest of its manifest), so a second resume reuses it. Rank 0 converts in a
child process (hpcds.train.universal_convert: DeepSpeed's worker pools start from a fork server, and the shards it
loads are freed when it ends) while every node rewrites its heartbeat and the other ranks wait in a
gloo group of their own with an explicit timeout (CONVERT_TIMEOUT_S), never in the training process group.
`ds_to_universal` cannot resume by itself: it extracts every rank's slices into `DEST/tmp/` (one file per parameter,
state and rank), then merges them per parameter, and redoes both on every call. hpcds wraps its extraction step: once
it returns, the slices are fsynced and `DEST/EXTRACTED` records the source digest and their count and bytes; a
conversion cut short after that point reuses the slices and redoes only the merge (hpcds.train.universal_convert).
The top part is pure; from `run_converter` on, the functions do the I/O and the collectives.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from hpcds.errors import HpcdsError

SUFFIX = ".universal"
MARKER = "COMMITTED"
# Written once DeepSpeed's extraction step has returned and its slices are on disk: {"source", "files", "bytes"}.
EXTRACTED = "EXTRACTED"
# ds_to_universal's own scratch folder inside its output folder (`os.path.join(args.output_folder, 'tmp')`).
SLICES = "tmp"
# ds_to_universal also writes this pointer into the folder above its output; hpcds keeps its own (latest.json).
STRAY_POINTER = "latest_universal"
# The longest the other ranks wait for rank 0's conversion. It reads every optimizer shard and writes the states
# twice (slices, then one file per parameter): about three times the checkpoint's size in I/O, e.g. 3.3 TB for a
# 70B model with Adam, 2 h at 0.5 GB/s. 6 h leaves room for a slow shared file system; a job's time limit usually
# ends a stuck one sooner. Not a spec field: the phase is rare, and the heartbeats keep the hang watchdog quiet.
CONVERT_TIMEOUT_S = 6 * 3600
# The waiting ranks' group outlives the child by this much: rank 0 still has to report the outcome.
WAIT_MARGIN_S = 300
# Every node rewrites its heartbeat this often while converting: far below any useful slurm.hang_limit_s.
HEARTBEAT_INTERVAL_S = 5.0
# Test hook: the training process group's timeout during this phase, in seconds (restored after). It stands for a
# short DEEPSPEED_TIMEOUT (whole minutes only), so a test shows in seconds that nobody waits in that group.
TEST_PG_TIMEOUT_ENV = "HPCDS_TEST_PG_TIMEOUT_S"
# A merge or extraction worker is a Python process with torch imported, before any tensor it loads.
WORKER_BASE_BYTES = 512 << 20


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


def source_digest(manifest: dict) -> str:
    """What a converted copy or its slices were made from: the manifest lists every file's size and CRC-32."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:32]


def worker_counts(
    *, cpus: int, source_ranks: int, params: int, shard_bytes: int, param_bytes: int, available_bytes: int
) -> tuple[int, int]:
    """DeepSpeed's (num_extract_workers, num_merge_workers), at least 1 each.

    An extraction worker loads one rank's optimizer file (`shard_bytes`, the largest) and cuts copies of its slices
    out of it: about twice the file. A merge worker loads one parameter's slices of one state and concatenates them:
    about twice that state (`param_bytes`, the largest parameter in fp32). Neither helps beyond its number of items
    (source ranks, parameters) or the CPUs this process may use.
    """
    extract = min(cpus, source_ranks, available_bytes // (WORKER_BASE_BYTES + 2 * max(shard_bytes, 1)))
    merge = min(cpus, params, available_bytes // (WORKER_BASE_BYTES + 2 * max(param_bytes, 1)))
    return max(1, extract), max(1, merge)


# ---------------------------------------------------------------------------------------------------------------------
# I/O: the ranks


def run_converter(src: Path, dest: Path) -> dict[str, Any]:
    """Rank 0: the conversion in a child process, bounded by CONVERT_TIMEOUT_S; what it reports, or HpcdsError.

    The stop signals are blocked in the child (as in the launchers): a stop asked during the conversion is acted on
    at the first step boundary after it, like one asked during any other part of start-up.
    """
    import signal
    import subprocess
    import sys

    from hpcds.facts import STOP_SIGNUMS

    argv = [
        sys.executable,
        "-m",
        "hpcds.train.universal_convert",
        str(src),
        str(dest),
        "--parent-pid",
        str(os.getpid()),
    ]
    # The child never needs a GPU: DeepSpeed loads every shard with map_location="cpu".
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNUMS))
    try:
        child = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    try:
        output, _ = child.communicate(timeout=CONVERT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        output, _ = child.communicate()
        problem = f"no result after {CONVERT_TIMEOUT_S} s"
    else:
        problem = f"exit code {child.returncode}"
    lines = output.splitlines()  # progress bars and per-file prints: hundreds of lines for a large model
    if child.returncode == 0 and lines and lines[-1].startswith("RESULT "):
        return json.loads(lines[-1].removeprefix("RESULT "))
    tail = "\n".join(lines[-8:])
    raise HpcdsError(
        f"converting {src} to a universal checkpoint failed ({problem}):\n{tail}\n"
        "hint: resume with the node count the checkpoint was written with; the next try reuses the slices in "
        f"{dest / SLICES} if their extraction had finished"
    )


def remove_stale(ckpt_dir: Path, keep: Path) -> None:
    """Converted copies of other checkpoints are never read again once a newer one exists."""
    for path in Path(ckpt_dir).glob(f"*{SUFFIX}"):
        if path.is_dir() and path != keep:
            shutil.rmtree(path, ignore_errors=True)


class Heartbeats:
    """Rewrites this node's heartbeat every HEARTBEAT_INTERVAL_S from a thread while the conversion runs: the batch
    script's hang watchdog reads their ages, and a conversion can take longer than its limit."""

    def __init__(self, run_dir: Path | None, step: int, interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        import threading

        self.run_dir, self.step, self.interval_s = run_dir, step, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="hpcds-convert-heartbeat", daemon=True)

    def _beat(self) -> None:
        from hpcds.train.progress import write_heartbeat

        while True:
            with contextlib.suppress(OSError):  # a flaky file system must not end the conversion; the next beat retries
                write_heartbeat(self.run_dir, self.step)
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> Heartbeats:
        if self.run_dir is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def prepare(
    ckpt_dir: Path, tag: str, manifest: dict, *, rank: int, run_dir: Path | None = None
) -> tuple[Path, dict[str, Any] | None]:
    """Every rank calls this: rank 0 converts `tag` unless a complete converted copy of it exists; all wait for it.

    Returns the universal folder and what the conversion reported (None when a converted copy was reused).
    """
    from datetime import timedelta

    import torch.distributed as dist
    from deepspeed.constants import default_pg_timeout

    dest = universal_dir(ckpt_dir, tag)
    # Created by every rank, before anyone waits; the training group's timeout (DEEPSPEED_TIMEOUT) never applies.
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=CONVERT_TIMEOUT_S + WAIT_MARGIN_S))
    if os.environ.get(TEST_PG_TIMEOUT_ENV):
        dist.distributed_c10d._set_pg_timeout(timedelta(seconds=float(os.environ[TEST_PG_TIMEOUT_ENV])))
    beating = run_dir if os.environ.get("LOCAL_RANK", "0") == "0" else None  # one heartbeat file per node
    outcome: list[Any] = [None, None]  # (failure, report)
    try:
        with Heartbeats(beating, int(manifest.get("step", 0))):
            if rank == 0:
                try:
                    committed = (dest / MARKER).is_file() and (dest / MARKER).read_text().strip()
                    if committed != source_digest(manifest):
                        outcome[1] = run_converter(Path(ckpt_dir) / tag, dest)
                    remove_stale(ckpt_dir, dest)
                except Exception as exc:  # the others must hear of it now, not at the end of their wait
                    outcome[0] = str(exc) if isinstance(exc, HpcdsError) else f"{type(exc).__name__}: {exc}"
            dist.broadcast_object_list(outcome, src=0, group=group)
    finally:
        if os.environ.get(TEST_PG_TIMEOUT_ENV):
            dist.distributed_c10d._set_pg_timeout(default_pg_timeout)
        dist.destroy_process_group(group)
    if outcome[0]:
        raise HpcdsError(outcome[0] if rank == 0 else f"rank 0 could not convert {tag}: {outcome[0]}")
    return dest, outcome[1]


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


@contextlib.contextmanager
def mapped_loads(engine):
    """For one `load_checkpoint`: DeepSpeed's checkpoint engine loads each file memory-mapped (`torch.load(mmap=True)`)
    instead of reading and unpickling it whole. ZeRO-1/2 loads every rank's optimizer file on every rank and uses
    another rank's file only for its fp32 weights, so the moments of the other ranks are never read; what is used is
    copied into DeepSpeed's own buffers. A file torch cannot map (the legacy, non-zip format) is read as before."""
    import torch

    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    original = getattr(checkpoint_engine, "load", None)
    if original is None or "checkpoint_engine" not in vars(engine):
        yield
        return

    def load(path: str, map_location=None):
        try:
            return torch.load(path, map_location=map_location, weights_only=False, mmap=True)
        except RuntimeError:  # not a zip file: nothing to map
            return original(path, map_location=map_location)

    checkpoint_engine.load = load
    try:
        yield
    finally:
        del checkpoint_engine.load  # the class's own method again


def run_dir_of(ckpt_dir: Path) -> Path | None:
    """The run directory that holds the default checkpoint folder (`<run dir>/checkpoints`), else None."""
    from hpcds.facts import SPEC_FILE

    parent = Path(ckpt_dir).absolute().parent
    return parent if (parent / SPEC_FILE).is_file() else None


def load_for_resume(
    engine,
    ckpt_dir: Path,
    tag: str,
    manifest: dict,
    *,
    zero_stage: int,
    rank: int,
    world_size: int,
    run_dir: Path | None = None,
) -> tuple[dict, dict | None]:
    """Load checkpoint `tag` into `engine` on every rank, through the universal format when the number of ranks
    changed. Returns this rank's saved state (trainer state, RNG states, `saved_time`) and, when converted, what to log.

    With more ranks than the checkpoint had, a new rank takes the saved state of the rank it maps onto: the trainer
    state is the same on every rank, and the RNG streams only need to differ between ranks. `run_dir` receives the
    heartbeats during a conversion (default: the run directory above a default checkpoint folder).
    """
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
        dest, report = prepare(Path(ckpt_dir), tag, manifest, rank=rank, run_dir=run_dir or run_dir_of(ckpt_dir))
        load_universal(engine, dest)
        converted = {
            "tag": tag,
            "from_world_size": saved_world,
            "to_world_size": world_size,
            "zero_stage": zero_stage,
            "convert_s": None,
            **(report or {}),
            "load_s": round(time.perf_counter() - started, 3),
        }
    else:
        with mapped_loads(engine):
            engine.load_checkpoint(str(ckpt_dir), tag=tag)
    own = path / rank_state_name(rank)
    rank_file = own if own.is_file() else path / rank_state_name(rank % saved_world)
    saved = torch.load(rank_file, weights_only=False)
    saved["saved_time"] = os.path.getmtime(rank_file)
    return saved, converted
