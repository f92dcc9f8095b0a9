"""Speed and memory on one GPU: a DeepSpeed engine built from an hpcds spec (hpcds's model, optimizer and rendered
DeepSpeed config) trained on random tokens in this process, one configuration per process so memory statistics and
a crash belong to it alone.

Speed: median seconds per optimizer step after warm-up, as tokens/s with the planner's FLOPs per token. Memory: the
planner's GPU total for the strategy (model states + activations + DeepSpeed buffers, what PyTorch's allocator holds)
against `torch.cuda.max_memory_allocated` after a few steps.
"""

from __future__ import annotations

import os
import statistics
import time

SEQ_LEN = 2048
VOCAB = 50257
# Models of about 350M parameters: GPT-2 medium, and Mamba-1 / Mamba-2 at the shapes of state-spaces' 370m checkpoints.
MODELS = {
    "gpt2-medium": {"type": "gpt2", "d_model": 1024, "n_layer": 24, "n_head": 16},
    "mamba": {"type": "mamba", "d_model": 1024, "n_layer": 48},
    "mamba2": {"type": "mamba2", "d_model": 1024, "n_layer": 48, "d_state": 128, "head_dim": 64},
}
# Micro-batch per configuration: 4 x 2048 tokens fills an 80 GB card well short of its memory with fused kernels; the
# mambapy scan keeps (batch, length, d_inner, d_state) tensors per layer, so it gets one sequence.
MICRO_BATCH = {"mamba-unfused": 1}
MEMORY_STRATEGIES = {"zero2": (2, "none"), "zero2-offload": (2, "cpu"), "zero3": (3, "none")}


def engine_spec(model: str, stage: int = 2, offload: str = "none", micro: int = 4, precision: str = "bf16"):
    from hpcds.spec import validate_spec

    return validate_spec(
        {
            "name": f"gpu-check-{model}",
            "model": {**MODELS[model], "vocab_size": VOCAB, "max_seq_len": SEQ_LEN},
            "data": {"train": "builtin:stdlib-docs", "tokenizer": "bytes"},
            "training": {"precision": precision, "micro_batch_size": micro, "warmup_steps": 0, "max_steps": 100},
            "deepspeed": {"zero_stage": stage, "offload_optimizer": offload},
            "slurm": {"gpus_per_node": 1, "ranks_per_node": 1},
            "wandb": {"mode": "disabled"},
        }
    )


def _single_rank() -> None:
    import deepspeed

    from hpcds.launch import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl")


def train_steps(spec, max_steps: int, measure_s: float) -> tuple[list[float], object]:
    """Seconds of each optimizer step (CUDA-synchronised), stopping after `max_steps` or once `measure_s` have
    passed; and the engine."""
    import deepspeed
    import torch

    from hpcds.render.deepspeed import render_ds_config
    from hpcds.train.__main__ import make_optimizer
    from hpcds.train.loop import loss_of
    from hpcds.train.models import build_model

    _single_rank()
    model = build_model(spec.model, seed=0)
    optimizer = make_optimizer(model, spec, 1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=render_ds_config(spec))
    micro, vocab = spec.training.micro_batch_size, spec.model.vocab_size
    generator = torch.Generator(device="cuda").manual_seed(0)
    times_s: list[float] = []
    started = time.monotonic()
    while len(times_s) < max_steps and time.monotonic() - started < measure_s:
        tokens = torch.randint(vocab, (micro, SEQ_LEN + 1), device="cuda", generator=generator)
        torch.cuda.synchronize()
        step_start = time.perf_counter()
        loss = loss_of(engine, tokens[:, :-1], tokens[:, 1:])
        engine.backward(loss)
        engine.step()
        torch.cuda.synchronize()
        times_s.append(time.perf_counter() - step_start)
    return times_s, engine


def speed(config: str, budget_s: float) -> dict:
    """tokens/s of one model, fused kernels or not (`-unfused`: part.py hid mamba-ssm and causal-conv1d)."""
    from hpcds.plan import plan_job
    from hpcds.train.kernels import describe_kernels

    model = config.removesuffix("-unfused")
    spec = engine_spec(model, micro=MICRO_BATCH.get(config, 4))
    # Start-up (imports, model, engine) takes a good part of the budget; measure in what is left, with a margin.
    times_s, _ = train_steps(spec, max_steps=30, measure_s=max(10.0, budget_s * 0.5))
    warmup = min(3, len(times_s) - 1)
    step_s = statistics.median(times_s[warmup:])
    tokens_per_step = spec.training.micro_batch_size * SEQ_LEN
    return {
        "model": model,
        "kernels": describe_kernels(spec.model, spec.training.precision),
        "micro_batch": spec.training.micro_batch_size,
        "seq_len": SEQ_LEN,
        "steps_timed": len(times_s) - warmup,
        "step_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "flops_per_token": plan_job(spec).flops_per_token,
        "params": plan_job(spec).params.total,
    }


def memory(config: str, budget_s: float) -> dict:
    import torch

    from hpcds.plan import Strategy, plan_job

    stage, offload = MEMORY_STRATEGIES[config]
    spec = engine_spec("gpt2-medium", stage=stage, offload=offload, micro=2)
    gpu_mem_gb = torch.cuda.get_device_properties(0).total_memory / 2**30  # the planner counts GiB
    row = plan_job(spec, gpu_mem_gb=gpu_mem_gb).row(Strategy(stage, offload_optimizer=offload != "none"))
    torch.cuda.reset_peak_memory_stats()
    times_s, _ = train_steps(spec, max_steps=4, measure_s=max(10.0, budget_s * 0.5))
    return {
        "strategy": row.strategy.name,
        "steps": len(times_s),
        "measured_bytes": torch.cuda.max_memory_allocated(),
        "planned_bytes": row.total_bytes,
        "planned": row.to_dict(),
    }
