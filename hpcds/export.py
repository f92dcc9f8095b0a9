"""`hpcds export`: a run's verified checkpoint -> plain weights, on any machine, without GPUs or a process group.

ZeRO shards are consolidated by DeepSpeed's own `zero_to_fp32` (the fp32 master weights; stage 0 keeps whole weights
in `mp_rank_00_model_states.pt`). Formats:

- `safetensors`: the consolidated state dict as one `model.safetensors`, keys exactly as trained (peft's names for a
  LoRA run), with tied weights stored once;
- `hf`: a folder `AutoModelForCausalLM.from_pretrained` loads (config, weights, generation config, and the source
  folder's tokenizer files when it had any); LoRA adapters are merged into the base weights; Mamba runs become
  transformers' Mamba / Mamba-2 format;
- `lora`: the adapter alone (`adapter_config.json` + `adapter_model.safetensors`, peft's `save_pretrained` layout),
  consolidated with `exclude_frozen_parameters` so the base weights are never read.

Only checkpoints with a COMMITTED marker whose files all match the manifest (sizes and CRC-32) are exported; the
choice of checkpoint and the consolidation live in hpcds.train.weights (`model.init_from` uses them too). The top of
this module is pure (which files); `export_run` does the I/O.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcds import facts
from hpcds.errors import HpcdsError
from hpcds.train.weights import (  # noqa: F401  (Candidate, choose_step: the export's step choice, tested through here)
    Candidate,
    choose_checkpoint,
    choose_step,
    consolidate,
)

FORMATS = ("safetensors", "hf", "lora")
DTYPES = ("fp32", "bf16", "fp16")
# Tokenizer files a Hugging Face model folder may carry; copied into an `hf` export so the folder stands alone.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


# ---------------------------------------------------------------------------------------------------------------------
# Pure: tied weights


def dedupe_shared(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors that share storage (tied embeddings) kept once: safetensors refuses aliases. Returns (state, aliases)."""
    kept: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = tensor.contiguous()
    return kept, aliases


# ---------------------------------------------------------------------------------------------------------------------
# I/O


@dataclass
class Exported:
    out_dir: Path
    step: int
    fmt: str
    files: list[str]
    notes: list[str] = field(default_factory=list)


def skeleton(model_spec):
    """The trained module's structure with no storage (meta device): filled by `load_state_dict(assign=True)`."""
    import torch
    from transformers import AutoModelForCausalLM

    from hpcds.train import models

    if model_spec.type == "hf":
        config = models._local_config(model_spec.path)  # a clear error when the folder is gone
        models._no_dropout(config)  # as the trainer built it
    else:
        config = models.model_config(model_spec)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
        if model_spec.lora is not None:
            net = models._with_lora(net, model_spec.lora)
    return net


def fill(net, state: dict[str, Any], *, partial: bool = False):
    """Load `state` into a meta skeleton; every parameter must come from it (tied ones by tying) unless `partial`."""
    _, unexpected = net.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise HpcdsError(
            f"the checkpoint has weights the model does not: {', '.join(unexpected[:5])}"
            "\nhint: the run's spec.yaml must describe the model that wrote the checkpoint"
        )
    tie = getattr(net, "tie_weights", None) or getattr(net.get_base_model(), "tie_weights", None)
    if tie is not None:
        tie()
    if not partial:
        empty = [n for n, p in net.named_parameters() if p.is_meta]
        if empty:
            raise HpcdsError(f"the checkpoint lacks weights for {', '.join(empty[:5])} ({len(empty)} in all)")
    return net


def _cast(state: dict[str, Any], dtype: str) -> dict[str, Any]:
    import torch

    target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def export_run(
    run_dir: Path, *, fmt: str, step: str | None = None, out_dir: Path | None = None, dtype: str = "fp32"
) -> Exported:
    """Export one verified checkpoint of `run_dir` in `fmt` to `out_dir` (default `<run dir>/export/<tag>-<fmt>`)."""
    from hpcds.spec import load_spec

    if fmt not in FORMATS:
        raise HpcdsError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    spec = load_spec(run_dir / facts.SPEC_FILE)
    if fmt == "lora" and spec.model.lora is None:
        raise HpcdsError(
            f"{run_dir.name} trained all weights (no model.lora): there is no adapter to export"
            "\nhint: --format hf or --format safetensors"
        )
    chosen, notes, ckpt_dir, tag, zero_stage = choose_checkpoint(run_dir, spec, step)
    out_dir = Path(out_dir) if out_dir else run_dir / "export" / f"{tag}-{fmt}"
    if out_dir.exists() and any(out_dir.iterdir()):
        raise HpcdsError(f"{out_dir} exists and is not empty\nhint: remove it, or pass another --out")
    out_dir.mkdir(parents=True, exist_ok=True)

    state = consolidate(ckpt_dir, tag, zero_stage, exclude_frozen=fmt == "lora")
    if fmt == "safetensors":
        _write_safetensors(state, dtype, out_dir, {"step": str(chosen), "zero_stage": str(zero_stage)})
    elif fmt == "lora":
        net = fill(skeleton(spec.model), state, partial=True)
        net.save_pretrained(str(out_dir), safe_serialization=True)
        if spec.model.type == "hf" and not _has_weights(Path(spec.model.path)):
            notes.append(
                f"the base folder {spec.model.path} has no weights (the run started from a random init): this "
                "adapter needs that exact base; export --format hf for a model that stands alone"
            )
    else:
        net = fill(skeleton(spec.model), state)
        if spec.model.lora is not None:
            net = net.merge_and_unload()
        _write_hf(net, spec.model, dtype, out_dir)
    return Exported(out_dir=out_dir, step=chosen, fmt=fmt, files=sorted(p.name for p in out_dir.iterdir()), notes=notes)


def _has_weights(folder: Path) -> bool:
    return any(next(folder.glob(pattern), None) for pattern in ("*.safetensors", "*.bin", "*.pt"))


def _write_safetensors(state: dict[str, Any], dtype: str, out_dir: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    kept, aliases = dedupe_shared(_cast(state, dtype))
    save_file(kept, str(out_dir / "model.safetensors"), metadata={**metadata, "format": "pt"})
    if aliases:
        (out_dir / "tied_weights.json").write_text(json.dumps(aliases, indent=1, sort_keys=True) + "\n")


def _write_hf(net, model_spec, dtype: str, out_dir: Path) -> None:
    import torch

    target = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    # Non-persistent buffers (rotary tables) stay on the meta device in a skeleton; they are rebuilt on load.
    net = net.to(target) if dtype != "fp32" else net
    config = net.config
    config.dtype = target
    if getattr(config, "use_mambapy", None):
        config.use_mambapy = False  # a CPU-speed choice of this trainer, not part of the model
    net.save_pretrained(str(out_dir), safe_serialization=True)
    if model_spec.type == "hf":
        source = Path(model_spec.path)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out_dir / name)
