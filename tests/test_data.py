"""Data preparation and reading on real files: memmaps written by the real writer, read back by the real reader."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from hpcds.cli import main
from hpcds.data import builtin
from hpcds.data.pieces import is_val_piece, split_paragraphs
from hpcds.data.prepare import prepare_files
from hpcds.data.tiktoken_tokenizers import R50K_URL
from hpcds.data.tokenizer import dtype_for_vocab
from hpcds.data.tokenizers import get_tokenizer
from hpcds.errors import HpcdsError
from hpcds.spec import DataSpec
from hpcds.train.data import IGNORE_INDEX, open_data, prepare_data

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog.\n\nIt was the best of times, it was the worst of times.\n"


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory) -> Path:
    """The stdlib-docs corpus, prepared once per test session (about 3 s)."""
    cache = tmp_path_factory.mktemp("cache")
    prepare_data(DataSpec(train=["builtin:stdlib-docs"], tokenizer="bytes"), cache)
    return cache


def write_text(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def read_tokens(folder: Path, split: str = "train") -> np.ndarray:
    meta = json.loads((folder / "meta.json").read_text())
    return np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"])


def test_dtype_follows_the_vocabulary():
    assert dtype_for_vocab(256) == "uint16"
    assert dtype_for_vocab(50257) == "uint16"
    assert dtype_for_vocab(65536) == "uint16"  # ids 0..65535 fit
    assert dtype_for_vocab(65537) == "uint32"
    assert dtype_for_vocab(100277) == "uint32"


@pytest.mark.parametrize("tokenizer,dtype", [("bytes", "uint16"), ("cl100k_base", "uint32")])
def test_prepare_text_round_trips(tmp_path, tokenizer, dtype):
    a = write_text(tmp_path / "in", "a.txt", TEXT)
    b = write_text(tmp_path / "in", "b.txt", "Second file, one line.\n")
    meta = prepare_files([a, b], tmp_path / "out", tokenizer=tokenizer, val_fraction=0)
    enc = get_tokenizer(tokenizer)
    tokens = read_tokens(tmp_path / "out")
    assert meta["dtype"] == dtype and tokens.dtype == np.dtype(dtype)
    assert meta["train_tokens"] == len(tokens) and meta["val_tokens"] == 0 and meta["train_documents"] == 2
    # Each file is one document followed by the end-of-text id.
    eot_positions = np.flatnonzero(tokens == enc.eot_id)
    assert len(eot_positions) == 2
    assert enc.decode(tokens[: eot_positions[0]].tolist()) == TEXT
    assert enc.decode(tokens[eot_positions[0] + 1 : eot_positions[1]].tolist()) == "Second file, one line.\n"
    starts = np.fromfile(tmp_path / "out/train.idx.bin", dtype=np.uint64)
    assert starts.tolist() == [0, eot_positions[0] + 1]


def test_folders_are_read_recursively_skipping_hidden_files(tmp_path):
    corpus = tmp_path / ".cache" / "corpus"  # a hidden folder above the input is fine
    write_text(corpus / "b", "2.txt", "two\n")
    write_text(corpus / "a", "1.txt", "one\n")
    write_text(corpus / ".git", "x.txt", "hidden\n")
    meta = prepare_files([corpus], tmp_path / "out", tokenizer="bytes", val_fraction=0)
    assert bytes(read_tokens(tmp_path / "out").astype(np.uint8)) == b"one\n\x00two\n\x00"
    assert meta["inputs"] == [str(corpus / "a/1.txt"), str(corpus / "b/2.txt")]


def test_long_text_is_cut_into_pieces_that_tokenize_like_the_whole(tmp_path):
    paragraphs = [f"Paragraph {i} talks about item {i * 7} and the weather on day {i}." for i in range(6000)]
    text = "\n\n".join(paragraphs) + "\n"
    assert len(text) > 4 * 64 * 1024  # several pieces
    path = write_text(tmp_path, "long.txt", text)
    prepare_files([path], tmp_path / "out", tokenizer="cl100k_base", val_fraction=0)
    enc = get_tokenizer("cl100k_base")
    whole = [*enc.encode_batch([text], 1)[0].tolist(), enc.eot_id]
    assert read_tokens(tmp_path / "out").tolist() == whole


def test_split_paragraphs_breaks_at_blank_lines():
    chunks, rest = split_paragraphs("aaaa\n\nbbbb\n\ncccc", final=False, piece_chars=8)
    assert chunks == ["aaaa\n\n", "bbbb\n\n"] and rest == "cccc"
    chunks, rest = split_paragraphs("x" * 20, final=True, piece_chars=8)
    assert "".join(chunks) == "x" * 20 and rest == ""


def test_val_fraction_spreads_pieces_evenly():
    picks = [i for i in range(1000) if is_val_piece(i, 0.05)]
    assert len(picks) == 50
    assert max(np.diff(picks)) == 20  # every 20th piece, not a block at the end


def test_val_split_of_a_small_input_takes_the_tail(tmp_path):
    path = write_text(tmp_path, "a.txt", TEXT * 10)
    meta = prepare_files([path], tmp_path / "out", tokenizer="bytes", val_fraction=0.1)
    total = len((TEXT * 10).encode()) + 1
    assert meta["train_tokens"] + meta["val_tokens"] == total
    assert meta["val_tokens"] == round(total * 0.1)
    joined = np.concatenate([read_tokens(tmp_path / "out"), read_tokens(tmp_path / "out", "val")])
    assert bytes(joined[:-1].astype(np.uint8)).decode() == TEXT * 10


def test_val_split_of_many_documents_is_even(tmp_path):
    lines = "".join(json.dumps({"text": f"record number {i}"}) + "\n" for i in range(200))
    path = write_text(tmp_path, "a.jsonl", lines)
    meta = prepare_files([path], tmp_path / "out", tokenizer="bytes", val_fraction=0.1)
    assert meta["val_documents"] == 20 and meta["train_documents"] == 180
    val_text = bytes(read_tokens(tmp_path / "out", "val").astype(np.uint8)).decode()
    assert "record number 9\x00" in val_text and "record number 199\x00" in val_text


def test_jsonl_text_field(tmp_path):
    lines = [{"body": "first record"}, {"body": "second record", "other": 1}]
    path = write_text(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in lines) + "\n")
    meta = prepare_files([path], tmp_path / "out", tokenizer="bytes", val_fraction=0, text_field="body")
    tokens = read_tokens(tmp_path / "out")
    assert bytes(tokens.astype(np.uint8)) == b"first record\x00second record\x00"
    assert meta["train_documents"] == 2 and not meta["has_mask"]


def test_sft_mask_trains_on_responses_only(tmp_path):
    records = [{"q": "What is two plus two?", "a": " Four."}, {"q": "Name a colour.", "a": " Blue."}] * 20
    path = write_text(tmp_path, "sft.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    meta = prepare_files(
        [path], tmp_path / "out", tokenizer="bytes", val_fraction=0, prompt_field="q", response_field="a"
    )
    assert meta["has_mask"] and meta["train_documents"] == 40
    tokens = read_tokens(tmp_path / "out")
    mask = np.fromfile(tmp_path / "out/train.mask.bin", dtype=np.uint8)
    first = len("What is two plus two?")
    assert mask[:first].tolist() == [0] * first  # the prompt is never a target
    assert mask[first : first + len(" Four.") + 1].tolist() == [1] * (len(" Four.") + 1)  # response + end-of-text
    assert int(tokens[first + len(" Four.")]) == 0

    data = open_data(DataSpec(train=[str(tmp_path / "out")], tokenizer="bytes"), 64, 0, tmp_path)
    x, y = data.train_batch(3, 0, 0, 1, 16)
    for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
        text = bytes(row_x).decode()
        assert text.startswith(("What is two", "Name a colour"))  # windows start at a record
        targets = bytes(t for t in row_y if t not in (IGNORE_INDEX, 0)).decode()
        # Every trained target byte belongs to a response.
        assert set(targets) <= set(" Four.Blue.")
    assert (y == IGNORE_INDEX).any() and (y != IGNORE_INDEX).any()


def test_unpacked_sft_rows_hold_one_example_and_padding(tmp_path):
    records = [{"q": "What is two plus two?", "a": " Four."}, {"q": "Name a colour.", "a": " Blue."}] * 20
    path = write_text(tmp_path, "sft.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    prepare_files([path], tmp_path / "out", tokenizer="bytes", val_fraction=0.1, prompt_field="q", response_field="a")
    spec = {"train": [str(tmp_path / "out")], "tokenizer": "bytes"}
    examples = {"What is two plus two? Four.\0", "Name a colour. Blue.\0"}  # the byte tokenizer's end-of-text is 0

    packed = open_data(DataSpec(**spec), 64, 0, tmp_path)
    x, _ = packed.train_batch(3, 0, 0, 1, 16)
    texts = [bytes(row).decode() for row in x.tolist()]
    # A packed row runs on into the next example; only a row that starts at the data's last example ends in padding.
    continued = [t for t in texts if t.count("What is") + t.count("Name a") >= 2]
    assert len(continued) >= len(texts) - 2 and all(not t.endswith("\0\0") for t in continued)

    padded = open_data(DataSpec(**spec, packing=False), 64, 0, tmp_path)
    for x, y in [padded.train_batch(3, 0, 0, 1, 16), padded.val_batch(0, 0, 1, 8)]:
        for row_x, row_y in zip(x.tolist(), y.tolist(), strict=True):
            text = bytes(row_x).decode()
            example = next(e for e in examples if text.startswith(e))
            assert set(text[len(example) :]) == {"\0"}  # padding after the example's end-of-text
            targets = [t for t in row_y if t != IGNORE_INDEX]
            # Only the response and its end-of-text are targets; the padding never is.
            assert bytes(targets).decode() in (" Four.\0", " Blue.\0"), bytes(targets)

    short = open_data(DataSpec(**spec, packing=False), 8, 0, tmp_path)  # shorter than an example: cut, not padded
    x, y = short.train_batch(0, 0, 0, 1, 4)
    assert all(bytes(row).decode().startswith(("What is", "Name a c")) for row in x.tolist())
    assert (y == IGNORE_INDEX).all()  # the cut keeps the prompt only: nothing to learn in these rows


def test_errors_name_the_file(tmp_path):
    with pytest.raises(HpcdsError, match=r"missing\.txt does not exist"):
        prepare_files([tmp_path / "missing.txt"], tmp_path / "out")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(HpcdsError, match=r"latin1\.txt is not UTF-8"):
        prepare_files([bad], tmp_path / "out", tokenizer="bytes")
    broken = write_text(tmp_path, "broken.jsonl", '{"text": "ok"}\n{"text": \n')
    with pytest.raises(HpcdsError, match=r"broken\.jsonl:2: not valid JSON"):
        prepare_files([broken], tmp_path / "out", tokenizer="bytes")
    with pytest.raises(HpcdsError, match=r"broken\.jsonl:1: no field 'body' \(keys: text\)"):
        prepare_files([broken], tmp_path / "out", tokenizer="bytes", text_field="body")
    assert not (tmp_path / "out").exists()  # a failed prepare leaves nothing behind
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_output_folder_is_not_overwritten_by_accident(tmp_path):
    path = write_text(tmp_path, "a.txt", TEXT)
    prepare_files([path], tmp_path / "out", tokenizer="bytes")
    with pytest.raises(HpcdsError, match="--overwrite"):
        prepare_files([path], tmp_path / "out", tokenizer="bytes")
    meta = prepare_files([path], tmp_path / "out", tokenizer="cl100k_base", overwrite=True)
    assert json.loads((tmp_path / "out/meta.json").read_text()) == meta


def test_missing_gpt2_files_explain_tiktoken_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(HpcdsError, match="TIKTOKEN_CACHE_DIR") as info:
        get_tokenizer("gpt2")
    assert str(tmp_path / "empty") in str(info.value)
    with pytest.raises(HpcdsError, match="TIKTOKEN_CACHE_DIR"):
        get_tokenizer("r50k_base")


def tiny_rank_file(path: Path) -> Path:
    ranks = [bytes([i]) for i in range(256)] + [b"th", b"the", b" the"]
    lines = [f"{base64.b64encode(token).decode()} {rank}" for rank, token in enumerate(ranks)]
    return write_text(path.parent, path.name, "\n".join(lines) + "\n")


def test_gpt2_is_read_from_tiktoken_cache_dir(tmp_path, monkeypatch):
    # tiktoken names cached files by the SHA-1 of their URL; a (tiny) r50k_base rank file placed there is used.
    name = hashlib.sha1(R50K_URL.encode()).hexdigest()
    tiny_rank_file(tmp_path / "cache" / name)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    enc = get_tokenizer("r50k_base")
    assert enc.name == "gpt2" and enc.vocab_size == 260
    assert enc.decode(enc.encode_batch(["the end"], 1)[0].tolist()) == "the end"


def test_local_rank_file_tokenizer(tmp_path):
    path = tiny_rank_file(tmp_path / "tiny.tiktoken")
    enc = get_tokenizer(str(path))
    assert enc.vocab_size == 260 and enc.eot_id == 259
    ids = enc.encode_batch(["the cat and the dog"], 1)[0].tolist()
    assert 257 in ids and 258 in ids and enc.decode(ids) == "the cat and the dog"


def test_unknown_tokenizer():
    with pytest.raises(HpcdsError, match="unknown tokenizer 'llama'"):
        get_tokenizer("llama")


def two_sources(tmp_path: Path) -> tuple[Path, Path]:
    a = write_text(tmp_path / "ina", "a.txt", "a" * 20000)
    b = write_text(tmp_path / "inb", "b.txt", "b" * 20000)
    prepare_files([a], tmp_path / "A", tokenizer="bytes", val_fraction=0.1)
    prepare_files([b], tmp_path / "B", tokenizer="bytes", val_fraction=0.1)
    return tmp_path / "A", tmp_path / "B"


def test_batches_are_a_pure_function_of_seed_step_micro_rank(tmp_path, builtin_cache):
    data = open_data(DataSpec(train=["builtin:stdlib-docs"], tokenizer="bytes"), 64, 7, builtin_cache)
    x, y = data.train_batch(5, 1, 0, 2, 4)
    again = open_data(DataSpec(train=["builtin:stdlib-docs"], tokenizer="bytes"), 64, 7, builtin_cache)
    x2, y2 = again.train_batch(5, 1, 0, 2, 4)
    assert x.shape == (4, 64) and y.shape == (4, 64) and str(x.dtype) == "torch.int64"
    assert x.equal(x2) and y.equal(y2)
    assert x[:, 1:].equal(y[:, :-1])  # y is x shifted by one
    for other in [(6, 1, 0, 2), (5, 0, 0, 2), (5, 1, 1, 2)]:
        assert not data.train_batch(*other, 4)[0].equal(x), other
    other_seed = open_data(DataSpec(train=["builtin:stdlib-docs"], tokenizer="bytes"), 64, 8, builtin_cache)
    assert not other_seed.train_batch(5, 1, 0, 2, 4)[0].equal(x)
    # A step's rows depend on their global index only: 2 ranks x 4 rows read what 1 rank x 8 rows reads.
    whole = data.train_batch(5, 0, 0, 1, 8)[0]
    assert data.train_batch(5, 0, 1, 2, 4)[0].equal(whole[4:])


def test_mixing_follows_the_weights(tmp_path):
    a, b = two_sources(tmp_path)
    spec = DataSpec(train=[{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}], tokenizer="bytes")
    data = open_data(spec, 16, 1, tmp_path)
    rows = np.concatenate([data.train_batch(step, 0, 0, 1, 50)[0][:, 0].numpy() for step in range(40)])
    share_a = float(np.mean(rows == ord("a")))
    # 2000 draws of p = 0.75: standard deviation 0.0097, so 0.04 is a 4-sigma band.
    assert abs(share_a - 0.75) < 0.04, share_a
    assert data.train_tokens == 2 * round(20001 * 0.9) and data.vocab_size == 256


def test_val_batches_are_fixed_and_cover_every_val_source(tmp_path):
    a, b = two_sources(tmp_path)
    data = open_data(DataSpec(train=[str(a), str(b)], tokenizer="bytes"), 16, 1, tmp_path)
    x, _ = data.val_batch(0, 0, 1, 4)
    assert x.equal(data.val_batch(0, 0, 1, 4)[0])
    assert {row[0] for row in x.tolist()} == {ord("a"), ord("b")}
    no_val = tmp_path / "noval"
    prepare_files([write_text(tmp_path, "c.txt", "c" * 500)], no_val, tokenizer="bytes", val_fraction=0)
    with pytest.raises(HpcdsError, match="no validation tokens"):
        open_data(DataSpec(train=[str(no_val)], tokenizer="bytes"), 16, 1, tmp_path).val_batch(0, 0, 1, 2)
    # A folder listed under data.val is used whole when it has no val split.
    data = open_data(DataSpec(train=[str(a)], val=[str(no_val)], tokenizer="bytes"), 16, 1, tmp_path)
    assert set(data.val_batch(0, 0, 1, 2)[0].flatten().tolist()) == {ord("c")}


def test_open_data_errors(tmp_path):
    a, _ = two_sources(tmp_path)
    with pytest.raises(HpcdsError, match=r"(?s)nowhere does not exist.*hpcds data prepare"):
        open_data(DataSpec(train=[str(tmp_path / "nowhere")]), 16, 1, tmp_path)
    with pytest.raises(HpcdsError, match="fewer than one sequence"):
        open_data(DataSpec(train=[str(a)], tokenizer="bytes"), 100000, 1, tmp_path)
    prepare_files([write_text(tmp_path, "c.txt", "c" * 500)], tmp_path / "C", tokenizer="cl100k_base")
    with pytest.raises(HpcdsError, match="different tokenizers"):
        open_data(DataSpec(train=[str(a), str(tmp_path / "C")]), 16, 1, tmp_path)
    data = open_data(DataSpec(train=[str(tmp_path / "C")]), 4, 1, tmp_path)
    with pytest.raises(HpcdsError, match=r"model\.vocab_size: 100277"):
        data.check_vocab(50257)


def test_builtin_corpus_is_english_text(builtin_cache):
    data = open_data(DataSpec(train=["builtin:stdlib-docs"], tokenizer="bytes"), 256, 0, builtin_cache)
    assert data.train_tokens > 1_000_000 and data.val_tokens > 50_000
    x, _ = data.train_batch(0, 0, 0, 1, 64)
    text = bytes(t for t in x.flatten().tolist() if t).decode("utf-8", errors="replace")
    words = text.lower().split()
    common = sum(w in {"the", "a", "of", "to", "is", "and", "in", "if", "be", "for"} for w in words)
    assert common / len(words) > 0.08, text[:500]
    assert sum(c.isalpha() or c.isspace() for c in text) / len(text) > 0.8
    # Validation windows differ between ranks and batches, and never change.
    val = [data.val_batch(i, rank, 2, 4)[0] for i in (0, 1) for rank in (0, 1)]
    assert all(not val[i].equal(val[j]) for i in range(4) for j in range(i))
    assert val[3].equal(data.val_batch(1, 1, 2, 4)[0])


def test_builtin_corpus_is_the_same_every_time():
    first = list(itertools.islice(builtin.stdlib_documents(), 40))
    again = list(itertools.islice(builtin.stdlib_documents(), 40))
    assert first == again and len(first) == 40


def test_builtin_corpus_prepared_by_racing_processes_once(tmp_path, monkeypatch):
    docs = [(f"doc{i}", f"Document {i} says hello to the world.\n" * 20) for i in range(50)]
    monkeypatch.setitem(builtin.BUILTINS, "tiny", lambda: iter(docs))
    folders, errors = [], []

    def prepare():
        try:
            folders.append(builtin.prepare_builtin("tiny", "bytes", tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(folders)) == 1
    assert [p.name for p in (tmp_path / "builtin").iterdir()] == [folders[0].name]  # no temp folders left
    meta = json.loads((folders[0] / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == sum(len(t) + 1 for _, t in docs)


def test_cli_prepare_and_info(tmp_path, capsys):
    path = write_text(tmp_path, "a.txt", TEXT * 50)
    main(["data", "prepare", str(path), "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--json"])
    meta = json.loads(capsys.readouterr().out)
    assert meta["tokenizer"] == "bytes" and meta["train_tokens"] + meta["val_tokens"] == len(TEXT) * 50 + 1
    main(["data", "info", str(tmp_path / "out"), "--sample", "20"])
    out = capsys.readouterr().out
    assert "The quick brown fox" in out and "uint16" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 1
    assert "nope.txt does not exist" in capsys.readouterr().err


def test_data_prepare_does_not_import_torch(tmp_path):
    path = write_text(tmp_path, "a.txt", TEXT)
    probe = (
        "import sys\nfrom hpcds.cli import main\n"
        f"main(['data', 'prepare', {str(path)!r}, '--out', {str(tmp_path / 'out')!r}, '--json'])\n"
        "print('TORCH' if 'torch' in sys.modules else 'LIGHT')"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("LIGHT")
