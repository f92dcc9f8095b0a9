"""What a run runs with: package versions, the python, and a digest of hpcds's own code, recorded at submit and
compared at every start of the job (`hpcds launch`, slurm.on_version_change).

Versions come from package metadata (importlib.metadata), never from importing torch or DeepSpeed: the login node
stays light and the per-start check costs milliseconds. hpcds's own version is the running code's `__version__`, and
its digest covers every file of the package that runs (a snapshot's copy, an editable checkout, a wheel's install), so
a changed checkout shows up even when its version number did not move. `changes` is pure; the rest reads files.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# The packages whose versions decide what a run computes (mamba-ssm and causal-conv1d: the fused kernels).
PACKAGES = ("torch", "deepspeed", "transformers", "mamba-ssm", "causal-conv1d")
# Names in a record beside the packages: what `changes` compares, in this order.
# The python is compared by its environment (sys.prefix: the venv or installation), not by the executable's path:
# `python -m hpcds submit` runs .venv/bin/python, the console script the job runs names .venv/bin/python3.
COMPARED = ("hpcds", *PACKAGES, "python_version", "python_prefix", "hpcds_code")
# Shown of a digest: enough to tell two apart in an event or a status cell.
DIGEST_CHARS = 12


def package_dir() -> Path:
    """The folder of the hpcds package this process runs (a snapshot's copy, a checkout, site-packages)."""
    import hpcds

    return Path(hpcds.__file__).absolute().parent


def package_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every file of the package under `root`, sorted: byte code and hidden files left out
    (they are the interpreter's or an editor's, not the code)."""
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part == "__pycache__" or part.startswith(".") for part in rel.parts) or path.suffix == ".pyc":
            continue
        if path.is_file():
            found.append((rel.as_posix(), path))
    yield from sorted(found)


def digest_update(digest, rel: str, data: bytes) -> None:
    """One file into a package digest: its name and length first, so no two file sets hash alike."""
    digest.update(f"{rel}\0{len(data)}\0".encode())
    digest.update(data)


def code_digest(root: Path) -> str:
    """sha256 over the package's files (names and contents)."""
    import hashlib  # here, not at the top: `hpcds status` imports this module and never hashes

    digest = hashlib.sha256()
    for rel, path in package_files(root):
        digest_update(digest, rel, path.read_bytes())
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    """hpcds (the running code's version) and PACKAGES from their metadata; None for a package not installed."""
    from importlib import metadata  # here, not at the top: importing it costs `hpcds status` a tenth of its start-up

    from hpcds import __version__

    found: dict[str, str | None] = {"hpcds": __version__}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def current_record() -> dict[str, Any]:
    """What this process runs with, in the shape meta.json keeps it (`versions`, `python_version`,
    `python_prefix`, `python_executable`, `hpcds_path`, `hpcds_code`)."""
    import platform

    root = package_dir()
    return {
        "versions": package_versions(),
        "python_version": platform.python_version(),
        "python_prefix": sys.prefix,
        "python_executable": sys.executable,
        "hpcds_path": str(root),
        "hpcds_code": code_digest(root),
    }


def _flat(record: Mapping[str, Any]) -> dict[str, Any]:
    versions = record.get("versions") or {}
    flat = {name: versions.get(name) for name in ("hpcds", *PACKAGES)}
    flat |= {name: record.get(name) for name in ("python_version", "python_prefix")}
    code = record.get("hpcds_code")
    flat["hpcds_code"] = code[:DIGEST_CHARS] if isinstance(code, str) else None
    return flat


def changes(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, list[Any]]:
    """{name: [at submit, now]} for each name whose value differs, in COMPARED order. A name the record has no value
    for is not compared: a package missing on the login node (where hpcds submit ran), or a run directory written
    before hpcds recorded it. No I/O here."""
    then, current = _flat(recorded), _flat(now)
    return {
        name: [then[name], current[name]] for name in COMPARED if then[name] is not None and then[name] != current[name]
    }


def render_changes(changed: Mapping[str, list[Any]]) -> str:
    """`torch 2.5.0 -> 2.6.0, hpcds_code 1a2b3c4d5e6f -> 0f9e8d7c6b5a` (a missing package shows as `none`)."""
    return ", ".join(f"{name} {was} -> {now if now is not None else 'none'}" for name, (was, now) in changed.items())
