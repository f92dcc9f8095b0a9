"""What `hpcds data prepare` cuts its input into, and the rules that do not depend on files: pieces, the validation
split, the SFT loss mask and the meta.json record. No I/O here.

A piece is the unit of tokenizing and of the train/validation split: a ~64 KB run of paragraphs from a text file, or
one JSONL record. A text piece is `(text,)`; an SFT piece is `(prompt, response)`, whose loss mask is 0 on the
prompt and 1 on the response and its end-of-text token. A chat piece is `(conversation,)`, rendered by the
tokenizer's chat template, with the character spans of its assistant turns (each answer and the end-of-turn text
that closes it) as targets; the template's own markup separates conversations, so no end-of-text is appended. SFT
and chat records are tokenized whole, as the model reads them at inference, where the tokenizer reports offsets
(hf:): a token is a target when it holds a character of a target span. For such tokenizers a text piece carries the
text around it (encoded alone, its edges would differ from the whole text's: a SentencePiece ▁, a merge across the
cut), is encoded with it and keeps the tokens that start in it. Pieces go to validation evenly spread (every 1/F-th
piece), so a validation split samples the whole input rather than its tail.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hpcds.errors import HpcdsError

FORMAT = "hpcds-tokens-v1"
PIECE_CHARS = 64 * 1024


@dataclass(frozen=True)
class Piece:
    texts: tuple[str, ...]  # (text,) or (prompt, response), or (a rendered conversation,)
    ends_document: bool  # the last piece of a document: end-of-text follows it (chats: the template ends it)
    origin: str = ""  # "file:line" for messages
    targets: tuple[tuple[int, int], ...] | None = None  # chat pieces: [start, end) characters trained on
    # Text pieces, for tokenizers that report offsets (hf:): the text of the document just before and after the piece,
    # encoded with it so that the tokens at its edges are those of the whole text.
    context: tuple[str, str] = ("", "")


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
    messages_field: str | None = None,
    render_chat: Callable[[list[dict], bool], str] | None = None,
) -> Piece:
    """One JSONL line -> a text piece (`text_field`), an SFT piece (`prompt_field` + `response_field`) or a chat
    piece (`messages_field`, rendered by `render_chat`)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise HpcdsError(f"{origin}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise HpcdsError(f"{origin}: a JSONL line must be an object, got {type(record).__name__}")
    if messages_field:
        return chat_piece(record, origin, messages_field, render_chat)
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


def chat_piece(record: dict, origin: str, field: str, render_chat: Callable[[list[dict], bool], str]) -> Piece:
    """A conversation, rendered whole by the chat template, with the character spans of its assistant turns.

    Assistant message i starts where render(messages[:i], add_generation_prompt=True) ends, which must be a prefix
    of the whole rendering. Its turn, as the template writes it when it is the last message, is what
    render(messages[:i + 1]) adds to that; the whole rendering must continue with that turn, or (templates that write
    earlier turns shorter, like Qwen3's, which drops their thinking block) with the message's content and the same
    end-of-turn text. Whatever else a template does is an error, never a guessed mask.
    """
    messages = check_messages(record, origin, field)

    def render(count: int, add_generation_prompt: bool) -> str:
        try:
            return render_chat(messages[:count], add_generation_prompt)
        except HpcdsError as exc:
            raise HpcdsError(f"{origin}: {exc}") from None

    def unstable(what: str) -> HpcdsError:
        return HpcdsError(
            f"{origin}: the chat template is not prefix-stable: {what}, so the assistant turns cannot be told apart"
            "\nhint: the template rewrites earlier turns (e.g. a message's reasoning, or content it splits); drop "
            "such fields from the messages, or write the pairs with --prompt-field/--response-field"
        )

    whole = render(len(messages), False)
    spans: list[tuple[int, int]] = []
    done = 0  # where the previous assistant turn ends
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render(i, True)
        if not whole.startswith(head) or len(head) < done:
            raise unstable(f"the conversation up to message {i} with the generation prompt does not begin the whole")
        full = render(i + 1, False)
        if not full.startswith(head):
            raise unstable(f"message {i} rendered last does not follow its generation prompt")
        turn = full[len(head) :]
        cut = turn.rfind(message["content"])
        # An empty content would match anywhere: such a turn must be written the same in both places.
        short = message["content"] + turn[cut + len(message["content"]) :] if cut >= 0 and message["content"] else None
        if whole.startswith(turn, len(head)):
            end = len(head) + len(turn)
        elif short is not None and whole.startswith(short, len(head)):
            end = len(head) + len(short)  # an earlier turn written shorter: its content and end-of-turn
        else:
            raise unstable(f"message {i} is written differently once later messages follow")
        spans.append((len(head), end))
        done = end
    # Text outside the spans (system and user turns, headers, turns after the last answer) is read, not trained on.
    return Piece((whole,), ends_document=True, origin=origin, targets=tuple(spans))


def check_messages(record: dict, origin: str, field: str) -> list[dict]:
    """The record's conversation: a list of {"role": str, "content": str, ...} with at least one assistant turn."""
    if field not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise HpcdsError(f"{origin}: no field {field!r} (keys: {keys})\nhint: name the right one with --messages-field")
    messages = record[field]
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else type(messages).__name__
        raise HpcdsError(
            f"{origin}: field {field!r} must be a list of messages, got {got}"
            '\nhint: {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
        )
    shape = '\nhint: a message is {"role": "system" | "user" | "assistant", "content": "text"}'
    for number, message in enumerate(messages):
        where = f"{origin}: {field}[{number}]"
        if not isinstance(message, dict):
            raise HpcdsError(f"{where} must be an object with role and content, got {type(message).__name__}{shape}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                problem = "has no" if key not in message else f"has a {type(message[key]).__name__} as"
                raise HpcdsError(f"{where} {problem} {key!r}; role and content must be strings{shape}")
    if not any(m["role"] == "assistant" for m in messages):
        roles = ", ".join(m["role"] for m in messages)
        raise HpcdsError(
            f"{origin}: no assistant turn (roles: {roles}), so nothing to train on"
            '\nhint: the answers to learn need "role": "assistant"'
        )
    return messages


def target_mask(offsets: np.ndarray, spans: tuple[tuple[int, int], ...]) -> np.ndarray:
    """1 for each token (character span [start, end) in `offsets`, shape (n, 2)) that holds a character of a target
    span, else 0. A token straddling a span's edge (byte-level BPE merges the newline that ends Qwen's
    `assistant\n` with an answer's leading newline) is a target, so no character of an answer goes untrained."""
    starts = offsets[:, 0]
    ends = np.maximum(offsets[:, 1], starts + 1)  # a zero-width token counts as the character it sits at
    mask = np.zeros(len(offsets), dtype=bool)
    for span_start, span_end in spans:
        mask |= (starts < span_end) & (ends > span_start)
    return mask.astype(np.uint8)


def encode_group(
    encode, eot_id: int, items: list[tuple[Piece, bool, bool]], dtype: str, with_mask: bool, encode_offsets=None
) -> dict:
    """Tokenize consecutive pieces and lay them out per split, ready to append to the files.

    `encode(texts) -> list of uint32 arrays`; `encode_offsets(texts) -> list of (ids, (n, 2) character spans)`, or
    None for tokenizers that report no offsets (tiktoken, bytes). With offsets, an SFT record is encoded as
    prompt + response whole and a chat as its rendering whole, and the mask comes from the spans; a text piece with
    context is encoded amid it and keeps the tokens that start in the piece. Without offsets, prompt and response are
    encoded separately and joined. Each item is (piece, goes to val, starts a document). Returns
    {split: (token ids as `dtype`, loss mask or None, document starts relative to this group)} for splits present.
    """

    def whole(piece: Piece) -> bool:
        return encode_offsets is not None and (
            piece.targets is not None or len(piece.texts) == 2 or piece.context != ("", "")
        )

    if encode_offsets is None and any(piece.targets is not None for piece, _, _ in items):
        raise HpcdsError("chat data needs a tokenizer that reports offsets\nhint: --tokenizer hf:FOLDER")
    plain_texts = [text for piece, _, _ in items if not whole(piece) for text in piece.texts]
    whole_texts = [piece.context[0] + "".join(piece.texts) + piece.context[1] for piece, _, _ in items if whole(piece)]
    plain = iter(encode(plain_texts) if plain_texts else [])
    wholes = iter(encode_offsets(whole_texts) if whole_texts else [])
    out: dict[str, tuple[list, list, list, int]] = {}
    for piece, to_val, starts_document in items:
        if whole(piece):
            tokens, offsets = next(wholes)
            if len(piece.texts) == 1 and piece.targets is None:  # a text piece amid its context
                left = len(piece.context[0])
                tokens = tokens[(offsets[:, 0] >= left) & (offsets[:, 0] < left + len(piece.texts[0]))]
                mask = np.zeros(len(tokens), dtype=np.uint8) if with_mask else None
            else:
                spans = piece.targets
                if spans is None:  # an SFT record: its target is the response, which ends the joined text
                    spans = ((len(piece.texts[0]), len(piece.texts[0]) + len(piece.texts[1])),)
                mask = target_mask(offsets, spans) if with_mask else None
        else:
            parts = [next(plain) for _ in piece.texts]
            tokens = np.concatenate(parts) if len(parts) > 1 else parts[0]
            mask = None
            if with_mask:
                mask = np.ones(len(tokens), dtype=np.uint8)
                mask[: len(parts[0])] = 0  # the prompt: read, never predicted
        if piece.ends_document and piece.targets is None:  # end-of-text: a target, so the model learns to stop
            tokens = np.concatenate([tokens, np.array([eot_id], dtype=np.uint32)])
            mask = None if mask is None else np.concatenate([mask, np.ones(1, dtype=np.uint8)])
        chunks, masks, starts, length = out.get("val" if to_val else "train", ([], [], [], 0))
        if starts_document:
            starts.append(length)
        chunks.append(tokens)
        if with_mask:
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
    tokenizer_source: str = "",
) -> dict:
    """meta.json: `tokenizer` names the vocabulary (sources mix only when it is equal), `tokenizer_source` is what
    was given to load it (for hf: tokenizers, the folder, which `hpcds data info` decodes with)."""
    return {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "tokenizer_source": tokenizer_source or tokenizer,
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


def tokenizer_label(meta: dict) -> str:
    """A prepared folder's tokenizer for people: `hf:<hash> (from FOLDER)` for Hugging Face tokenizers, whose
    vocabulary name alone says little; the name itself for the others."""
    name, source = meta["tokenizer"], meta.get("tokenizer_source")
    return f"{name} (from {source})" if source and source != name else name


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
