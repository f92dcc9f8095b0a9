"""`hpcds data prepare` (tokenize text or JSONL into memmaps) and `hpcds data info` (what a prepared folder holds).

Neither imports torch: preparing data is numpy, tiktoken and `tokenizers` work that may run on a login or data node.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich import box
from rich.markup import escape
from rich.table import Table

from hpcds.cli import COMMAND_SETTINGS
from hpcds.cli.common import console, err_console, print_json
from hpcds.errors import HpcdsError


@click.group("data", context_settings=COMMAND_SETTINGS)
def data_group() -> None:
    """Prepare training data: tokenized memmaps that `data.train` in a spec points at."""


@data_group.command("prepare", context_settings=COMMAND_SETTINGS)
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option(
    "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder."
)
@click.option(
    "--tokenizer",
    default="cl100k_base",
    show_default=True,
    help="bytes, cl100k_base (offline), gpt2 (files in TIKTOKEN_CACHE_DIR), a .tiktoken file, or hf:FOLDER "
    "(a local Hugging Face tokenizer: tokenizer.json, tokenizer_config.json).",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.01,
    show_default=True,
    help="Share of the input held out for validation, spread evenly through it.",
)
@click.option("--text-field", help="JSONL: the field holding the text [default: text].")
@click.option("--prompt-field", help="JSONL SFT: the prompt field (read, never trained on).")
@click.option("--response-field", help="JSONL SFT: the response field (the loss is computed on it only).")
@click.option(
    "--messages-field",
    help="JSONL chat SFT: the field holding a list of {role, content} messages, rendered with an hf: tokenizer's "
    "chat template; the loss is computed on the assistant turns only.",
)
@click.option("--threads", type=click.IntRange(min=1), help="Tokenizer worker processes [default: all cores].")
@click.option("--overwrite", is_flag=True, help="Replace an output folder that already holds files.")
@click.option("--json", "as_json", is_flag=True, help="Print meta.json instead of a table.")
def prepare_command(
    inputs,
    out_dir,
    tokenizer,
    val_fraction,
    text_field,
    prompt_field,
    response_field,
    messages_field,
    threads,
    overwrite,
    as_json,
) -> None:
    """Tokenize INPUT files (text; .jsonl/.ndjson as JSON lines; folders recursively) into OUT.

    Writes train.bin / val.bin (token ids, uint16 or uint32 by vocabulary size), document indexes, for SFT data
    train.mask.bin / val.mask.bin (1 = loss on this token), and meta.json. Works offline.
    """
    from hpcds.data.prepare import prepare_files

    with err_console.status("tokenizing ...") as status:
        start_s = time.monotonic()

        def progress(tokens: int) -> None:
            elapsed_s = max(time.monotonic() - start_s, 1e-9)
            status.update(f"tokenizing: {tokens:,} tokens, {tokens / elapsed_s:,.0f} tokens/s")

        meta = prepare_files(
            inputs,
            out_dir,
            tokenizer=tokenizer,
            val_fraction=val_fraction,
            text_field=text_field,
            prompt_field=prompt_field,
            response_field=response_field,
            messages_field=messages_field,
            num_threads=threads,
            overwrite=overwrite,
            progress=progress,
        )
    if as_json:
        print_json(meta)
        return
    console.print(render_meta_table(out_dir, meta))
    console.print(meta_summary(meta))
    spec_line = f"data: {{train: {out_dir}, tokenizer: {loadable_name(meta)}}}"
    console.print(f"use it in a spec as:  {escape(spec_line)}")


@data_group.command("info", context_settings=COMMAND_SETTINGS)
@click.argument("folder", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--sample", "sample_tokens", type=click.IntRange(min=0), default=200, show_default=True,
              help="Decode this many tokens from the start of train.bin.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print meta.json.")
def info_command(folder: Path, sample_tokens: int, as_json: bool) -> None:
    """Show what a prepared data FOLDER holds, and a decoded sample of its tokens."""
    import numpy as np

    from hpcds.data.tokenizers import get_tokenizer
    from hpcds.train.data import read_meta

    meta = read_meta(folder)
    if as_json:
        print_json(meta)
        return
    console.print(render_meta_table(folder, meta))
    console.print(meta_summary(meta))
    count = min(sample_tokens, meta["train_tokens"])
    if count:
        ids = np.fromfile(folder / "train.bin", dtype=meta["dtype"], count=count).tolist()
        try:
            text = get_tokenizer(loadable_name(meta)).decode(ids)
        except HpcdsError as exc:  # e.g. the hf: folder it was prepared with is gone: the counts above still stand
            console.print(f"no decoded sample: {escape(str(exc).splitlines()[0])}")
            return
        console.print(f"first {count} tokens, decoded:\n{escape(text)}")


def loadable_name(meta: dict) -> str:
    """What loads the folder's tokenizer: for hf: ones the folder it came from, not the vocabulary's fingerprint."""
    if meta["tokenizer"].startswith("hf:"):
        return meta.get("tokenizer_source", meta["tokenizer"])
    return meta["tokenizer"]


def render_meta_table(folder: Path, meta: dict) -> Table:
    table = Table(title=escape(str(folder)), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("", no_wrap=True)
    table.add_column("train", justify="right")
    table.add_column("val", justify="right")
    table.add_row("tokens", f"{meta['train_tokens']:,}", f"{meta['val_tokens']:,}")
    table.add_row("documents", f"{meta.get('train_documents', 0):,}", f"{meta.get('val_documents', 0):,}")
    return table


def meta_summary(meta: dict) -> str:
    from hpcds.data.pieces import tokenizer_label

    lines = [
        f"{tokenizer_label(meta)}: vocabulary {meta['vocab_size']:,}, end-of-text {meta['eot_id']}, "
        f"{meta['dtype']} ids" + ("; loss mask (SFT)" if meta["has_mask"] else "")
    ]
    if meta.get("prepare_time_s"):
        total = meta["train_tokens"] + meta["val_tokens"]
        lines.append(f"prepared in {meta['prepare_time_s']:.1f} s: {total / meta['prepare_time_s']:,.0f} tokens/s")
    return "\n".join(lines)


COMMANDS = [data_group]
