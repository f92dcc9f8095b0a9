"""The run directory: one folder per run under a runs root, and the only registry hpcds needs.

A run directory holds the resolved spec, the batch script, the DeepSpeed config, `meta.json` (name, W&B id, versions,
job ids), an append-only `events.jsonl` written by hpcds, the batch script and the launcher, the trainer's
`progress.json`, per-node heartbeats and the checkpoints. A shared filesystem is all it needs: no database, and the
history survives when Slurm forgets the job. Every file is written atomically (temp file, fsync, rename) or appended
in one small write, so a crash never leaves a torn file behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcds.errors import HpcdsError
from hpcds.facts import BAD_NODES_FILE, EVENTS_FILE, META_FILE
from hpcds.versions import current_record


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see the old or the new file, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def fsync_dir(path: Path) -> None:
    # A rename is durable only once its directory is synced (matters on a crash, not on a clean exit).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def new_wandb_id() -> str:
    """W&B run ids: 8 lowercase letters/digits, chosen once per run and reused by every restart."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def create_run(root: Path, prefix: str, files_for: Callable[[Path], dict[str, str]], meta: dict[str, Any]) -> Path:
    """Create a new run directory `<root>/<prefix>-<YYYYmmdd-HHMMSS>[-N]` holding the files `files_for(path)` returns.

    The files are written into a hidden temp folder first and the folder is renamed into place, so a run directory
    either exists complete or not at all; two concurrent creators never get the same name (rename onto an existing
    non-empty folder fails, and the loser tries the next suffix). `files_for` gets the final path because the batch
    script names its own run directory.
    """
    root = Path(root).absolute()
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        name = f"{prefix}-{stamp}" if attempt == 1 else f"{prefix}-{stamp}-{attempt}"
        final = root / name
        if final.exists():
            continue
        tmp = root / f".creating-{name}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            for rel, text in files_for(final).items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_text(text)
            # What the job's every start compares with (hpcds.versions): versions, python, hpcds's code.
            recorded = current_record()
            full_meta = {"name": name, "created": time.time(), **recorded, "job_ids": [], **meta}
            (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True, default=str) + "\n")
            (tmp / EVENTS_FILE).touch()
            os.rename(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if final.exists():  # lost the race for this name: take the next one
                continue
            raise HpcdsError(f"cannot create run directory {final}: {exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(root)
        append_event(final, "created")
        return final
    raise HpcdsError(f"no free run name for {prefix!r} under {root}")


def remove_run(run_dir: Path) -> None:
    """Delete a run directory that never got a job (e.g. sbatch refused it)."""
    shutil.rmtree(run_dir, ignore_errors=True)


def read_meta(run_dir: Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / META_FILE, {}) or {}


def update_meta(run_dir: Path, **changes: Any) -> dict[str, Any]:
    meta = read_meta(run_dir)
    meta.update(changes)
    write_json_atomic(Path(run_dir) / META_FILE, meta)
    return meta


# How long a writer waits for the event log's lock before it appends without it (a holder that hangs on a dead file
# server must not stop training; an unlocked append risks one torn line, which readers skip).
EVENT_LOCK_WAIT_S = 10.0


def append_event(run_dir: Path, event: str, **fields: Any) -> None:
    """One JSON line per event, appended in one write while holding the log's `flock`.

    Every node and rank appends to the same log. On a local file system O_APPEND alone keeps lines whole, but an NFS
    client computes the append offset from the file size it has cached, so two nodes appending at once can overwrite
    each other's line. Taking the lock makes the client revalidate the size first and flush the write before release
    (Linux maps `flock` to the server's byte-range locks on NFS). The batch script's `hpcds_event` takes the same lock
    with flock(1). Lustre without its `flock` mount option refuses locks: the append then goes ahead unlocked.
    """
    line = json.dumps({"time": round(time.time(), 3), "event": event, **fields}, default=str) + "\n"
    fd = os.open(Path(run_dir) / EVENTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _lock(fd, EVENT_LOCK_WAIT_S)
        os.write(fd, line.encode())
    finally:
        os.close(fd)  # also releases the lock, after NFS has flushed the write


def _lock(fd: int, wait_s: float) -> bool:
    """Take an exclusive flock on `fd`, polling up to `wait_s`; False when it could not (timed out, or unsupported)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        except OSError:  # ENOLCK / ENOSYS: the file system keeps no locks
            return False


def parse_json_lines(data: str | bytes) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file's contents, in order; a torn or foreign line is skipped rather than failing.

    Whole files (the usual case) parse as one JSON array, which is several times faster than line by line when
    `status` reads thousands of runs; a file with a bad line falls back to parsing each line on its own.
    """
    raw = data.encode() if isinstance(data, str) else data
    try:
        records = json.loads(b"[" + b",".join(line for line in raw.splitlines() if line.strip()) + b"]")
    except (json.JSONDecodeError, UnicodeDecodeError):
        records = []
        for line in raw.decode(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [r for r in records if isinstance(r, dict)]


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """parse_json_lines of a file; none when it does not exist."""
    try:
        return parse_json_lines(Path(path).read_bytes())
    except FileNotFoundError:
        return []


def parse_events(data: str | bytes) -> list[dict[str, Any]]:
    """Events from the log's contents (objects with an `event`), as parse_json_lines reads them."""
    return [e for e in parse_json_lines(data) if "event" in e]


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return parse_events((Path(run_dir) / EVENTS_FILE).read_bytes())
    except FileNotFoundError:
        return []


def read_bad_nodes(run_dir: Path) -> list[dict[str, Any]]:
    """The nodes the run's batch script excluded (facts.BAD_NODES_FILE): host, reason, time, job id, restart."""
    return read_json_lines(Path(run_dir) / BAD_NODES_FILE)


def list_runs(root: Path) -> list[Path]:
    """Run directories under `root`, oldest first (hidden temp folders excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if not p.name.startswith(".") and (p / META_FILE).is_file()]
    return sorted(runs, key=lambda p: p.name)


def find_run(root: Path, name_or_path: str) -> Path:
    """A run by name (under root) or by path; a clear error listing near names when it doesn't exist."""
    for candidate in (Path(name_or_path), Path(root) / name_or_path):
        if (candidate / META_FILE).is_file():
            return candidate.absolute()
    names = [p.name for p in list_runs(root)]
    near = [n for n in names if name_or_path in n][:5]
    hint = f" Did you mean: {', '.join(near)}?" if near else (f" Runs under {root}: {len(names)}." if names else "")
    raise HpcdsError(f"no run {name_or_path!r} under {Path(root).absolute()}.{hint}")
