"""`hf:FOLDER` tokenizers and chat SFT data, on real tokenizer folders: a byte-level BPE (as GPT-2's and Qwen's) and a
SentencePiece-style Metaspace BPE (as Mistral's and Llama-2's) trained here with the `tokenizers` library and saved by
transformers' `save_pretrained`, exactly as a model's folder holds it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcds.cli import main
from hpcds.data.builtin import builtin_folder
from hpcds.data.pieces import target_mask
from hpcds.data.prepare import prepare_files
from hpcds.data.tokenizers import get_tokenizer, tokenizer_name
from hpcds.errors import HpcdsError
from hpcds.spec import DataSpec
from hpcds.train.data import IGNORE_INDEX, open_data

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>"]
# ChatML, as Qwen writes it, with a BOS token first as Gemma's templates do.
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Like Qwen3's template, which drops the reasoning of earlier answers: an answer renders in full only while it is the
# last message, so a longer conversation does not begin with the rendering of a shorter one.
UNSTABLE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool messages here') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}(earlier answer)"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The turn logic of Qwen3's template: the answers after the last user message are written with a thinking block
# (empty when the message has no reasoning_content), earlier answers without, so an answer is written differently
# once a later user turn follows.
QWEN3 = (
    "{%- set ns = namespace(last_query_index=messages|length - 1, found=false) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if not ns.found and message.role == 'user' %}{%- set ns.found = true %}{%- set ns.last_query_index = index %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or message.role == 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = message.reasoning_content if message.reasoning_content is string else '' %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}"
    "{{- message.content }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + message.content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Mistral's instruct format: the answer follows [/INST] with no space, and its </s> closes the turn.
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is two plus two? Two plus two is four.",
    "Name a colour. Blue is a colour, and so is red.",
    "You are a helpful assistant. Answer briefly.",
]
# Qwen2/Qwen3's pre-tokenizer regex: a run of newlines (with the spaces before it) is one word.
QWEN_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
]


def save_tokenizer(
    folder: Path, vocab_size: int, eos: str, chat_template: str | None, corpus: list[str] = CORPUS, split: str = ""
) -> Path:
    """Train a byte-level BPE on `corpus` and save it as a model folder does (tokenizer.json, tokenizer_config.json).
    `split`: a regex that cuts text into words first, as Qwen's tokenizer.json has (else GPT-2's)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus * 5, trainer)
    # A BOS added to every encode() by default, as Llama's and Gemma's tokenizers do: pieces must not get it.
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token=eos)
    if chat_template is not None:
        wrapped.chat_template = chat_template
    wrapped.save_pretrained(str(folder))
    return folder


def save_metaspace_tokenizer(folder: Path) -> Path:
    """A SentencePiece-style BPE (Metaspace: a space becomes ▁, and the text's first word gets one too) with Mistral's
    special tokens and chat template, saved as a model folder does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    # prepend_scheme="first", as Mistral's and Llama's tokenizer.json have it: only the text's first word gets a ▁,
    # not the text after a special token such as [/INST].
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    backend.train_from_iterator([*CORPUS, "Four. Blue.\nTwo plus two is four.\n"] * 5, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    wrapped.chat_template = MISTRAL
    wrapped.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tokenizers_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    save_tokenizer(root / "chat", 340, "<|im_end|>", CHATML)
    save_tokenizer(root / "plain", 330, "<|endoftext|>", None)
    save_metaspace_tokenizer(root / "mistral")
    # GPT-2's splitting makes "\n\n" one word at the end of a text and two inside one: with its merge ĊĊ, a text cut
    # after a blank line no longer encodes as the whole does.
    save_tokenizer(root / "gpt2", 340, "<|endoftext|>", None, [*CORPUS, *["Blue.\n\n"] * 20])
    save_tokenizer(root / "qwen", 340, "<|im_end|>", CHATML, [*CORPUS, *["Four\n\nBlue\n\nred"] * 20], QWEN_SPLIT)
    for name, template in (("unstable", UNSTABLE), ("qwen3", QWEN3)):
        shutil.copytree(root / "chat", root / name)
        (root / name / "chat_template.jinja").write_text(template)
    return root


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read(folder: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray | None]:
    meta = json.loads((folder / "meta.json").read_text())
    tokens = np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"])
    mask_path = folder / f"{split}.mask.bin"
    return tokens, np.fromfile(mask_path, dtype=np.uint8) if mask_path.is_file() else None


def runs(values: np.ndarray, flags: np.ndarray) -> list[list[int]]:
    """The runs of consecutive values whose flag is set."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
    return [values[start:stop].tolist() for start, stop in zip(edges[::2], edges[1::2], strict=True)]


def test_text_round_trips_with_end_of_text_per_document(tmp_path, tokenizers_dir):
    folder = tokenizers_dir / "plain"
    texts = ["The quick brown fox jumps over the lazy dog.\n\nZebras are not in the corpus: ünïcödé too.\n", "Blue.\n"]
    for i, text in enumerate(texts):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / f"in/{i}.txt").write_text(text)
    # Two worker processes: each rebuilds nothing (fork) but encodes with the tokenizer it inherited.
    meta = prepare_files([tmp_path / "in"], tmp_path / "out", tokenizer=f"hf:{folder}", val_fraction=0, num_threads=2)
    tok = get_tokenizer(f"hf:{folder}")
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert meta["vocab_size"] == tok.vocab_size == len(vocab) == 330  # the special tokens are inside the 330
    assert meta["dtype"] == "uint16" and meta["eot_id"] == tok.eot_id == vocab["<|endoftext|>"]
    assert meta["tokenizer"].startswith("hf:") and len(meta["tokenizer"]) == 3 + 16
    assert meta["tokenizer_source"] == tok.source == f"hf:{folder.resolve()}"
    assert get_tokenizer(tok.source).name == tok.name  # what a spawned worker process rebuilds
    tokens, _ = read(tmp_path / "out")
    eot_positions = np.flatnonzero(tokens == tok.eot_id)
    assert eot_positions.tolist() == [eot_positions[0], len(tokens) - 1]  # one end-of-text after each document
    assert tok.decode(tokens[: eot_positions[0]].tolist()) == texts[0]
    assert tok.decode(tokens[eot_positions[0] + 1 : -1].tolist()) == texts[1]
    assert tok.decode(tokens.tolist()) == texts[0] + "<|endoftext|>" + texts[1] + "<|endoftext|>"


def test_pieces_get_no_special_tokens_and_join_like_the_whole(tmp_path, tokenizers_dir):
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizers_dir / "plain/tokenizer.json"))
    bos_id = backend.token_to_id("<s>")
    assert backend.encode("fox").ids[0] == bos_id  # the folder's own default adds BOS: hpcds must not, per piece
    paragraphs = [f"Paragraph {i}: the quick brown fox jumps over {i * 7} lazy dogs." for i in range(5000)]
    text = "\n\n".join(paragraphs) + "\n"
    assert len(text) > 4 * 64 * 1024  # several pieces
    (tmp_path / "long.txt").write_text(text)
    prepare_files([tmp_path / "long.txt"], tmp_path / "out", tokenizer=f"hf:{tokenizers_dir / 'plain'}", val_fraction=0)
    tok = get_tokenizer(f"hf:{tokenizers_dir / 'plain'}")
    tokens, _ = read(tmp_path / "out")
    assert bos_id not in tokens.tolist()
    assert tokens.tolist() == [*backend.encode(text, add_special_tokens=False).ids, tok.eot_id]


@pytest.mark.parametrize("folder", ["mistral", "gpt2", "qwen"])
@pytest.mark.parametrize("layout", ["paragraphs", "one line"])
def test_text_pieces_of_tokenizers_that_start_texts_differently_join_like_the_whole(
    tmp_path, tokenizers_dir, folder, layout
):
    # A Metaspace ▁ at a piece's start, GPT-2's ĊĊ at its end, or (Qwen's splitting) a merge across a cut inside a
    # line would each change the ids if pieces were encoded alone.
    from tokenizers import Tokenizer

    tokenizer = f"hf:{tokenizers_dir / folder}"
    if layout == "paragraphs":
        text = "\n\n".join(f"Two plus two is four. Blue is a colour, day {i}." for i in range(6000)) + "\n"
    else:  # no line break at all: pieces are cut anywhere, even inside a word
        text = "The quick brown fox jumps over the lazy dog. " * 7000
    assert len(text) > 4 * 64 * 1024  # several pieces
    (tmp_path / "long.txt").write_text(text)
    prepare_files([tmp_path / "long.txt"], tmp_path / "out", tokenizer=tokenizer, val_fraction=0, num_threads=2)
    backend = Tokenizer.from_file(str(tokenizers_dir / folder / "tokenizer.json"))
    tokens, _ = read(tmp_path / "out")
    assert tokens.tolist() == [*backend.encode(text, add_special_tokens=False).ids, get_tokenizer(tokenizer).eot_id]


def test_copies_of_one_tokenizer_mix_and_another_is_refused(tmp_path, tokenizers_dir):
    copy = tmp_path / "copy"
    shutil.copytree(tokenizers_dir / "chat", copy)
    # The same tokenizer saved differently (key order, indentation, padding settings) is still the same vocabulary.
    content = json.loads((copy / "tokenizer.json").read_text())
    content["padding"] = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None,
                          "pad_id": 0, "pad_type_id": 0, "pad_token": "<|endoftext|>"}  # fmt: skip
    (copy / "tokenizer.json").write_text(json.dumps(content, sort_keys=True))
    text = "What is two plus two? Two plus two is four.\n" * 40
    (tmp_path / "a.txt").write_text(text)
    sources = {"A": tokenizers_dir / "chat", "B": copy, "C": tokenizers_dir / "plain"}
    metas = {
        name: prepare_files([tmp_path / "a.txt"], tmp_path / name, tokenizer=f"hf:{folder}", val_fraction=0.1)
        for name, folder in sources.items()
    }
    assert metas["A"]["tokenizer"] == metas["B"]["tokenizer"] != metas["C"]["tokenizer"]
    assert metas["A"]["tokenizer_source"] != metas["B"]["tokenizer_source"]
    # Padding in the folder's settings must not pad anything here: the same ids as the original.
    assert read(tmp_path / "A")[0].tolist() == read(tmp_path / "B")[0].tolist()
    data = open_data(DataSpec(train=[str(tmp_path / "A"), str(tmp_path / "B")]), 16, 0, tmp_path)
    assert data.tokenizer == metas["A"]["tokenizer"] and data.vocab_size == 340
    with pytest.raises(HpcdsError, match="different tokenizers") as refused:
        open_data(DataSpec(train=[str(tmp_path / "A"), str(tmp_path / "C")]), 16, 0, tmp_path)
    assert f"from hf:{tokenizers_dir / 'plain'}" in str(refused.value)  # the folders, not only their hashes
    # Builtin corpora for copies of one tokenizer share a cache folder, named by the fingerprint.
    fingerprint = metas["A"]["tokenizer"][3:]
    assert builtin_folder("stdlib-docs", f"hf:{copy}", tmp_path) == builtin_folder(
        "stdlib-docs", f"hf:{tokenizers_dir / 'chat'}", tmp_path
    )
    assert builtin_folder("stdlib-docs", f"hf:{copy}", tmp_path).name.startswith(f"stdlib-docs-hf-{fingerprint}-py")


def test_one_tokenizer_json_with_another_eos_token_is_another_tokenizer(tmp_path, tokenizers_dir):
    # Qwen3's base and chat folders share tokenizer.json; the base ends documents with <|endoftext|>, the chat model
    # with <|im_end|>. Their data must not mix, nor their builtin corpora share a folder.
    base = tmp_path / "base"
    shutil.copytree(tokenizers_dir / "chat", base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    chat, other = get_tokenizer(f"hf:{tokenizers_dir / 'chat'}"), get_tokenizer(f"hf:{base}")
    assert (base / "tokenizer.json").read_bytes() == (tokenizers_dir / "chat/tokenizer.json").read_bytes()
    assert chat.eot_id != other.eot_id and chat.name != other.name
    assert tokenizer_name(f"hf:{base}") == other.name and tokenizer_name(f"hf:{tokenizers_dir / 'chat'}") == chat.name
    assert builtin_folder("stdlib-docs", f"hf:{base}", tmp_path) != builtin_folder(
        "stdlib-docs", f"hf:{tokenizers_dir / 'chat'}", tmp_path
    )
    (tmp_path / "a.txt").write_text(CORPUS[0])
    for name, folder in (("A", tokenizers_dir / "chat"), ("B", base)):
        prepare_files([tmp_path / "a.txt"], tmp_path / name, tokenizer=f"hf:{folder}", val_fraction=0)
    with pytest.raises(HpcdsError, match="different tokenizers"):
        open_data(DataSpec(train=[str(tmp_path / "A"), str(tmp_path / "B")]), 4, 0, tmp_path)
    # The eos token named in special_tokens_map.json alone (no tokenizer_config.json entry) counts the same.
    (base / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "eos_token"}))
    (base / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert get_tokenizer(f"hf:{base}").name == chat.name


def test_chat_mask_covers_every_assistant_turn_and_its_end_of_turn(tmp_path, tokenizers_dir):
    records = [{"messages": CHAT}, {"messages": [*CHAT[1:3], {"role": "user", "content": "Thanks."}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    meta = prepare_files(
        [path], tmp_path / "out", tokenizer=f"hf:{tokenizers_dir / 'chat'}", messages_field="messages", val_fraction=0
    )
    tok = get_tokenizer(f"hf:{tokenizers_dir / 'chat'}")
    tokens, mask = read(tmp_path / "out")
    assert meta["has_mask"] and meta["train_documents"] == 2 and len(mask) == len(tokens)
    first = (
        "<s><|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
        "<|im_start|>assistant\nFour.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\nBlue.<|im_end|>\n"
    )
    second = (
        "<s><|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nFour.<|im_end|>\n"
        "<|im_start|>user\nThanks.<|im_end|>\n"
    )
    # The template's text, nothing appended: its end-of-turn closes the conversation, the next one starts with BOS.
    assert tok.decode(tokens.tolist()) == first + second
    # Each conversation is encoded whole, as the model reads it at inference.
    whole = [tok.encoding.encode(text, add_special_tokens=False).ids for text in (first, second)]
    assert tokens.tolist() == whole[0] + whole[1]
    assert tokens.tolist().count(tok.encoding.token_to_id("<s>")) == 2  # the template's BOS, one per conversation
    answers = [tok.decode(run) for run in runs(tokens, mask == 1)]
    assert answers == ["Four.<|im_end|>\n", "Blue.<|im_end|>\n", "Four.<|im_end|>\n"]
    starts = np.fromfile(tmp_path / "out/train.idx.bin", dtype=np.uint64).tolist()
    assert tok.decode(tokens[starts[1] :].tolist()) == second


def test_chat_folder_is_read_as_batches_with_targets_on_answers_only(tmp_path, tokenizers_dir):
    records = [{"messages": CHAT}, {"messages": CHAT[1:3]}] * 10
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    tokenizer = f"hf:{tokenizers_dir / 'chat'}"
    prepare_files([path], tmp_path / "out", tokenizer=tokenizer, messages_field="messages", val_fraction=0.1)
    tok = get_tokenizer(tokenizer)
    answers = {"Four.<|im_end|>\n", "Blue.<|im_end|>\n"}
    spec = {"train": [str(tmp_path / "out")], "tokenizer": tokenizer}

    packed = open_data(DataSpec(**spec), 48, 0, tmp_path)
    x, y = packed.train_batch(2, 0, 0, 1, 8)
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        assert tok.decode(row_x.tolist()).startswith("<s><|im_start|>")  # windows start at a conversation
        targets = [tok.decode(run) for run in runs(row_y, row_y != IGNORE_INDEX)]
        assert targets and all(any(a.startswith(t) for a in answers) for t in targets)  # the last may be cut

    unpacked = open_data(DataSpec(**spec, packing=False), 96, 0, tmp_path)
    for x, y in [unpacked.train_batch(2, 0, 0, 1, 8), unpacked.val_batch(0, 0, 1, 2)]:
        for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
            text = tok.decode(row_x.tolist())
            expected = ["Four.<|im_end|>\n", "Blue.<|im_end|>\n"] if "Name a colour" in text else ["Four.<|im_end|>\n"]
            assert [tok.decode(run) for run in runs(row_y, row_y != IGNORE_INDEX)] == expected
            assert text.endswith("<|im_end|>")  # padded with end-of-text (here <|im_end|>), never a target


def test_qwen3_style_template_trains_every_answer_as_the_whole_conversation_writes_it(tmp_path, tokenizers_dir):
    reasoned = [*CHAT[:2], {**CHAT[2], "reasoning_content": "2 + 2 = 4"}, *CHAT[3:]]
    last_reasoned = [*CHAT[:4], {**CHAT[4], "reasoning_content": "Pick one."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in (CHAT, reasoned, last_reasoned)])
    tokenizer = f"hf:{tokenizers_dir / 'qwen3'}"
    prepare_files([path], tmp_path / "out", tokenizer=tokenizer, messages_field="messages", val_fraction=0)
    tok = get_tokenizer(tokenizer)
    tokens, mask = read(tmp_path / "out")
    starts = np.fromfile(tmp_path / "out/train.idx.bin", dtype=np.uint64).tolist()
    history = "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is two plus two?<|im_end|>\n"
    expected = [
        (["Four.<|im_end|>\n", "<think>\n\n</think>\n\nBlue.<|im_end|>\n"], "<|im_start|>assistant\nFour."),
        # An earlier answer's reasoning is not in the whole conversation: neither read nor trained on.
        (["Four.<|im_end|>\n", "<think>\n\n</think>\n\nBlue.<|im_end|>\n"], "<|im_start|>assistant\nFour."),
        (["Four.<|im_end|>\n", "<think>\nPick one.\n</think>\n\nBlue.<|im_end|>\n"], "<|im_start|>assistant\nFour."),
    ]
    for (first, stop), (answers, prefix) in zip(
        zip(starts, [*starts[1:], len(tokens)], strict=True), expected, strict=True
    ):
        text = tok.decode(tokens[first:stop].tolist())
        assert text.startswith(history + prefix) and "2 + 2 = 4" not in text
        assert [tok.decode(run) for run in runs(tokens[first:stop], mask[first:stop] == 1)] == answers


def test_sentencepiece_style_chat_is_encoded_as_the_model_reads_it(tmp_path, tokenizers_dir):
    from tokenizers import Tokenizer

    folder = tokenizers_dir / "mistral"
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    chats = [
        CHAT[1:],
        [CHAT[1], {"role": "assistant", "content": "Two plus two is four."}, {"role": "user", "content": "Blue?"}],
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in chats])
    prepare_files([path], tmp_path / "out", tokenizer=f"hf:{folder}", messages_field="messages", val_fraction=0)
    tokens, mask = read(tmp_path / "out")
    rendered = [
        "<s>[INST] What is two plus two? [/INST]Four.</s>[INST] Name a colour. [/INST]Blue.</s>",
        "<s>[INST] What is two plus two? [/INST]Two plus two is four.</s>[INST] Blue? [/INST]",
    ]
    whole = [backend.encode(text, add_special_tokens=False) for text in rendered]
    assert tokens.tolist() == whole[0].ids + whole[1].ids
    # An answer encoded on its own would start with ▁ (the first word of a text gets one): not how the model reads it.
    assert backend.encode("Four.</s>", add_special_tokens=False).tokens == ["▁Four.", "</s>"]
    assert whole[0].tokens[whole[0].tokens.index("[/INST]") + 1] == "Four."
    tok = get_tokenizer(f"hf:{folder}")
    answers = [tok.decode(run) for run in runs(tokens, mask == 1)]
    assert answers == ["Four.</s>", "Blue.</s>", "Two plus two is four.</s>"]


def test_a_token_straddling_the_start_of_an_answer_is_a_target(tmp_path, tokenizers_dir):
    from tokenizers import Tokenizer

    # With Qwen's splitting, the newline that ends `assistant\n` and an answer's leading newline are one token.
    folder = tokenizers_dir / "qwen"
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    chat = [CHAT[1], {"role": "assistant", "content": "\nFour."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    prepare_files([path], tmp_path / "out", tokenizer=f"hf:{folder}", messages_field="messages", val_fraction=0)
    tokens, mask = read(tmp_path / "out")
    rendered = "<s><|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n\nFour.<|im_end|>\n"
    whole = backend.encode(rendered, add_special_tokens=False)
    assert tokens.tolist() == whole.ids and "ĊĊ" in whole.tokens  # ĊĊ: the two newlines, byte-level
    tok = get_tokenizer(f"hf:{folder}")
    assert [tok.decode(run) for run in runs(tokens, mask == 1)] == ["\n\nFour.<|im_end|>\n"]


def test_prompt_response_pairs_are_encoded_whole_with_hf_tokenizers(tmp_path, tokenizers_dir):
    from tokenizers import Tokenizer

    folder = tokenizers_dir / "mistral"
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    pairs = [("What is two plus two?\n", "Four."), ("Name a colour.\n", "Blue is a colour.")]
    path = write_jsonl(tmp_path / "sft.jsonl", [{"q": q, "a": a} for q, a in pairs])
    prepare_files([path], tmp_path / "out", tokenizer=f"hf:{folder}", prompt_field="q", response_field="a",
                  val_fraction=0, num_threads=2)  # fmt: skip
    tokens, mask = read(tmp_path / "out")
    tok = get_tokenizer(f"hf:{folder}")
    expected = []
    for prompt, response in pairs:
        expected += [*backend.encode(prompt + response, add_special_tokens=False).ids, tok.eot_id]
        # Encoded alone, the response's first word would get a ▁ (a space) that the joined text does not have.
        whole = backend.encode(prompt + response, add_special_tokens=False)
        first = whole.tokens[[start >= len(prompt) for start, _ in whole.offsets].index(True)]
        assert backend.encode(response, add_special_tokens=False).tokens[0].startswith("▁")
        assert not first.startswith("▁")
    assert tokens.tolist() == expected
    assert [tok.decode(run) for run in runs(tokens, mask == 1)] == ["Four.</s>", "Blue is a colour.</s>"]
    assert [tok.decode(run) for run in runs(tokens, mask == 0)] == [prompt for prompt, _ in pairs]


def test_target_mask_takes_every_token_that_holds_an_answer_character():
    # (start, end) character spans as tokenizers reports them; the answer is characters 10..15.
    offsets = np.array([[0, 9], [9, 11], [11, 15], [15, 16], [16, 16]], dtype=np.int64)
    assert target_mask(offsets, ((10, 15),)).tolist() == [0, 1, 1, 0, 0]  # the token straddling 10 is trained
    assert target_mask(offsets, ((0, 9), (16, 17))).tolist() == [1, 0, 0, 0, 1]  # a zero-width token at 16


@pytest.mark.parametrize(
    "record,error",
    [
        ({"msgs": CHAT}, r"chat\.jsonl:2: no field 'messages' \(keys: msgs\)"),
        ({"messages": "hi"}, r"chat\.jsonl:2: field 'messages' must be a list of messages, got str"),
        ({"messages": []}, r"chat\.jsonl:2: field 'messages' must be a list of messages, got an empty list"),
        ({"messages": [CHAT[1], "Four."]}, r"chat\.jsonl:2: messages\[1\] must be an object"),
        ({"messages": [{"content": "hi"}]}, r"chat\.jsonl:2: messages\[0\] has no 'role'"),
        ({"messages": [{"role": "user", "content": ["hi"]}]}, r"chat\.jsonl:2: messages\[0\] has a list as 'content'"),
        ({"messages": CHAT[:2]}, r"chat\.jsonl:2: no assistant turn \(roles: system, user\)"),
    ],
)
def test_bad_chat_records_name_file_and_line(tmp_path, tokenizers_dir, record, error):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, record])
    with pytest.raises(HpcdsError, match=error) as info:
        prepare_files([path], tmp_path / "out", tokenizer=f"hf:{tokenizers_dir / 'chat'}", messages_field="messages")
    assert "\nhint: " in str(info.value)
    assert not (tmp_path / "out").exists()


def test_templates_that_cannot_be_split_are_errors(tmp_path, tokenizers_dir):
    tokenizer = f"hf:{tokenizers_dir / 'unstable'}"
    one_answer = write_jsonl(tmp_path / "one.jsonl", [{"messages": CHAT[1:3]}])
    prepare_files([one_answer], tmp_path / "ok", tokenizer=tokenizer, messages_field="messages", val_fraction=0)
    two_answers = write_jsonl(tmp_path / "two.jsonl", [{"messages": CHAT}])
    with pytest.raises(HpcdsError, match=r"two\.jsonl:1: the chat template is not prefix-stable.*\nhint:"):
        prepare_files([two_answers], tmp_path / "out", tokenizer=tokenizer, messages_field="messages")
    tool = write_jsonl(tmp_path / "tool.jsonl", [{"messages": [*CHAT[1:3], {"role": "tool", "content": "4"}]}])
    with pytest.raises(HpcdsError, match=r"tool\.jsonl:1: the chat template of .*unstable failed: .*no tool messages"):
        prepare_files([tool], tmp_path / "out", tokenizer=tokenizer, messages_field="messages")


def test_messages_field_needs_a_chat_template_and_excludes_other_fields(tmp_path, tokenizers_dir, capsys):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    plain = f"hf:{tokenizers_dir / 'plain'}"
    with pytest.raises(HpcdsError, match=rf"--messages-field messages .* tokenizer {plain} has none .*chat template"):
        prepare_files([path], tmp_path / "out", tokenizer=plain, messages_field="messages")
    with pytest.raises(HpcdsError, match=r"tokenizer bytes has none \(it is not a Hugging Face one\)\nhint: --tok"):
        prepare_files([path], tmp_path / "out", tokenizer="bytes", messages_field="messages")
    chat = f"hf:{tokenizers_dir / 'chat'}"
    for flags, named in [(["--text-field", "text"], "--text-field"), (["--prompt-field", "q", "--response-field", "a"],
                                                                      "--prompt-field/--response-field")]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["data", "prepare", str(path), "--out", str(tmp_path / "out"), "--tokenizer", chat,
                  "--messages-field", "messages", *flags])  # fmt: skip
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert f"--messages-field cannot be combined with {named}" in err and "hint:" in err
    text = tmp_path / "a.txt"
    text.write_text("not json\n")
    with pytest.raises(HpcdsError, match=r"a\.txt: chat data must be JSONL"):
        prepare_files([text], tmp_path / "out", tokenizer=chat, messages_field="messages")


def test_tokenizer_folder_errors(tmp_path, tokenizers_dir):
    with pytest.raises(HpcdsError, match=r"hf:Qwen/Qwen3-0\.6B: .* does not exist .*never downloads\)\nhint: ") as e:
        get_tokenizer("hf:Qwen/Qwen3-0.6B")
    assert "huggingface-cli download Qwen/Qwen3-0.6B --local-dir DIR" in str(e.value) and "hf:DIR" in str(e.value)
    with pytest.raises(HpcdsError, match=r"unknown tokenizer 'Qwen/Qwen3-0\.6B'.*\nhint: .* hf:Qwen/Qwen3-0\.6B"):
        get_tokenizer("Qwen/Qwen3-0.6B")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HpcdsError, match=r"hf: names no folder"):
        get_tokenizer("hf:")
    with pytest.raises(HpcdsError, match=r"holds no tokenizer\.json"):
        get_tokenizer(f"hf:{tmp_path / 'empty'}")
    no_eos = tmp_path / "no-eos"
    shutil.copytree(tokenizers_dir / "plain", no_eos)
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(HpcdsError, match=r"tokenizer_config\.json names no eos_token.*\nhint: set \"eos_token\""):
        get_tokenizer(f"hf:{no_eos}")
    (no_eos / "tokenizer.json").write_text("{not json")
    with pytest.raises(HpcdsError, match=r"tokenizer\.json is not a tokenizer"):
        get_tokenizer(f"hf:{no_eos}")


def test_cli_prepare_and_info_with_an_hf_folder(tmp_path, tokenizers_dir, capsys):
    folder = tmp_path / "tok"
    shutil.copytree(tokenizers_dir / "chat", folder)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 5)
    main(["data", "prepare", str(path), "--out", str(tmp_path / "out"), "--tokenizer", f"hf:{folder}",
          "--messages-field", "messages"])  # fmt: skip
    out = "".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert f"tokenizer:hf:{folder}}}" in out and "lossmask(SFT)" in out
    main(["data", "info", str(tmp_path / "out"), "--sample", "20"])
    assert "<s><|im_start|>system\nAnswer briefly." in capsys.readouterr().out
    shutil.rmtree(folder)  # the counts stay readable without the tokenizer
    main(["data", "info", str(tmp_path / "out")])
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines where the path is long
    assert "no decoded sample" in out and "does not exist" in out and "documents" in out


def test_hf_prepare_does_not_import_torch(tmp_path, tokenizers_dir):
    # Text needs only `tokenizers`; chat data also transformers' template code, which does not import torch.
    chats = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 3)
    (tmp_path / "a.txt").write_text(CORPUS[0])
    tokenizer = f"hf:{tokenizers_dir / 'chat'}"
    text_args = [str(tmp_path / "a.txt"), "--out", str(tmp_path / "text"), "--tokenizer", tokenizer, "--json"]
    chat_args = [str(chats), "--out", str(tmp_path / "chat"), "--tokenizer", tokenizer, "--messages-field", "messages"]
    probe = (
        "import sys\nfrom hpcds.cli import main\n"
        f"main(['data', 'prepare', *{text_args!r}])\n"
        "print('TRANSFORMERS' if 'transformers' in sys.modules else 'NO-TRANSFORMERS')\n"
        f"main(['data', 'prepare', *{chat_args!r}])\n"
        "print('TORCH' if 'torch' in sys.modules else 'LIGHT')"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "NO-TRANSFORMERS" in result.stdout and result.stdout.strip().endswith("LIGHT")


@pytest.mark.parametrize(
    "content",
    ["[]", '{"model": "x"}', '{"added_tokens": 5, "model": {"vocab": {}}}', '{"model": {"vocab": [1, 2]}}'],
)
def test_a_malformed_tokenizer_json_is_an_error_not_a_traceback(tmp_path, tokenizers_dir, content):
    folder = tmp_path / "broken"
    shutil.copytree(tokenizers_dir / "chat", folder)
    (folder / "tokenizer.json").write_text(content)
    # Naming hashes the file without loading it: a name, or (not even a JSON object) an error; loading says what is
    # wrong. Never a traceback.
    if content == "[]":
        with pytest.raises(HpcdsError, match="not a tokenizer"):
            tokenizer_name(f"hf:{folder}")
    else:
        assert tokenizer_name(f"hf:{folder}").startswith("hf:")
    with pytest.raises(HpcdsError, match="tokenizer"):
        get_tokenizer(f"hf:{folder}")
