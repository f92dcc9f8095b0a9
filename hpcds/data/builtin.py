"""Built-in corpora (`builtin:NAME` in a job spec): real English text found on any machine with Python, no download.

`stdlib-docs` is the docstrings of the Python standard library's modules, classes and functions (read from the
source files with `ast`, so no module is imported and none of their side effects run), followed by the reference
manual's topics that ship with pydoc. About 2 MB; the same Python install always gives the same text, in the same
order. Prepared corpora live in `<cache_dir>/builtin/<name>-<tokenizer>-py<X.Y>/`, a folder made by the same writer
as `hpcds data prepare`, so several processes may prepare one at the same time: each builds a private folder and the
first rename wins.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from hpcds.data.pieces import Piece
from hpcds.data.prepare import write_dataset
from hpcds.data.tokenizers import get_tokenizer, tokenizer_name
from hpcds.errors import HpcdsError

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo", "lib2to3"}
MIN_DOCSTRING_CHARS = 80
VAL_FRACTION = 0.05


def stdlib_documents() -> Iterator[tuple[str, str]]:
    """(module name, its docstrings joined) for each stdlib source file, then (topic, text) for pydoc's topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        path
        for path in root.rglob("*.py")
        if not SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]) and not path.name.startswith("test_")
    )
    for path in files:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue  # a file this Python cannot parse (e.g. a template) is simply not text we want
        texts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                    texts.append(doc.strip())
        if texts:
            yield ".".join(path.relative_to(root).with_suffix("").parts), "\n\n".join(texts) + "\n"
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    for name in sorted(topics):
        yield f"topic:{name}", topics[name].strip() + "\n"


BUILTINS = {"stdlib-docs": stdlib_documents}


def builtin_folder(name: str, tokenizer: str, cache_dir: Path) -> Path:
    # hf:FOLDER is named by its vocabulary's fingerprint (hf:<hash>), so copies of one tokenizer share a folder.
    canonical = tokenizer_name(tokenizer).replace("hf:", "hf-", 1)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", canonical):  # a rank file path: name the folder by its hash
        canonical = "file-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    return Path(cache_dir) / "builtin" / f"{name}-{canonical}-{version}"


def prepare_builtin(name: str, tokenizer: str, cache_dir: Path) -> Path:
    """The prepared folder of corpus `name` for `tokenizer`, built on first use; safe to call from many processes."""
    if name not in BUILTINS:
        raise HpcdsError(f"unknown built-in corpus builtin:{name}\nhint: built-in corpora: {', '.join(BUILTINS)}")
    folder = builtin_folder(name, tokenizer, cache_dir)
    if (folder / "meta.json").is_file():
        return folder
    pieces = (Piece((text,), ends_document=True, origin=doc) for doc, text in BUILTINS[name]())
    try:
        # One process: this runs inside the trainer, where forking workers next to torch's threads is not worth it.
        write_dataset(
            pieces,
            folder,
            get_tokenizer(tokenizer),
            val_fraction=VAL_FRACTION,
            inputs=[f"builtin:{name}"],
            num_threads=1,
        )
    except (HpcdsError, OSError):
        if (folder / "meta.json").is_file():  # another process finished first: its copy is as good as ours
            return folder
        raise
    return folder
