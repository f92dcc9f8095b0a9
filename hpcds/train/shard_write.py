"""Writing a save's files: through DeepSpeed's own save path, each file CRC-32'd as its bytes go out, optionally
from a host-memory snapshot in a background thread.

DeepSpeed 0.19 hands every file of `engine.save_checkpoint` to `engine.checkpoint_engine.save(state_dict, path)`. For
the length of one save hpcds puts a `RecordingEngine` there, which either writes at once (`torch.save` into a file
that CRC-32s and counts the bytes as they pass and is fsynced at close: no second read of the shard for its checksum)
or keeps a copy of the state dict in host memory (pinned on GPU ranks) for `BackgroundWrite`, a thread that writes the
copies the same way while training goes on. The commit (manifest, COMMITTED, latest.json) is not here: see
hpcds.train.checkpoint. Files DeepSpeed writes itself (NVMe swap copies) are not recorded; the commit reads those.

Why not DeepSpeed's own writers: its decoupled engine hands the live tensors to a writer process (moved to shared
memory, not copied) and so must commit inside the next `engine.step()`, before the optimizer changes them, waiting
there for the whole write: the step after a save blocks for the write less one forward and backward. Its fast engine
writes synchronously. torch.distributed.checkpoint's `async_save` writes its own format (`.distcp` shards and a
metadata file), which DeepSpeed's `load_checkpoint`, its universal converter and `zero_to_fp32.py` cannot read.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_IMMUTABLE = (str, bytes, int, float, bool, complex, type(None))


class ChecksummedFile:
    """A write-only file that keeps the CRC-32 and size of what was written; `close()` fsyncs it.

    zlib.crc32 and os.write release the GIL on large buffers, so a background write leaves the training thread
    running."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.crc32 = 0
        self.size_bytes = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.crc32 = zlib.crc32(view, self.crc32)
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self.size_bytes += len(view)
        return len(view)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)


def write_checksummed(obj: Any, path: Path, zipfile: bool = True) -> tuple[int, int]:
    """torch.save `obj` to `path`, fsynced; returns (size_bytes, crc32) of the bytes written."""
    import torch

    handle = ChecksummedFile(path)
    try:
        with torch_zip_crc_off():
            torch.save(obj, handle, _use_new_zipfile_serialization=zipfile)
    finally:
        handle.close()
    return handle.size_bytes, handle.crc32


@contextlib.contextmanager
def torch_zip_crc_off():
    """torch.save's per-record CRC-32 (miniz, slower than zlib's) cost ~40% of a save in measurements; the manifest's
    whole-file CRC-32s replace it. torch.load does not need it."""
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


@dataclass
class HostBuffers:
    """Host tensors kept from one snapshot to the next, by (shape, dtype, pinned): a fresh allocation is paged in on
    first touch, which cost about as much as the copy itself; pinned memory is slower still to allocate. A buffer is
    handed out again only after `release()`, once its save is written."""

    free: dict[tuple, list] = field(default_factory=dict)
    used: list[tuple[tuple, Any]] = field(default_factory=list)

    def take(self, shape, dtype, pinned: bool) -> Any:
        import torch

        key = (tuple(shape), dtype, pinned)
        spare = self.free.get(key)
        tensor = spare.pop() if spare else torch.empty(shape, dtype=dtype, pin_memory=pinned)
        self.used.append((key, tensor))
        return tensor

    def release(self) -> None:
        for key, tensor in self.used:
            self.free.setdefault(key, []).append(tensor)
        self.used = []


def snapshot_to_host(obj: Any, pin: bool = False, memo: dict | None = None, buffers: HostBuffers | None = None) -> Any:
    """A copy of a state dict that later training cannot change: every tensor copied to host memory (pinned when
    `pin`, for an asynchronous device-to-host copy), containers rebuilt, other leaves deep-copied. One tensor seen
    twice (tied weights) stays one copy, so the file holds it once, as torch.save of the original would."""
    import copy

    import torch

    memo = {} if memo is None else memo
    buffers = buffers or HostBuffers()
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), tuple(obj.stride()))
        key += (obj.dtype, obj.device)
        if key not in memo:
            on_device = obj.device.type != "cpu"
            host = buffers.take(obj.shape, obj.dtype, pin and on_device)
            host.copy_(obj.detach(), non_blocking=pin and on_device)
            # The source is kept with its copy: a freed tensor's address could be reused by another one of this save
            memo[key] = (obj, host)
        return memo[key][1]
    if isinstance(obj, dict):
        result = obj.copy()  # keeps OrderedDict and defaultdict what they are
        if hasattr(obj, "_metadata"):  # a module state dict's versions, which torch.save keeps and copy() drops
            result._metadata = obj._metadata
        for key, value in obj.items():
            result[key] = snapshot_to_host(value, pin, memo, buffers)
        return result
    if isinstance(obj, list):
        return [snapshot_to_host(v, pin, memo, buffers) for v in obj]
    if isinstance(obj, tuple):
        items = [snapshot_to_host(v, pin, memo, buffers) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, _IMMUTABLE):
        return obj
    return copy.deepcopy(obj)


def recording_engine(original: Any, snapshot: bool, pin: bool = False, buffers: HostBuffers | None = None) -> Any:
    """A DeepSpeed checkpoint engine for one save: writes and records (`written`), or snapshots (`items`)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    zipfile = getattr(original, "zipfile_serialization", True)

    class RecordingEngine(TorchCheckpointEngine):
        def __init__(self) -> None:
            super().__init__(None)
            self.name = "hpcds"
            self.written: dict[str, tuple[int, int]] = {}  # absolute path -> (size_bytes, crc32)
            self.items: list[tuple[str, Any]] = []
            self.memo: dict = {}

        def save(self, state_dict, path: str) -> None:
            if snapshot:
                self.items.append((path, snapshot_to_host(state_dict, pin, self.memo, buffers)))
            else:
                self.written[str(path)] = write_checksummed(state_dict, Path(path), zipfile)

        def preserves_storage_sharing(self) -> bool:
            # DeepSpeed clones the model states first when this is True (so that torch.save of a view does not
            # write its whole flat buffer); the snapshot copies each tensor to a storage of its own anyway.
            return not snapshot

        def finish_snapshot(self) -> None:
            import torch

            if pin and torch.cuda.is_available():
                torch.cuda.synchronize()  # the non-blocking device-to-host copies are done before training goes on
            self.memo.clear()

    return RecordingEngine()


@contextlib.contextmanager
def recording(engine: Any, snapshot: bool, pin: bool = False, buffers: HostBuffers | None = None):
    """Put a `recording_engine` in `engine` for the length of the block (a wrapper that only forwards attribute
    reads gets none, and its files are read back for their checksums at the commit instead)."""
    original = getattr(engine, "checkpoint_engine", None)
    recorder = recording_engine(original, snapshot, pin, buffers)
    swapped = "checkpoint_engine" in vars(engine)
    if swapped:
        engine.checkpoint_engine = recorder
    try:
        yield recorder
    finally:
        if swapped:
            engine.checkpoint_engine = original
    if snapshot:
        recorder.finish_snapshot()


@dataclass
class BackgroundWrite:
    """One rank's share of an asynchronous save: writes `items` ((path, snapshot) pairs) in a daemon thread.

    `kill_before_done` is the tests' fault: SIGKILL this process once every file is written, before it reports done
    (HPCDS_TEST_FAULT=kill_in_async_write:N); `sleep_s` makes the write that much slower (async_write_sleep:S)."""

    items: list[tuple[str, Any]]
    kill_before_done: bool = False
    sleep_s: float = 0.0
    written: dict[str, tuple[int, int]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    _thread: threading.Thread | None = None

    def start(self) -> BackgroundWrite:
        self._thread = threading.Thread(target=self._run, name="hpcds-checkpoint-writer", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.time()
        try:
            time.sleep(self.sleep_s)
            while self.items:
                path, obj = self.items.pop(0)
                self.written[path] = write_checksummed(obj, Path(path))
                del obj
            if self.kill_before_done:
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
        except BaseException as exc:  # reported to every rank at the commit, which raises
            self.error = f"{type(exc).__name__}: {exc}"
        self.seconds = time.time() - started

    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
