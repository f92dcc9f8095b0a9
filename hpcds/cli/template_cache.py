"""Compiled batch-script templates kept on disk between commands: jinja2 compiles a template on every first use in a
process (lexer, parser, Python's compile), about 9 ms of each `hpcds render` or `submit`; loading the compiled code
back takes well under one.

The files live in `<hpcds cache>/templates` ($HPCDS_CACHE_DIR, else $XDG_CACHE_HOME/hpcds, ~/.cache/hpcds), one per
template, named by a hash of the template's name and file, jinja2's version, the Python that compiled it and the
environment's settings; each file starts with jinja2's own header (its format, the Python version) and the checksum of
the template source it was compiled from, so an edited template is compiled again and its file replaced. The cache is
only ever a shortcut: a folder that cannot be made or written, or one that another user could write to (the files
hold code that runs), and any file that does not read back whole, mean compiling as without it. Files are written
whole (a temporary file, then a rename), so a command killed mid-write leaves no half file under the real name.

Duck-typed for jinja2 (`get_bucket`, `set_bucket`), so that making one imports nothing: only rendering imports jinja2.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2
    from jinja2.bccache import Bucket


def _settings(environment: jinja2.Environment) -> list[tuple[str, str]]:
    """What in the environment shapes the compiled code: its plain settings (delimiters, trim_blocks, newline, async,
    ...), extensions, and the names of callables such as `finalize` (a function's repr would hold its address)."""
    found = []
    for name, value in sorted(vars(environment).items()):
        if isinstance(value, (str, bool, int, float, type(None))):
            found.append((name, repr(value)))
        elif name in ("finalize", "autoescape", "undefined"):
            found.append((name, getattr(value, "__qualname__", type(value).__qualname__)))
    found.append(("extensions", repr(sorted(environment.extensions))))
    return found


class TemplateCache:
    """A jinja2 bytecode cache in `directory` (made owner-only), which never fails a render."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _usable_dir(self) -> Path | None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.stat(self.directory)
        except OSError:
            return None
        # Cached code runs on load: only a folder of our own that nobody else can write to.
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        return self.directory

    def _path(self, bucket: Bucket) -> Path | None:
        folder = self._usable_dir()
        return None if folder is None else folder / f"{bucket.key}.jinja2"

    def get_bucket(self, environment: jinja2.Environment, name: str, filename: str | None, source: str) -> Bucket:
        import jinja2
        from jinja2.bccache import Bucket

        what = (jinja2.__version__, sys.implementation.cache_tag, name, filename, _settings(environment))
        key = hashlib.sha256(repr(what).encode()).hexdigest()
        checksum = hashlib.sha256(source.encode()).hexdigest()
        bucket = Bucket(environment, key, checksum)
        path = self._path(bucket)
        if path is not None:
            self._load(bucket, path)
        return bucket

    @staticmethod
    def _load(bucket: Bucket, path: Path) -> None:
        try:
            with open(path, "rb") as file:
                bucket.load_bytecode(file)  # a wrong header or checksum leaves the bucket empty: compile again
        except FileNotFoundError:
            return
        except Exception:  # whatever a damaged file raises (pickle can raise many kinds): compile again
            bucket.reset()

    def set_bucket(self, bucket: Bucket) -> None:
        path = self._path(bucket)
        if path is None:
            return
        import tempfile  # only to write: loading is the common case

        temporary: Any = None
        try:
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", suffix=".jinja2", delete=False) as file:
                temporary = file.name
                bucket.write_bytecode(file)
            os.replace(temporary, path)
        except OSError:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
