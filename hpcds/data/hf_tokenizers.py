"""`hf:FOLDER` tokenizers: the tokenizer of a Hugging Face model in a local folder, read with the `tokenizers` library
(never downloaded), its chat template rendered by transformers' torch-free template code. `get_tokenizer` in
`hpcds.data.tokenizers` hands `hf:` names here."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hpcds.data.tokenizer import HF_PREFIX, Tokenizer
from hpcds.errors import HpcdsError

# Settings in tokenizer.json that do not change which id a token gets: left out of the fingerprint.
HF_SETTINGS = ("truncation", "padding", "version")
HF_PARALLELISM = "TOKENIZERS_PARALLELISM"


def hf_folder(given: str) -> Path:
    if not given:
        raise HpcdsError("tokenizer hf: names no folder\nhint: hf:FOLDER, the folder holding tokenizer.json")
    folder = Path(given).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise HpcdsError(
            f"tokenizer hf:{given}: {folder} {what} (hf: takes a local folder; hpcds never downloads)"
            "\nhint: on a machine with internet run"
            f"\n    huggingface-cli download {given} --local-dir DIR"
            "\n  (the model's tokenizer* files are enough), then use hf:DIR"
        )
    if not (folder / "tokenizer.json").is_file():
        raise HpcdsError(
            f"tokenizer hf:{given}: {folder} holds no tokenizer.json (a fast Hugging Face tokenizer)"
            "\nhint: copy the model's tokenizer.json and tokenizer_config.json there; a folder with only a "
            "sentencepiece tokenizer.model gets a tokenizer.json from "
            "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)"
        )
    return folder.resolve()


def hf_fingerprint(folder: Path) -> str:
    """`hf:` + a hash of the vocabulary, merges, special tokens and splitting rules, and of the end-of-text token and
    its id: two copies of one tokenizer (even with other key order, indentation, or truncation and padding settings)
    get one name, so their data may mix; one tokenizer.json with another eos_token (a base model's <|endoftext|>, its
    chat model's <|im_end|>) separates documents differently and gets another."""
    tokenizer_json = folder / "tokenizer.json"
    try:
        content = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HpcdsError(f"cannot read {tokenizer_json}: {exc}") from None
    if not isinstance(content, dict):
        found = type(content).__name__
        raise HpcdsError(f"{tokenizer_json} is not a tokenizer (a JSON object expected, found {found})")
    for key in HF_SETTINGS:
        content.pop(key, None)
    eos = _hf_specials(folder).get("eos_token")
    named = {"tokenizer": content, "eos_token": eos, "eos_id": _json_token_id(content, eos)}
    canonical = json.dumps(named, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return HF_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _json_token_id(content: dict, token: str | None) -> int | None:
    """The id tokenizer.json gives `token` (an added token, else a vocabulary entry), read without loading it."""
    # A malformed file gives None here; loading it (from_hf_folder) then says what is wrong.
    added_tokens = content.get("added_tokens")
    for added in added_tokens if isinstance(added_tokens, list) else []:
        if isinstance(added, dict) and added.get("content") == token:
            return added.get("id")
    model = content.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], the id is the position
        vocab = {entry[0]: i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry}
    return vocab.get(token) if isinstance(vocab, dict) else None


def _hf_specials(folder: Path) -> dict[str, str]:
    """The folder's bos/eos/unk/pad tokens: tokenizer_config.json's, else special_tokens_map.json's."""
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    return {
        key: text
        for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        if (text := _token_text(config.get(key)) or _token_text(special_map.get(key))) is not None
    }


def _token_text(value) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as AddedToken objects {"content": ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HpcdsError(f"cannot read {path}: {exc}") from None
    return content if isinstance(content, dict) else {}


def _hf_chat_template(folder: Path, config: dict) -> str | None:
    """The default chat template: chat_template.jinja (newer transformers), else tokenizer_config.json's entry."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def from_hf_folder(given: str) -> Tokenizer:
    from tokenizers import Tokenizer as HfTokenizer

    folder = hf_folder(given)
    try:
        backend = HfTokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # the Rust side raises plain Exception for a malformed file
        raise HpcdsError(f"{folder}/tokenizer.json is not a tokenizer the `tokenizers` library reads: {exc}") from None
    # Settings saved with a tokenizer must not cut or pad documents; special tokens in text (a chat template's
    # <|im_start|>, a literal <|endoftext|>) become their ids, as transformers does.
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = False
    config = _read_json(folder / "tokenizer_config.json")
    specials = _hf_specials(folder)
    eos = specials.get("eos_token")
    eot_id = backend.token_to_id(eos) if eos else None
    if eot_id is None:
        found = f"eos_token {eos!r} is not in its vocabulary" if eos else "names no eos_token"
        raise HpcdsError(
            f"tokenizer hf:{given}: {folder}/tokenizer_config.json {found}; documents need an end-of-text id"
            '\nhint: set "eos_token" in tokenizer_config.json to the model\'s end-of-text token'
        )
    # Ids may have holes (added tokens placed above the base vocabulary): size the dtype by the largest id.
    vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    encode_fast = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets: faster

    def encode_batch(texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        # add_special_tokens=False: no BOS/EOS per piece. Text pieces, SFT and chat records go through
        # encode_offsets instead (with their context, or whole), so that their ids are those of the whole text.
        if num_threads > 1:  # the Rust thread pool, on every core
            encodings = encode_fast(texts, add_special_tokens=False)
        else:  # one thread (a worker process, or a trainer next to torch's threads)
            with _hf_serial():
                encodings = encode_fast(texts, add_special_tokens=False)
        return [np.array(e.ids, dtype=np.uint32) for e in encodings]

    def encode_offsets(texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        # Each text whole, as the model reads it at inference; the offsets (character spans) place the loss mask.
        with _hf_serial():
            encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [
            (np.array(e.ids, dtype=np.uint32), np.array(e.offsets, dtype=np.int64).reshape(-1, 2)) for e in encodings
        ]

    def decode(ids: list[int]) -> str:
        return backend.decode([int(i) for i in ids], skip_special_tokens=False)

    template = _hf_chat_template(folder, config)
    render_chat = None if template is None else _chat_renderer(template, specials, folder)
    return Tokenizer(
        name=hf_fingerprint(folder),
        vocab_size=vocab_size,
        eot_id=eot_id,
        encode_batch=encode_batch,
        decode=decode,
        encoding=backend,
        source=HF_PREFIX + str(folder),
        render_chat=render_chat,
        encode_offsets=encode_offsets,
    )


def _chat_renderer(template: str, specials: dict, folder: Path) -> Callable[[list[dict], bool], str]:
    """render(messages, add_generation_prompt) with transformers' sandboxed renderer, as apply_chat_template does
    (which passes the special tokens, so a template may write {{ bos_token }})."""

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            # transformers' template code: jinja2 in a sandbox, no torch import.
            from transformers.utils.chat_template_utils import render_jinja_template
        except ImportError:
            raise HpcdsError(
                "rendering a chat template needs transformers >= 4.52 (chat_template_utils.render_jinja_template)"
                "\nhint: pip install -U 'transformers>=4.52'"
            ) from None
        try:
            rendered, _ = render_jinja_template(
                conversations=[messages],
                chat_template=template,
                add_generation_prompt=add_generation_prompt,
                **specials,
            )
        except Exception as exc:  # the template's raise_exception() or a jinja error: a bad record or template
            raise HpcdsError(f"the chat template of {folder} failed: {type(exc).__name__}: {exc}") from None
        return rendered[0]

    return render


@contextlib.contextmanager
def _hf_serial():
    """`tokenizers` reads TOKENIZERS_PARALLELISM at each batch call: off, a batch is encoded on the calling thread
    (a batch loop without offsets, faster than encode() per text), and nothing starts the thread pool, so forked
    workers stay safe to fork. Worker processes set it once for good; elsewhere it is switched for the call."""
    before = os.environ.get(HF_PARALLELISM)
    if before == "false":
        yield
        return
    os.environ[HF_PARALLELISM] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[HF_PARALLELISM]
        else:
            os.environ[HF_PARALLELISM] = before
