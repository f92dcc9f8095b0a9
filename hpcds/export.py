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

Only checkpoints with a COMMITTED marker whose files all match the manifest (sizes and CRC-32) are exported. The top
of this module is pure (which step, which files); `export_run` does the I/O.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcds import facts, runs
from hpcds.errors import HpcdsError

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
# Pure: which checkpoint


@dataclass(frozen=True)
class Candidate:
    """One committed checkpoint as the export sees it: step, manifest, and the trainer's best step at that time."""

    step: int
    final: bool = False
    best_step: int | None = None


def choose_step(selector: str | None, candidates: list[Candidate], pointer_step: int | None) -> int:
    """The step `--step` names among committed checkpoints: a number, `best`, `final`, or (None) the latest.

    `best` is the best evaluation step recorded by the newest checkpoint (retention always keeps that one).
    """
    steps = sorted(c.step for c in candidates)
    if not steps:
        raise HpcdsError("the run has no committed checkpoint yet\nhint: train until the first checkpoint is saved")
    listed = ", ".join(map(str, steps))
    if selector is None or selector == "latest":
        return pointer_step if pointer_step in steps else steps[-1]
    if selector == "final":
        finals = [c.step for c in candidates if c.final]
        if not finals:
            raise HpcdsError(
                f"the run has no final checkpoint (it has not finished); committed steps: {listed}"
                "\nhint: --step latest, or --step N"
            )
        return max(finals)
    if selector == "best":
        newest = max(candidates, key=lambda c: c.step)
        if newest.best_step is None:
            raise HpcdsError(
                "the run recorded no evaluation, so there is no best step"
                "\nhint: set training.eval_interval_steps, or export --step latest / final / N"
            )
        if newest.best_step not in steps:
            raise HpcdsError(f"the best step {newest.best_step} has no committed checkpoint; committed: {listed}")
        return newest.best_step
    try:
        step = int(selector)
    except ValueError:
        raise HpcdsError(f"--step {selector!r}: expected a step number, best, final or latest") from None
    if step not in steps:
        raise HpcdsError(f"no committed checkpoint at step {step}; committed steps: {listed}")
    return step


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


def read_manifest(folder: Path) -> Any:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def committed_candidates(ckpt_dir: Path) -> tuple[list[Candidate], list[tuple[str, list[str]]]]:
    """Checkpoints whose marker, manifest and file sizes check out (cheap), and the others with their problems."""
    from hpcds.train import checkpoint as ck

    good, bad = [], []
    for tag in ck.list_tags(ckpt_dir):
        folder = ckpt_dir / tag
        manifest = read_manifest(folder)
        problems = ck.check_listing(manifest, (folder / ck.COMMITTED).is_file(), ck.sizes_under(folder))
        if problems:
            bad.append((tag, problems))
        else:
            good.append(Candidate(step=ck.step_of(tag), final=bool(manifest.get("final"))))
    return good, bad


def checksum_problems(folder: Path) -> list[str]:
    """Files whose CRC-32 differs from the manifest's: reads the whole checkpoint, so only the one being exported."""
    from hpcds.train import checkpoint as ck

    manifest = read_manifest(folder)
    return ck.check_checksums(manifest, {rel: ck.crc32_file(folder / rel) for rel in manifest["files"]})


def _best_step(folder: Path) -> int | None:
    import torch

    from hpcds.train import checkpoint as ck

    saved = torch.load(folder / ck.rank_state_name(0), map_location="cpu", weights_only=False)
    return saved.get("trainer", {}).get("best_step")


def consolidate(ckpt_dir: Path, tag: str, zero_stage: int, *, exclude_frozen: bool = False) -> dict[str, Any]:
    """fp32 weights of one checkpoint, by DeepSpeed's zero_to_fp32 (stages 1-3) or the stage-0 model file."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # a login node has no GPU; spare DeepSpeed's guessing
    import torch

    if zero_stage == 0:  # no partitioning: the model file holds every weight (exclude_frozen needs no help here)
        states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # zero_to_fp32 reports progress with print()
        return get_fp32_state_dict_from_zero_checkpoint(
            str(ckpt_dir), tag=tag, exclude_frozen_parameters=exclude_frozen
        )


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
    from hpcds.train import checkpoint as ck

    if fmt not in FORMATS:
        raise HpcdsError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    spec = load_spec(run_dir / facts.SPEC_FILE)
    if fmt == "lora" and spec.model.lora is None:
        raise HpcdsError(
            f"{run_dir.name} trained all weights (no model.lora): there is no adapter to export"
            "\nhint: --format hf or --format safetensors"
        )
    ckpt_dir = Path(spec.checkpoint.dir) if spec.checkpoint.dir else run_dir / facts.CHECKPOINT_DIR
    candidates, broken = committed_candidates(ckpt_dir)
    if step == "best" and candidates:
        newest = max(candidates, key=lambda c: c.step)
        candidates = [
            Candidate(c.step, c.final, _best_step(ckpt_dir / ck.tag_for(c.step))) if c is newest else c
            for c in candidates
        ]
    pointer = runs.read_json(ckpt_dir / ck.POINTER, {}) or {}
    while True:
        notes = [f"skipped {tag}: {'; '.join(problems)}" for tag, problems in broken]
        try:
            chosen = choose_step(step, candidates, pointer.get("step"))
        except HpcdsError as exc:
            raise HpcdsError("\n".join([str(exc), *notes])) from None
        tag = ck.tag_for(chosen)
        problems = checksum_problems(ckpt_dir / tag)
        if not problems:
            break
        if step not in (None, "latest"):  # an explicit choice is never swapped for another checkpoint
            raise HpcdsError(f"{ckpt_dir / tag} is damaged: {'; '.join(problems)}\nhint: export another --step")
        broken.append((tag, problems))
        candidates = [c for c in candidates if c.step != chosen]
    manifest = read_manifest(ckpt_dir / tag)
    zero_stage = manifest.get("zero_stage", spec.deepspeed.zero_stage)
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
