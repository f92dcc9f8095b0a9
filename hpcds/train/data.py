"""The training data reader: token memmaps from `hpcds data prepare` (or built-in corpora), mixed by weight, read as
batches that are a pure function of (seed, step, micro-batch, rank, world size).

Row r of a step (r = (micro * world + rank) * batch_size + b) draws its own generator from (seed, step, r): it picks
a source by weight, then a random window of seq_len + 1 tokens. Nothing depends on what was read before, so a
resumed run reads exactly the batches an uninterrupted run would; and since the rows of a step depend only on their
global index, a run resumed on another number of ranks with the same global batch reads the same sequences. SFT
sources (with a loss mask) start each window at a document start, so a response is never read without its prompt;
packed, the window runs on into the following examples, unpacked (`data.packing: false`) it stops at the example's
end and the rest is padding that is never a target.
Validation batches are fixed, contiguous windows.

Built-in corpora are prepared into `cache_dir` by `prepare_data`, which the trainer calls on rank 0 before a
barrier; `open_data` prepares a missing one too, which is safe if ranks race (each builds a private folder and the
first rename wins), only slower.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hpcds.data.builtin import prepare_builtin
from hpcds.data.pieces import check_meta, tokenizer_label
from hpcds.errors import HpcdsError

BUILTIN_PREFIX = "builtin:"
IGNORE_INDEX = -100
DATA_STREAM = 0x64617461  # "data": keeps these draws apart from any other use of the same seed


@dataclass
class Stream:
    """One split of one prepared folder, opened as memmaps (empty splits have no memmap)."""

    label: str
    tokens: np.ndarray | None
    mask: np.ndarray | None
    doc_starts: np.ndarray
    eot_id: int

    @property
    def n_tokens(self) -> int:
        return 0 if self.tokens is None else len(self.tokens)

    def window(self, start: int, length: int, packed: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, start + length) as int64 and whether each is a target; short windows are padded.

        Unpacked (SFT sources only), the window stops where the next document starts and the rest is padding.
        """
        stop = start + length
        if not packed and self.mask is not None:
            following = int(np.searchsorted(self.doc_starts, start, side="right"))
            if following < len(self.doc_starts):
                stop = min(stop, int(self.doc_starts[following]))
        tokens = np.asarray(self.tokens[start:stop], dtype=np.int64)
        targets = np.ones(len(tokens), dtype=bool) if self.mask is None else self.mask[start:stop].astype(bool)
        if len(tokens) < length:  # past the end (or the example's end): pad with end-of-text that is never a target
            pad = length - len(tokens)
            tokens = np.concatenate([tokens, np.full(pad, self.eot_id, dtype=np.int64)])
            targets = np.concatenate([targets, np.zeros(pad, dtype=bool)])
        return tokens, targets


def source_folder(path: str, tokenizer: str, cache_dir: Path) -> Path:
    if path.startswith(BUILTIN_PREFIX):
        return prepare_builtin(path[len(BUILTIN_PREFIX) :], tokenizer, cache_dir)
    return Path(path)


def prepare_data(data, cache_dir: Path) -> list[Path]:
    """Build every `builtin:` corpus the spec names (call on rank 0, then barrier); return all source folders."""
    return [source_folder(ds.path, data.tokenizer, Path(cache_dir)) for ds in [*data.train, *data.val]]


def read_meta(folder: Path) -> dict:
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        hint = "prepare it with `hpcds data prepare INPUT... --out DIR`, or name a builtin:stdlib-docs corpus"
        missing = "does not exist" if not folder.exists() else "has no meta.json (not prepared, or still being written)"
        raise HpcdsError(f"data source {folder} {missing}\nhint: {hint}")
    try:
        return check_meta(json.loads(meta_path.read_text()), str(folder))
    except json.JSONDecodeError as exc:
        raise HpcdsError(f"{meta_path} is not valid JSON: {exc.msg}") from None


def open_stream(folder: Path, split: str, meta: dict, label: str) -> Stream:
    count = meta[f"{split}_tokens"]
    tokens = mask = None
    if count:
        # An empty file cannot be memory-mapped, hence the count check.
        tokens = np.memmap(folder / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(count,))
        if meta["has_mask"]:
            mask = np.memmap(folder / f"{split}.mask.bin", dtype=np.uint8, mode="r", shape=(count,))
    idx_path = folder / f"{split}.idx.bin"
    doc_starts = np.fromfile(idx_path, dtype=np.uint64) if idx_path.is_file() else np.zeros(1, np.uint64)
    return Stream(f"{label} ({split})", tokens, mask, doc_starts, int(meta["eot_id"]))


class TrainData:
    """Weighted training sources and validation sources, read as (x, y) int64 tensors of [batch, seq_len]."""

    def __init__(
        self,
        train: list[Stream],
        weights: list[float],
        val: list[Stream],
        meta: dict,
        seq_len: int,
        seed: int,
        packed: bool = True,
    ):
        self.train, self.val, self.seq_len, self.seed, self.packed = train, val, seq_len, seed, packed
        self.cum_weights = np.cumsum(np.asarray(weights, dtype=np.float64) / sum(weights))
        self.vocab_size = int(meta["vocab_size"])
        self.tokenizer = meta["tokenizer"]
        self.eot_id = int(meta["eot_id"])
        self.train_tokens = sum(s.n_tokens for s in train)
        self.val_tokens = sum(s.n_tokens for s in val)

    def train_batch(self, step: int, micro: int, rank: int, world: int, batch_size: int):
        rows = []
        for b in range(batch_size):
            row = (micro * world + rank) * batch_size + b
            rng = np.random.default_rng([DATA_STREAM, self.seed, step, row])
            pick = int(np.searchsorted(self.cum_weights, rng.random(), side="right"))
            source = self.train[min(pick, len(self.train) - 1)]  # min: rounding can leave the last sum below 1
            rows.append(source.window(self._train_start(source, rng), self.seq_len + 1, self.packed))
        return _as_tensors(rows)

    def _train_start(self, source: Stream, rng: np.random.Generator) -> int:
        if source.mask is not None:
            return int(source.doc_starts[rng.integers(len(source.doc_starts))])
        return int(rng.integers(source.n_tokens - self.seq_len))

    def val_batch(self, i: int, rank: int, world: int, batch_size: int):
        if not self.val:
            raise HpcdsError(
                "no validation tokens: the val splits are empty or shorter than one sequence, and data.val is empty"
                "\nhint: prepare with --val-fraction > 0, list sources under data.val, or set "
                "training.eval_interval_steps: 0"
            )
        rows = []
        for b in range(batch_size):
            row = (i * world + rank) * batch_size + b
            source = self.val[row % len(self.val)]
            window = row // len(self.val)
            if source.mask is not None:
                start = int(source.doc_starts[window % len(source.doc_starts)])
            else:
                start = (window * self.seq_len) % max(1, source.n_tokens - self.seq_len)
            rows.append(source.window(start, self.seq_len + 1, self.packed))
        return _as_tensors(rows)

    def check_vocab(self, model_vocab_size: int) -> None:
        """The model's embedding must cover every token id of the data."""
        if model_vocab_size < self.vocab_size:
            raise HpcdsError(
                f"model.vocab_size {model_vocab_size} is smaller than the data's vocabulary "
                f"({self.tokenizer}: {self.vocab_size} ids)\nhint: set model.vocab_size: {self.vocab_size}"
            )


def _as_tensors(rows: list[tuple[np.ndarray, np.ndarray]]):
    import torch

    tokens = np.stack([t for t, _ in rows])
    targets = np.stack([m for _, m in rows])
    x = tokens[:, :-1]
    y = np.where(targets[:, 1:], tokens[:, 1:], IGNORE_INDEX)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def open_data(data, seq_len: int, seed: int, cache_dir: Path) -> TrainData:
    """Open the spec's `data` section: train sources with weights, val sources (or each train source's val split)."""
    if not data.train:
        raise HpcdsError("data.train is empty\nhint: e.g. data: {train: [builtin:stdlib-docs]} or a prepared folder")
    metas: dict[str, dict] = {}
    folders: dict[str, Path] = {}
    for ds in [*data.train, *data.val]:
        if ds.path not in folders:
            folders[ds.path] = source_folder(ds.path, data.tokenizer, Path(cache_dir))
            metas[ds.path] = read_meta(folders[ds.path])
    tokenizers = {metas[p]["tokenizer"] for p in metas}
    if len(tokenizers) > 1:
        listing = ", ".join(f"{p}: {tokenizer_label(metas[p])}" for p in metas)
        raise HpcdsError(
            f"data sources use different tokenizers ({listing}); their ids cannot be mixed"
            "\nhint: prepare every source with the same --tokenizer (builtin corpora use data.tokenizer)"
        )
    train = []
    for ds in data.train:
        stream = open_stream(folders[ds.path], "train", metas[ds.path], ds.path)
        needed = seq_len + 1 if stream.mask is None else 1
        if stream.n_tokens < needed:
            raise HpcdsError(
                f"data source {ds.path} has {stream.n_tokens} training tokens, fewer than one sequence "
                f"({seq_len + 1})\nhint: add data, or lower model.max_seq_len"
            )
        train.append(stream)
    val = []
    for ds in data.val or data.train:
        meta = metas[ds.path]
        # A folder listed under data.val is validation data as a whole: its val split, else its train split.
        split = "val" if meta["val_tokens"] or not data.val else "train"
        stream = open_stream(folders[ds.path], split, meta, ds.path)
        if stream.n_tokens > (seq_len if stream.mask is None else 0):
            val.append(stream)
    meta = max(metas.values(), key=lambda m: m["vocab_size"])
    return TrainData(train, [ds.weight for ds in data.train], val, meta, seq_len, seed, data.packing)
