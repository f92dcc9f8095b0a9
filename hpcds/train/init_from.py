"""`model.init_from`: a new run starts from another run's weights (or a folder `hpcds export` wrote).

Weights only: the optimizer state is new, the step is 0 and the W&B run is the new run's own. The source checkpoint
is consolidated to fp32 by DeepSpeed's `zero_to_fp32` (as `hpcds export` does), so any ZeRO stage and world size
can feed any other. Every weight of the new model must come from the source with its shape (LoRA adapters excepted:
they start fresh on the loaded base). After the engine is built the new run recomputes the source checkpoint's probe
loss (hpcds.train.loss) where the two runs' probe batches are the same, and stops when the loaded weights do not
give it. The parsing and matching at the top are pure; the rest does the I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcds import facts, runs
from hpcds.errors import HpcdsError
from hpcds.train.loss import CONVERTED_RTOL

# Checkpoint selectors `model.init_from: RUN:<selector>` takes (or a step number).
INIT_SELECTORS = ("best", "final", "latest")
# peft's names around the wrapped model's own: `base_model.model.<name>`, `<module>.base_layer.weight`.
_PEFT_PREFIX = "base_model.model."
_PEFT_BASE = ".base_layer."


def split_source(value: str) -> tuple[str, str | None]:
    """`RUN:best` -> ("RUN", "best"); a tail that is no selector stays part of the name (a folder may hold ':')."""
    head, sep, tail = value.rpartition(":")
    if sep and (tail in INIT_SELECTORS or tail.isdigit()):
        return head, tail
    return value, None


def is_export_folder(folder: Path) -> bool:
    """A folder `hpcds export` wrote (safetensors or hf): weights in *.safetensors, no run directory."""
    return folder.is_dir() and not (folder / facts.META_FILE).is_file() and any(folder.glob("*.safetensors"))


def source_key(param_name: str) -> str | None:
    """The source's key for a parameter of the new model; None for a LoRA adapter's own weights (they start fresh)."""
    if ".lora_" in param_name:
        return None
    return param_name.removeprefix(_PEFT_PREFIX).replace(_PEFT_BASE, ".")


def match_problems(wanted: dict[str, tuple[int, ...]], available: dict[str, tuple[int, ...]]) -> list[str]:
    """What keeps a source from filling every wanted weight (source key -> shape): missing keys, other shapes."""
    missing = [k for k in wanted if k not in available]
    shapes = [
        f"{k} {available[k]} (the model has {wanted[k]})"
        for k in wanted
        if k in available and available[k] != wanted[k]
    ]
    problems = []
    if missing:
        problems.append(f"the source lacks {len(missing)} weights, e.g. {', '.join(missing[:3])}")
    if shapes:
        problems.append(f"{len(shapes)} weights have other shapes, e.g. {'; '.join(shapes[:3])}")
    return problems


@dataclass
class Source:
    """Where the weights came from, as the event log and the probe check need it."""

    value: str
    folder: Path
    tag: str | None = None
    step: int | None = None
    zero_stage: int | None = None
    probe: dict[str, Any] | None = None
    spec: Any = None
    notes: list[str] = field(default_factory=list)
    ckpt_dir: Path | None = None

    def facts(self) -> dict[str, Any]:
        return {
            "source": self.value,
            "source_run": self.folder.name,
            "tag": self.tag,
            "step": self.step,
            "zero_stage": self.zero_stage,
        }


def resolve(value: str) -> Source:
    """The verified checkpoint (or export folder) `value` names; the choice of `best` reads the newest checkpoint."""
    from hpcds.spec import load_spec
    from hpcds.train.weights import choose_checkpoint

    name, selector = split_source(value)
    folder = Path(name)
    if is_export_folder(folder):
        return Source(value=value, folder=folder)
    if not (folder / facts.META_FILE).is_file():
        raise HpcdsError(f"model.init_from: {name} is neither a run directory nor a folder written by hpcds export")
    spec = load_spec(folder / facts.SPEC_FILE)
    if spec.model.lora is not None:
        raise HpcdsError(
            f"model.init_from: {folder.name} trained LoRA adapters; start from its merged weights instead"
            f"\nhint: hpcds export {folder.name} --format hf, then model.init_from: <that folder>"
        )
    step, notes, ckpt_dir, tag, zero_stage = choose_checkpoint(folder, spec, selector or "final")
    import torch

    from hpcds.train.checkpoint import rank_state_name

    saved = torch.load(ckpt_dir / tag / rank_state_name(0), map_location="cpu", weights_only=False)
    probe = saved.get("trainer", {}).get("probe")
    return Source(value, folder, tag, step, zero_stage, probe, spec, notes, ckpt_dir)


def load_state(source: Source) -> dict[str, Any]:
    """fp32 weights of the source by name, as trained."""
    if source.tag is None:
        from safetensors.torch import load_file

        state: dict[str, Any] = {}
        for path in sorted(source.folder.glob("*.safetensors")):
            state.update(load_file(str(path)))
        return {k: v.float() for k, v in state.items()}
    from hpcds.train.weights import consolidate

    return consolidate(source.ckpt_dir, source.tag, source.zero_stage)


def initialise(model, spec, *, rank: int, run_dir: Path) -> Source:
    """Copy the source's weights into `model` (built, not yet in DeepSpeed's engine) on every rank; under ZeRO-3
    (parameters partitioned by zero.Init) rank 0 reads them and DeepSpeed scatters them from there."""
    import torch

    started = time.time()
    source = resolve(spec.model.init_from)
    zero3 = spec.deepspeed.zero_stage == 3
    params = dict(model.named_parameters())
    wanted = {name: source_key(name) for name in params}
    shapes = {key: tuple(getattr(params[n], "ds_shape", params[n].shape)) for n, key in wanted.items() if key}
    state = load_state(source) if rank == 0 or not zero3 else {}
    problems = match_problems(shapes, {k: tuple(v.shape) for k, v in state.items()}) if state else []
    if zero3:  # only rank 0 read the source: every rank must learn its verdict, or they would wait in the gather
        import torch.distributed as dist

        shared = [problems]
        dist.broadcast_object_list(shared, src=0)
        problems = shared[0]
    if problems:
        raise HpcdsError(
            f"model.init_from: {source.value} does not fit this model: {'; '.join(problems)}"
            "\nhint: the new run's model section must describe the source's shape (LoRA adapters and model.path aside)"
        )
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
            if rank == 0:
                for name, key in wanted.items():
                    if key:
                        params[name].copy_(state[key])
    else:
        with torch.no_grad():
            for name, key in wanted.items():
                if key:
                    params[name].copy_(state[key])
    if rank == 0:
        loaded = sum(1 for key in wanted.values() if key)
        runs.append_event(
            run_dir, "init_from", **source.facts(), weights=loaded, seconds=round(time.time() - started, 3)
        )
        print(f"initialised from {source.value} ({loaded} weights)", flush=True)
    return source


def probe_comparable(source: Source, spec, micro_batch: int) -> bool:
    """Whether the new run's probe batch is the source checkpoint's: same data, sequence, seed, sequences, precision."""
    if source.probe is None or source.spec is None:
        return False
    old = source.spec
    return (
        old.data == spec.data
        and old.model.max_seq_len == spec.model.max_seq_len
        and old.training.seed == spec.training.seed
        and old.training.precision == spec.training.precision
        and int(source.probe.get("sequences", -1)) == micro_batch
    )


def check_probe(trainer, source: Source) -> None:
    """Before the first step: the loaded weights must give the source checkpoint's probe loss (where comparable)."""
    s = trainer.settings
    measured = trainer.probe_loss()
    comparable = probe_comparable(source, s.spec, s.micro_batch)
    saved = float(source.probe["loss"]) if comparable else None
    ok = saved is None or abs(measured - saved) <= CONVERTED_RTOL * max(1.0, abs(saved))
    if s.rank == 0:
        runs.append_event(s.run_dir, "init_probe", **source.facts(), loss=measured, saved_loss=saved, ok=ok)
    if not ok:
        raise HpcdsError(
            f"model.init_from: the loaded weights give loss {measured:.6f} on the probe batch, the source checkpoint "
            f"{source.tag} of {source.folder.name} was saved with {saved:.6f}: the weights did not load as saved"
        )
