"""The `Tokenizer` every tokenizer of hpcds is made as, whatever library is underneath. No I/O here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hpcds.facts import HF_PREFIX

__all__ = ["HF_PREFIX", "Tokenizer"]


@dataclass(frozen=True)
class Tokenizer:
    """A vocabulary with an end-of-text id; `encode_batch` tokenizes many texts at once on `num_threads` threads."""

    name: str
    vocab_size: int
    eot_id: int
    encode_batch: Callable[[list[str], int], list[np.ndarray]]
    decode: Callable[[list[int]], str]
    encoding: object = None  # the tiktoken.Encoding or tokenizers.Tokenizer underneath, if any
    source: str = ""  # what get_tokenizer was given (a worker process rebuilds the tokenizer from it)
    # Hugging Face tokenizers with a chat template: render_chat(messages, add_generation_prompt) -> text.
    render_chat: Callable[[list[dict], bool], str] | None = None
    # Tokenizers that report where each token came from (hf:): encode_offsets(texts) -> [(ids, (n, 2) character
    # start/end of each token)], on the calling thread. SFT masks come from these spans, and text pieces are encoded
    # with the text around them through it: joined pieces differ from the whole (a SentencePiece ▁ at each piece's
    # start, a merge across the cut) for such tokenizers, while tiktoken's and the bytes' join exactly at blank lines.
    encode_offsets: Callable[[list[str]], list[tuple[np.ndarray, np.ndarray]]] | None = None


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 holds ids up to 65535; bigger vocabularies (cl100k: 100277) need uint32."""
    return "uint16" if vocab_size <= 65536 else "uint32"
