"""What `hpcds data prepare` cuts its input into, and the rules that do not depend on files: pieces, the validation
split, the SFT loss mask and the meta.json record. No I/O here.

A piece is the unit of tokenizing and of the train/validation split: a ~64 KB run of paragraphs from a text file, or
one JSONL record. A text piece is `(text,)`; an SFT piece is `(prompt, response)`, whose loss mask is 0 on the prompt
and 1 on the response and its end-of-text token. Pieces go to validation evenly spread (every 1/F-th piece), so a
validation split samples the whole input rather than its tail.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from hpcds.errors import HpcdsError

FORMAT = "hpcds-tokens-v1"
PIECE_CHARS = 64 * 1024


@dataclass(frozen=True)
class Piece:
    texts: tuple[str, ...]  # (text,) or (prompt, response)
    ends_document: bool  # the end-of-text token follows this piece
    origin: str = ""  # "file:line" for messages


def is_val_piece(index: int, val_fraction: float) -> bool:
    """Piece `index` goes to validation when the running count of val pieces, index * F, crosses an integer."""
    return math.floor((index + 1) * val_fraction) > math.floor(index * val_fraction)


def split_paragraphs(text: str, final: bool, piece_chars: int = PIECE_CHARS) -> tuple[list[str], str]:
    """Cut `text` into ~piece_chars chunks at paragraph (else line) breaks; return (chunks, unfinished rest).

    Breaking after a blank line keeps tokenization the same as for the whole text in all but rare cases.
    With `final`, the rest is emitted too.
    """
    chunks: list[str] = []
    start = 0
    while len(text) - start > piece_chars:
        window_end = start + piece_chars
        cut = text.rfind("\n\n", start, window_end)
        cut = cut + 2 if cut > start else text.rfind("\n", start, window_end) + 1
        if cut <= start:
            cut = window_end  # one enormous line: cut anywhere
        chunks.append(text[start:cut])
        start = cut
    rest = text[start:]
    if final and rest:
        chunks.append(rest)
        rest = ""
    return chunks, rest


def piece_from_record(
    line: str,
    origin: str,
    text_field: str,
    prompt_field: str | None,
    response_field: str | None,
) -> Piece:
    """One JSONL line -> a text piece (`text_field`) or an SFT piece (`prompt_field` + `response_field`)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise HpcdsError(f"{origin}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise HpcdsError(f"{origin}: a JSONL line must be an object, got {type(record).__name__}")
    fields = (prompt_field, response_field) if prompt_field else (text_field,)
    texts = []
    for field in fields:
        if field not in record:
            keys = ", ".join(sorted(record)) or "none"
            option = {text_field: "--text-field", prompt_field: "--prompt-field", response_field: "--response-field"}
            raise HpcdsError(
                f"{origin}: no field {field!r} (keys: {keys})\nhint: name the right one with {option[field]}"
            )
        value = record[field]
        if not isinstance(value, str):
            raise HpcdsError(f"{origin}: field {field!r} must be a string, got {type(value).__name__}")
        texts.append(value)
    return Piece(tuple(texts), ends_document=True, origin=origin)


def encode_group(encode, eot_id: int, items: list[tuple[Piece, bool, bool]], dtype: str, with_mask: bool) -> dict:
    """Tokenize consecutive pieces and lay them out per split, ready to append to the files.

    `encode(texts) -> list of uint32 arrays`; each item is (piece, goes to val, starts a document). Returns
    {split: (token ids as `dtype`, loss mask or None, document starts relative to this group)} for splits present.
    """
    encoded = encode([text for piece, _, _ in items for text in piece.texts])
    out: dict[str, tuple[list, list, list, int]] = {}
    position = 0
    for piece, to_val, starts_document in items:
        parts = encoded[position : position + len(piece.texts)]
        position += len(piece.texts)
        if piece.ends_document:
            parts = [*parts, np.array([eot_id], dtype=np.uint32)]
        tokens = np.concatenate(parts) if len(parts) > 1 else parts[0]
        chunks, masks, starts, length = out.get("val" if to_val else "train", ([], [], [], 0))
        if starts_document:
            starts.append(length)
        chunks.append(tokens)
        if with_mask:
            mask = np.ones(len(tokens), dtype=np.uint8)
            mask[: len(parts[0])] = 0  # the prompt: read, never predicted; the response and end-of-text are targets
            masks.append(mask)
        out["val" if to_val else "train"] = (chunks, masks, starts, length + len(tokens))
    return {
        split: (
            np.concatenate(chunks).astype(dtype, copy=False),
            np.concatenate(masks) if with_mask else None,
            np.asarray(starts, dtype=np.uint64),
        )
        for split, (chunks, masks, starts, _) in out.items()
    }


def make_meta(
    *,
    tokenizer: str,
    vocab_size: int,
    eot_id: int,
    dtype: str,
    has_mask: bool,
    counts: dict[str, dict[str, int]],
    val_fraction: float,
    inputs: list[str],
) -> dict:
    return {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "eot_id": eot_id,
        "dtype": dtype,
        "has_mask": has_mask,
        "train_tokens": counts["train"]["tokens"],
        "val_tokens": counts["val"]["tokens"],
        "train_documents": counts["train"]["documents"],
        "val_documents": counts["val"]["documents"],
        "val_fraction": val_fraction,
        "inputs": inputs,
    }


def check_meta(meta: dict, where: str) -> dict:
    """A meta.json read back: the fields the reader needs, with a message naming the folder when one is off."""
    if meta.get("format") != FORMAT:
        raise HpcdsError(
            f"{where}/meta.json is not from `hpcds data prepare` (format {meta.get('format')!r}, expected {FORMAT!r})"
            "\nhint: prepare the data again with `hpcds data prepare`"
        )
    for key in ("tokenizer", "vocab_size", "dtype", "train_tokens", "val_tokens", "has_mask", "eot_id"):
        if key not in meta:
            raise HpcdsError(f"{where}/meta.json lacks {key!r}\nhint: prepare the data again with `hpcds data prepare`")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise HpcdsError(f"{where}/meta.json: dtype {meta['dtype']!r} is neither uint16 nor uint32")
    return meta
