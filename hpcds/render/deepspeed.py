"""The DeepSpeed JSON config of a run: a pure function of a spec whose ZeRO stage is pinned. No I/O here.

The communication buckets come from the planner (`hpcds.plan.memory.zero_buckets`), so the memory it plans is the
memory the config asks for. The user's own `deepspeed.config` is merged last and wins, except that its `"auto"` values
take hpcds's (hpcds.spec.ds_config); by then its settings that the spec also holds equal the spec's.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from hpcds.errors import HpcdsError, Problem, SpecError
from hpcds.plan.memory import zero_buckets
from hpcds.spec.ds_config import AUTO, resolve_auto

if TYPE_CHECKING:
    from hpcds.spec import JobSpec

# DeepSpeed prints its own step log every `steps_per_print` steps; hpcds logs progress itself.
STEPS_PER_PRINT = 1 << 30


def render_ds_config(spec: JobSpec) -> dict[str, Any]:
    """The DeepSpeed JSON for a spec whose ZeRO stage is pinned (an int), with `deepspeed.config` merged last.

    No "optimizer" or "scheduler" section: the trainer passes torch's AdamW as a client optimizer (DeepSpeed's own
    Adam variants compile ops at start-up) and runs its own learning-rate schedule.
    """
    ds = spec.deepspeed
    stage = ds.zero_stage
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise HpcdsError(
            f"deepspeed.zero_stage is {stage!r}; the DeepSpeed config needs a number. "
            "Pin the strategy first (hpcds.plan.pin_strategy, which `hpcds submit` does), or set zero_stage: 0-3."
        )
    training = spec.training
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": training.grad_accum_steps,
        "train_batch_size": spec.global_batch_size,
        "gradient_clipping": training.grad_clip,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if training.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif training.precision == "fp16":
        # loss_scale 0 = dynamic loss scaling, starting at 2**16 and halving on overflow.
        config["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    config["zero_optimization"] = _zero_config(spec, stage)
    if ds.offload_optimizer != "none":
        # DeepSpeed refuses a client optimizer with ZeRO-Offload unless told that this is on purpose.
        config["zero_force_ds_cpu_optimizer"] = False
    merged, problems = resolve_auto(config, ds.config, spec)
    batch = ds.config.get("train_batch_size", AUTO)
    if batch != AUTO and batch != spec.global_batch_size:
        problems.append(
            Problem(
                "deepspeed.config.train_batch_size",
                f"is {batch}, but micro batch {training.micro_batch_size} x accumulation {training.grad_accum_steps} "
                f"x {spec.world_size} ranks = {spec.global_batch_size}",
                '"auto" (hpcds computes it for the node count), or change training.micro_batch_size / grad_accum_steps',
            )
        )
    if problems:
        raise SpecError(problems)
    return merged


def _zero_config(spec: JobSpec, stage: int) -> dict[str, Any]:
    ds = spec.deepspeed
    zero: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return zero
    zero.update(zero_buckets(spec, stage))
    if stage == 3:
        zero.update(
            stage3_max_live_parameters=1_000_000_000,
            stage3_max_reuse_distance=1_000_000_000,
            sub_group_size=1_000_000_000,
            # Read only by `engine.save_16bit_model`, which gathers the full 16-bit weights into one file; hpcds's
            # checkpoints are ZeRO shards whatever this says (`hpcds export` consolidates them).
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, ds.nvme_path)
    if stage == 3 and ds.offload_params != "none":
        zero["offload_param"] = _offload(ds.offload_params, ds.nvme_path)
    return zero


def _offload(device: str, nvme_path: str | None) -> dict[str, Any]:
    section: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        section["nvme_path"] = nvme_path
    return section


def render_ds_config_json(spec: JobSpec) -> str:
    return json.dumps(render_ds_config(spec), indent=2) + "\n"
