"""`hpcds data prepare`: read text or JSONL files, tokenize them on every core, and stream the ids into memmaps.
JSONL records are text, prompt/response pairs, or chat conversations, which the parent renders with the tokenizer's
chat template (hpcds/data/pieces.py finds the character spans of their answers) before the workers tokenize them.

Output folder: `train.bin` / `val.bin` (token ids, dtype by vocabulary size), `train.idx.bin` / `val.idx.bin`
(uint64 offsets where documents start), for SFT data `train.mask.bin` / `val.mask.bin` (uint8, 1 where the token is
a training target), and `meta.json`, written last. Everything is built in a hidden sibling folder and renamed into
place, so a reader never sees half a dataset and two processes preparing the same folder cannot mix their files.
Memory stays flat: input is read in pieces, worker processes (one per core) tokenize groups of pieces and lay them
out per split, and the parent appends the results in order while the workers go on; at most two groups per worker
are in flight.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from hpcds.data.pieces import Piece, encode_group, is_val_piece, make_meta, piece_from_record, split_paragraphs
from hpcds.data.tokenizer import Tokenizer, dtype_for_vocab
from hpcds.data.tokenizers import get_tokenizer
from hpcds.errors import HpcdsError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
GROUP_CHARS = 1024 * 1024  # text per worker task: large enough that task overhead vanishes
READ_CHARS = 1024 * 1024
# Text read on each side of a piece for hf: tokenizers (a SentencePiece ▁ or a merge across the cut would otherwise
# change the ids at a piece's edges): far more than a token spans, so the edges' tokens are those of the whole text.
CONTEXT_CHARS = 1024


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def resolve_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named, plus every non-hidden file under folders named (sorted, so the order is reproducible)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise HpcdsError(f"input folder {path} holds no files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise HpcdsError(f"input {path} does not exist\nhint: check the path (folders are read recursively)")
    if not files:
        raise HpcdsError("no input files given")
    return files


def iter_pieces(
    files: list[Path],
    text_field: str = "text",
    prompt_field: str | None = None,
    response_field: str | None = None,
    messages_field: str | None = None,
    render_chat: Callable[[list[dict], bool], str] | None = None,
    context_chars: int = 0,
) -> Iterator[Piece]:
    """The pieces of `files`; text pieces carry `context_chars` of the text on each side (see Piece.context)."""
    if bool(prompt_field) != bool(response_field):
        raise HpcdsError("SFT data needs both --prompt-field and --response-field")
    fields = (text_field, prompt_field, response_field, messages_field, render_chat)
    for path in files:
        try:
            if path.suffix in JSONL_SUFFIXES:
                yield from _jsonl_pieces(path, *fields)
            elif prompt_field or messages_field:
                flags = "--messages-field" if messages_field else "--prompt-field/--response-field"
                raise HpcdsError(
                    f"{path}: {'chat' if messages_field else 'prompt/response'} data must be JSONL (.jsonl), "
                    f"one object per line\nhint: drop {flags} for plain text"
                )
            else:
                yield from _text_pieces(path, context_chars)
        except OSError as exc:
            raise HpcdsError(f"cannot read {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise HpcdsError(
                f"{path} is not UTF-8 text ({exc.reason})\nhint: convert it, e.g. iconv -f latin1 -t utf-8"
            ) from None


def _jsonl_pieces(path: Path, *fields):
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                yield piece_from_record(line, f"{path}:{number}", *fields)


def _text_pieces(path: Path, context_chars: int = 0) -> Iterator[Piece]:
    # Hold one piece back: only at end of file do we know which piece carries the end-of-text token, and only with the
    # next piece read do we know the text after it.
    pending: str | None = None
    before = ""  # the end of the piece before `pending`
    rest = ""
    with path.open(encoding="utf-8", newline="") as handle:
        while True:
            data = handle.read(READ_CHARS)
            chunks, rest = split_paragraphs(rest + data, final=not data)
            for chunk in chunks:
                if pending is not None:
                    context = (before, chunk[:context_chars]) if context_chars else ("", "")
                    yield Piece((pending,), ends_document=False, origin=str(path), context=context)
                    before = pending[-context_chars:] if context_chars else ""
                pending = chunk
            if not data:
                break
    if pending is not None:
        yield Piece((pending,), ends_document=True, origin=str(path), context=(before, ""))


def _groups(pieces: Iterable[Piece], val_fraction: float) -> Iterator[list[tuple[Piece, bool, bool]]]:
    """Consecutive pieces of about GROUP_CHARS, each tagged (piece, goes to val, starts a document)."""
    starts_document = True  # the input's previous piece ended a document (whichever split it went to)
    group: list[tuple[Piece, bool, bool]] = []
    chars = 0
    for index, piece in enumerate(pieces):
        group.append((piece, is_val_piece(index, val_fraction), starts_document))
        starts_document = piece.ends_document
        chars += sum(len(t) for t in piece.texts)
        if chars >= GROUP_CHARS:
            yield group
            group, chars = [], 0
    if group:
        yield group


_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer_source: str) -> None:
    global _worker_tokenizer
    # One thread per worker: the workers already fill the cores, and `tokenizers` (hf:) would start a thread pool
    # per process. Set once here, where the process is ours alone, so encoding need not switch it per call.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _worker_tokenizer is None:  # a forked worker inherits the parent's; a spawned one loads it
        _worker_tokenizer = get_tokenizer(tokenizer_source)


def _encode(tokenizer: Tokenizer, items, dtype: str, with_mask: bool) -> dict:
    """encode_group on this process's one thread."""
    return encode_group(
        lambda texts: tokenizer.encode_batch(texts, 1),
        tokenizer.eot_id,
        items,
        dtype,
        with_mask,
        encode_offsets=tokenizer.encode_offsets,
    )


def _encode_in_worker(items, dtype: str, with_mask: bool) -> dict:
    return _encode(_worker_tokenizer, items, dtype, with_mask)


class _Split:
    """One output stream (train or val): token file, optional mask file, document-start index."""

    def __init__(self, folder: Path, name: str, with_mask: bool) -> None:
        self.tokens = 0
        self.documents = 0
        self.tok_file = (folder / f"{name}.bin").open("wb")
        self.idx_file = (folder / f"{name}.idx.bin").open("wb")
        self.mask_file = (folder / f"{name}.mask.bin").open("wb") if with_mask else None

    def append(self, tokens: np.ndarray, mask: np.ndarray | None, starts: np.ndarray) -> None:
        tokens.tofile(self.tok_file)
        if self.mask_file is not None:
            mask.tofile(self.mask_file)
        (starts + np.uint64(self.tokens)).tofile(self.idx_file)
        self.tokens += len(tokens)
        self.documents += len(starts)

    def close(self) -> None:
        for handle in (self.tok_file, self.idx_file, self.mask_file):
            if handle is not None:
                handle.close()


def _encoded_groups(groups, tokenizer: Tokenizer, workers: int, dtype: str, with_mask: bool) -> Iterator[dict]:
    """encode_group over `groups`, in order; on `workers` processes when that pays, with a bounded queue."""
    if workers <= 1 or tokenizer.encoding is None:  # bytes need no tokenizer work worth a process
        for items in groups:
            yield _encode(tokenizer, items, dtype, with_mask)
        return
    global _worker_tokenizer
    _worker_tokenizer = tokenizer
    # fork shares the loaded vocabulary with the workers; elsewhere each worker loads it once.
    method = "fork" if sys.platform == "linux" else "spawn"
    pending: deque = deque()
    with multiprocessing.get_context(method).Pool(workers, _start_worker, (tokenizer.source,)) as pool:
        for items in groups:
            pending.append(pool.apply_async(_encode_in_worker, (items, dtype, with_mask)))
            if len(pending) >= 2 * workers:  # keeps memory flat on any input size
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_dataset(
    pieces: Iterable[Piece],
    out_dir: Path,
    tokenizer: Tokenizer,
    *,
    val_fraction: float,
    has_mask: bool = False,
    inputs: list[str] = (),
    num_threads: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Tokenize `pieces` into `out_dir` (train/val memmaps + meta.json) on `num_threads` processes; return meta.

    `progress(tokens written so far)` is called after each group of ~1 MB of text.
    """
    if not 0 <= val_fraction < 1:
        raise HpcdsError(f"--val-fraction {val_fraction} is outside [0, 1)\nhint: e.g. 0.01")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise HpcdsError(f"{out_dir} already holds files\nhint: choose another --out, or pass --overwrite")
    workers = num_threads or cpu_count()
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    start_s = time.perf_counter()
    try:
        splits = {name: _Split(tmp, name, has_mask) for name in ("train", "val")}
        try:
            groups = _groups(pieces, val_fraction)
            for result in _encoded_groups(groups, tokenizer, workers, dtype, has_mask):
                for name, arrays in result.items():
                    splits[name].append(*arrays)
                if progress is not None:
                    progress(splits["train"].tokens + splits["val"].tokens)
        finally:
            for split in splits.values():
                split.close()
        if val_fraction > 0 and splits["val"].tokens == 0 and splits["train"].tokens > 1:
            _move_tail_to_val(tmp, splits, val_fraction, dtype, has_mask)
        counts = {name: {"tokens": s.tokens, "documents": s.documents} for name, s in splits.items()}
        meta = make_meta(
            tokenizer=tokenizer.name,
            vocab_size=tokenizer.vocab_size,
            eot_id=tokenizer.eot_id,
            dtype=dtype,
            has_mask=has_mask,
            counts=counts,
            val_fraction=val_fraction,
            inputs=[str(i) for i in inputs],
            tokenizer_source=tokenizer.source,
        )
        meta["prepare_time_s"] = round(time.perf_counter() - start_s, 3)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _move_tail_to_val(folder: Path, splits: dict, val_fraction: float, dtype: str, has_mask: bool) -> None:
    """Too few pieces for an even spread (a small input): the last documents (or tokens) become validation."""
    train = splits["train"]
    starts = np.fromfile(folder / "train.idx.bin", dtype=np.uint64)
    wanted = min(train.tokens - 1, max(1, round(train.tokens * val_fraction)))
    if has_mask and len(starts) >= 2:
        first_doc = min(len(starts) - 1, max(1, round(len(starts) * (1 - val_fraction))))
        cut = int(starts[first_doc])
    else:
        first_doc = int(np.searchsorted(starts, train.tokens - wanted))
        cut = train.tokens - wanted
    itemsize = np.dtype(dtype).itemsize
    suffixes = [(".bin", dtype, itemsize)] + ([(".mask.bin", np.uint8, 1)] if has_mask else [])
    for suffix, kind, size in suffixes:
        tail = np.fromfile(folder / f"train{suffix}", dtype=kind, offset=cut * size)
        tail.tofile(folder / f"val{suffix}")
        os.truncate(folder / f"train{suffix}", cut * size)
    val_starts = (starts[first_doc:] - np.uint64(cut)).astype(np.uint64)
    if len(val_starts) == 0 or val_starts[0] != 0:
        val_starts = np.concatenate([np.zeros(1, np.uint64), val_starts])
    val_starts.tofile(folder / "val.idx.bin")
    starts[:first_doc].tofile(folder / "train.idx.bin")
    splits["val"].tokens, splits["val"].documents = train.tokens - cut, len(val_starts)
    train.tokens, train.documents = cut, first_doc


def _move_into_place(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    old = None
    if out_dir.exists():
        if any(out_dir.iterdir()) and not overwrite:
            raise HpcdsError(f"{out_dir} already holds files\nhint: choose another --out, or pass --overwrite")
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_files(
    inputs: Iterable[str | Path],
    out_dir: str | Path,
    *,
    tokenizer: str = "cl100k_base",
    val_fraction: float = 0.01,
    text_field: str | None = None,
    prompt_field: str | None = None,
    response_field: str | None = None,
    messages_field: str | None = None,
    num_threads: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """The whole `hpcds data prepare`: resolve inputs, tokenize, write; return meta.json's content.

    `text_field` None means "text"; it, prompt/response and `messages_field` (chat, rendered by the tokenizer's chat
    template) are three exclusive ways to read JSONL.
    """
    if messages_field and (text_field or prompt_field or response_field):
        given = "--text-field" if text_field else "--prompt-field/--response-field"
        raise HpcdsError(
            f"--messages-field cannot be combined with {given}: a record is read one way"
            "\nhint: chat data: --messages-field only; text: --text-field; prompt/response pairs: those two flags"
        )
    files = resolve_inputs(inputs)
    encoder = get_tokenizer(tokenizer)
    if messages_field and encoder.render_chat is None:
        kind = "its folder has no chat template" if tokenizer.startswith("hf:") else "it is not a Hugging Face one"
        raise HpcdsError(
            f"--messages-field {messages_field} renders each conversation with the tokenizer's chat template, and "
            f"tokenizer {tokenizer} has none ({kind})"
            "\nhint: --tokenizer hf:FOLDER with the model's tokenizer files (tokenizer.json, tokenizer_config.json, "
            "and chat_template.jinja when the template is kept there)"
        )
    fields = (text_field or "text", prompt_field, response_field, messages_field, encoder.render_chat)
    context_chars = 0 if encoder.encode_offsets is None else CONTEXT_CHARS  # hf: pieces read in context
    return write_dataset(
        iter_pieces(files, *fields, context_chars=context_chars),
        Path(out_dir),
        encoder,
        val_fraction=val_fraction,
        has_mask=bool(prompt_field or messages_field),
        inputs=[str(f) for f in files],
        num_threads=num_threads,
        overwrite=overwrite,
        progress=progress,
    )
