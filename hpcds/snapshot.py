"""slurm.snapshot: a copy of the hpcds package that submits a run, kept in its run directory, so that every start of
the job (requeues days later included) runs that code whatever is installed by then.

submitit's RsyncSnapshot does this for a git checkout (a shallow clone plus rsync of the tracked files, then a chdir);
hpcds copies its own installed package instead, which works the same for a wheel and an editable checkout and needs
neither git nor rsync. The batch script puts `RUN_DIR/snapshot` first on PYTHONPATH and runs `python -m hpcds`, so
`hpcds launch` and the trainer ranks DeepSpeed starts import the copy; `hpcds launch` refuses to start from anywhere
else. The copy is written into a hidden folder beside its place and renamed there: it is complete or absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from hpcds import runs, versions
from hpcds.errors import HpcdsError

SNAPSHOT_DIR = "snapshot"  # in the run directory; it holds the package folder `hpcds/`


def snapshot_package(run_dir: Path) -> Path:
    """The snapshot's package folder in `run_dir` (where `hpcds.__file__` lives when the job runs from it)."""
    return Path(run_dir).absolute() / SNAPSHOT_DIR / "hpcds"


def write_snapshot(run_dir: Path, source: Path | None = None) -> dict[str, Any]:
    """Copy the package at `source` (default: the running one) to RUN_DIR/snapshot/hpcds and record it in meta.json
    (`snapshot`: path, files, bytes, seconds; `hpcds_code`: the copy's digest, which the job's starts compare with).

    The digest is taken of the bytes as they are written, so it is the copy's even when the source changes meanwhile.
    """
    started = time.monotonic()
    source = Path(source) if source is not None else versions.package_dir()
    run_dir = Path(run_dir).absolute()
    final = run_dir / SNAPSHOT_DIR
    tmp = run_dir / f".{SNAPSHOT_DIR}-tmp-{os.getpid()}-{secrets.token_hex(3)}"
    digest = hashlib.sha256()
    files = total_bytes = 0
    try:
        for rel, path in versions.package_files(source):
            data = path.read_bytes()
            target = tmp / "hpcds" / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            versions.digest_update(digest, rel, data)
            files, total_bytes = files + 1, total_bytes + len(data)
        if not files:
            raise HpcdsError(f"slurm.snapshot: no files to copy in {source}")
        os.rename(tmp, final)  # fails when a snapshot is there already: a run keeps its first one
    except OSError as exc:
        raise HpcdsError(f"slurm.snapshot: cannot copy {source} into {final}: {exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    runs.fsync_dir(run_dir)
    record = {"path": str(final / "hpcds"), "source": str(source), "files": files, "bytes": total_bytes}
    record["seconds"] = round(time.monotonic() - started, 3)
    runs.update_meta(run_dir, snapshot=record, hpcds_code=digest.hexdigest())
    return record


def write_snapshot_of_new_run(run_dir: Path) -> dict[str, Any]:
    """write_snapshot for a run directory `hpcds submit` has just created: when the copy fails, the run directory
    (never submitted) goes too, as when sbatch refuses it."""
    try:
        return write_snapshot(run_dir)
    except BaseException:
        runs.remove_run(run_dir)
        raise
