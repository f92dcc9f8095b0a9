"""`python -m hpcds.train --run-dir RUN_DIR`: the per-rank entry point DeepSpeed's launcher starts.

Reads the run directory (`spec.yaml`, `ds_config.json`, `meta.json`), sets up the process group, data, model and
DeepSpeed engine, prints the banner on rank 0 and hands over to `loop.train`. Exit codes: 0 finished, EXIT_REQUEUE
(75) saved at a step boundary after a stop signal ("requeue me"), anything else failed (traceback on stderr and an
`error` event).
Started as plain `python` without a launcher's environment it refuses with the command to use instead.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import traceback
from pathlib import Path

from hpcds import runs
from hpcds.errors import HpcdsError
from hpcds.facts import CHECKPOINT_DIR, DS_CONFIG_FILE, META_FILE, SPEC_FILE
from hpcds.train.preempt import StopFlag

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def check_launched(env: dict[str, str]) -> None:
    missing = [name for name in LAUNCH_ENV if name not in env]
    if missing:
        raise HpcdsError(
            "the trainer runs on every rank under DeepSpeed's launcher, which sets "
            f"{', '.join(missing)}; it was started without them. Start training with `hpcds run SPEC` on this "
            "machine or `hpcds submit SPEC` on Slurm (or, by hand: deepspeed --no_local_rank --module hpcds.train "
            "--run-dir RUN_DIR)"
        )


def data_cache_dir(run_dir: Path) -> Path:
    """Prepared corpora are shared by the runs under one runs root: `<runs root>/.cache/data` unless
    HPCDS_DATA_CACHE says otherwise."""
    return Path(os.environ.get("HPCDS_DATA_CACHE") or run_dir.parent / ".cache" / "data")


def build_trainer(run_dir: Path, flag: StopFlag):
    from hpcds.train.progress import PhaseTimer

    phase = PhaseTimer()  # where start-up time goes, reported in the train_start event
    import deepspeed
    import torch
    import torch.distributed as dist

    from hpcds.spec import load_spec
    from hpcds.train import checkpoint, kernels, models
    from hpcds.train import data as data_mod
    from hpcds.train.host import apply_host_settings
    from hpcds.train.logging import make_logger
    from hpcds.train.loop import Settings, Trainer
    from hpcds.train.schedule import anchored_training, lr_for_spec

    phase("imports")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    local_ranks = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))  # ranks on this node
    host = apply_host_settings(local_ranks)  # before any work: the model's initialisation runs on these threads
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)
    backend = "nccl" if on_gpu else "gloo"
    if not on_gpu:
        from hpcds.train.ops import load_op

        # DeepSpeed compiles its CPU shared-memory collective op at the first start: built here under hpcds's lock,
        # a build killed before (whose torch baton would make every later start wait forever) cannot block this one.
        load_op(deepspeed.accelerator.get_accelerator().create_op_builder("ShareMemCommBuilder"))
    deepspeed.init_distributed(dist_backend=backend)
    phase("process_group")

    spec = load_spec(run_dir / SPEC_FILE)
    if not isinstance(spec.deepspeed.zero_stage, int):
        raise HpcdsError(
            f"{run_dir / SPEC_FILE}: deepspeed.zero_stage is 'auto'; a run directory pins a stage "
            "(hpcds submit / hpcds run write it). hint: set deepspeed.zero_stage to 0-3 there"
        )
    # Before the data and the model: a GPU job that cannot have the kernels its model wants fails now, not after
    # minutes of start-up (and before transformers' Mamba modules are imported, which fixes their implementation).
    kernel_choice = kernels.select_kernels(spec.model, spec.training.precision)
    ds_config = json.loads((run_dir / DS_CONFIG_FILE).read_text())
    micro = int(ds_config.get("train_micro_batch_size_per_gpu", spec.training.micro_batch_size))
    accum = int(ds_config.get("gradient_accumulation_steps", spec.training.grad_accum_steps))
    # The launcher decides the real world size; DeepSpeed asserts train_batch_size = micro x accum x world.
    ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"] = micro, accum
    ds_config["train_batch_size"] = micro * accum * world

    cache_dir = data_cache_dir(run_dir)
    if rank == 0:
        data_mod.prepare_data(spec.data, cache_dir)
    dist.barrier()
    unlink_shm_buffer(rank)
    data = data_mod.open_data(spec.data, spec.model.max_seq_len, spec.training.seed, cache_dir)
    data.check_vocab(spec.model.vocab_size)
    phase("data")

    # Verify before building: when a checkpoint will overwrite every weight, skip the random init (minutes on CPU
    # for billions of parameters).
    ckpt_dir = Path(spec.checkpoint.dir) if spec.checkpoint.dir else run_dir / CHECKPOINT_DIR
    found = checkpoint.find_resumable(ckpt_dir, rank=rank, world=world)
    phase("verify")
    # ZeRO-3 builds the model inside zero.Init: each parameter is partitioned as it is created, so no rank ever holds
    # the whole model (a model larger than one GPU could not start otherwise).
    zero3_config = ds_config if spec.deepspeed.zero_stage == 3 else None
    with _weights_init_skipped(found.tag is not None):
        model = models.build_model(
            spec.model,
            seed=spec.training.seed,
            zero3_config=zero3_config,
            pretrained=found.tag is None,
            mambapy=kernel_choice.mambapy,
        )
    if found.tag is not None and hasattr(model, "tie_weights"):
        model.tie_weights()  # no_init_weights also skips tying (transformers 5): untied, the ZeRO layout would differ
    init_source = None
    if spec.model.init_from and found.tag is None:  # a start from another run's weights; its own resumes skip this
        from hpcds.train import init_from

        init_source = init_from.initialise(model, spec, rank=rank, run_dir=run_dir)
    if spec.training.activation_checkpointing:
        models.enable_activation_checkpointing(model)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ds_numel: a ZeRO-3 shard's whole
    if rank == 0:
        # `materialized`: elements this rank holds whole after the build; 0 under zero.Init (only shards exist).
        materialized = sum(p.numel() for p in model.parameters())
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        runs.append_event(
            run_dir,
            "model",
            params=params,
            trainable=trainable,
            materialized=materialized,
            precision=spec.training.precision,
            kernels=kernel_choice.path,
            kernels_detail=kernel_choice.detail,
        )
    phase("model")
    optimizer = make_optimizer(model, spec, lr_for_spec(0, spec.training))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if rank == 0:
        runs.append_event(run_dir, "engine", **engine_facts(engine))
        runs.append_event(run_dir, "host", **host)
    # Dropout is off in every model hpcds builds; per-rank seeds still make any other randomness rank-specific.
    _seed_everything(spec.training.seed + rank)
    phase("engine")

    meta = runs.read_meta(run_dir)
    wandb_id = meta.get("wandb_id")
    # A continued run with a changed schedule goes on from the rate it had reached (hpcds.train.schedule).
    anchored = anchored_training(spec.training, meta.get("lr_anchor"), checkpoint.step_of(found.tag or ""))
    settings = Settings(
        run_dir=run_dir,
        spec=spec.model_copy(update={"training": anchored}),
        rank=rank,
        world=world,
        local_rank=local_rank,
        micro_batch=micro,
        grad_accum=accum,
        ckpt_dir=ckpt_dir,
        wandb_id=wandb_id,
    )
    logger = make_logger(run_dir, spec, wandb_id, rank)
    trainer = Trainer(settings, engine, data, logger, flag, found=found, startup_phases_s=phase.phases_s)
    if init_source is not None:
        init_from.check_probe(trainer, init_source)
    if rank == 0 and found.tag is not None:
        warn_if_versions_changed(run_dir)
    if rank == 0:
        nodes = max(1, world // local_ranks)
        print(
            banner(trainer, params=params, kernels=kernel_choice.detail, backend=backend, nodes=nodes, host=host),
            flush=True,
        )
    return trainer


def banner(t, *, params: int, kernels: str, backend: str, nodes: int, host: dict) -> str:
    """Rank 0's start-up summary of trainer `t`."""
    from hpcds.train.progress import render_banner

    s = t.settings
    spec, ds = s.spec, s.spec.deepspeed
    lines = {
        "run": str(s.run_dir),
        "model": f"{spec.model.type}, {params / 1e6:.2f}M parameters, sequence {spec.model.max_seq_len}",
        "kernels": kernels,
        "world size": f"{s.world} ({nodes} node{'s' if nodes != 1 else ''} x {s.world // nodes} ranks, {backend})",
        "host": f"{host['threads']} intra-op thread{'s' if host['threads'] != 1 else ''} per rank "
        f"({host['cores']} cores, {host['local_ranks']} ranks here, set by {host['threads_from']}); allocator "
        + ("thresholds fixed" if host["allocator_tuned"] else "as it was"),
        "ZeRO": f"stage {ds.zero_stage}, offload optimizer: {ds.offload_optimizer}, params: {ds.offload_params}",
        "precision": spec.training.precision,
        "batch": f"micro {s.micro_batch} x accum {s.grad_accum} x {s.world} ranks = global "
        f"{s.micro_batch * s.grad_accum * s.world} sequences ({s.tokens_per_step} tokens/step)",
        "steps": f"{s.max_steps}, lr {spec.training.lr:g} ({spec.training.decay}, warmup {spec.training.warmup_steps})",
        "checkpoints": f"{s.ckpt_dir} (every {spec.checkpoint.every_steps} steps, "
        f"keep last {spec.checkpoint.keep_last})",
        "W&B": f"{t.logger.mode}" + (f", {t.logger.url or t.logger.dir}" if (t.logger.url or t.logger.dir) else ""),
    }
    return "hpcds trainer\n" + render_banner(lines)


def warn_if_versions_changed(run_dir: Path) -> None:
    """A resume under other hpcds / torch / DeepSpeed versions than the run was submitted with may not load or may
    train differently: say so (stderr and a `versions_changed` event), and go on."""
    from hpcds import versions

    # The same comparison as `hpcds launch`'s: a package the submit record has no version of is not compared.
    then = runs.read_meta(run_dir).get("versions") or {}
    changed = versions.changes({"versions": then}, {"versions": versions.package_versions()})
    if changed:
        listed = versions.render_changes(changed)
        print(f"warning: resuming with other versions than at submit: {listed}", file=sys.stderr, flush=True)
        runs.append_event(run_dir, "versions_changed", changed=changed)


def unlink_shm_buffer(rank: int) -> None:
    """Remove this rank's name of DeepSpeed's shared-memory all-reduce buffer (CPU ranks on one node).

    DeepSpeed creates `/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>` (69 MB) per rank in
    init_distributed and never unlinks it, so every start leaked it, and a node that runs many requeued jobs filled
    its memory. Every rank has mapped every buffer once init_distributed has returned everywhere (the caller's barrier
    sees to that); the mappings outlive the name, and the memory goes back when the last rank exits, however it ends.
    """
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
    name += f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    import contextlib

    with contextlib.suppress(OSError):  # not created (GPU ranks, ranks on several nodes, no shm op) or already gone
        os.unlink(Path("/dev/shm") / name)


def _weights_init_skipped(skip: bool):
    """transformers' no_init_weights when `skip`: parameters are allocated but not randomly initialised."""
    import contextlib

    if not skip:
        return contextlib.nullcontext()
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def engine_facts(engine) -> dict:
    """What DeepSpeed built, read back from the engine (not from the config it was given)."""
    built = engine.optimizer
    return {
        "zero_stage": engine.zero_optimization_stage(),
        "optimizer": type(built).__name__,
        # ZeRO-1/2 keep the flag as cpu_offload, ZeRO-3 as offload_optimizer / offload_param
        "offload_optimizer": bool(getattr(built, "offload_optimizer", getattr(built, "cpu_offload", False))),
        "offload_params": bool(getattr(built, "offload_param", False)),
        "precision": "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32",
    }


def make_optimizer(model, spec, lr: float):
    """AdamW without weight decay on biases and norms. torch's AdamW compiles nothing. With optimizer offload from
    GPUs, DeepSpeed's CPU Adam (a JIT-compiled op, built once per TORCH_EXTENSIONS_DIR by hpcds.train.ops) steps the
    host copy many times faster than torch's; on CPU-only ranks the states are on the host anyway and torch's AdamW
    does it."""
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": spec.training.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if spec.deepspeed.offload_optimizer != "none" and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        from hpcds.train.ops import load_cpu_adam

        load_cpu_adam()  # DeepSpeedCPUAdam then finds the op loaded (DeepSpeed caches ops per process)
        return DeepSpeedCPUAdam(groups, lr=lr, betas=spec.training.adam_betas, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=spec.training.adam_betas)


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> int:
    flag = StopFlag().install()  # first thing: a stop during the slow setup must not be lost
    parser = argparse.ArgumentParser(prog="python -m hpcds.train", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, type=Path, help="run directory made by hpcds run / submit")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.absolute()
    rank = os.environ.get("RANK", "?")
    try:
        check_launched(dict(os.environ))
        from hpcds.train.loop import train

        code = train(build_trainer(run_dir, flag))
    except HpcdsError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        _record_error(run_dir, str(exc), rank)
        return 1
    except BaseException as exc:
        traceback.print_exc()
        _record_error(run_dir, f"{type(exc).__name__}: {exc}", rank)
        return 1
    import torch.distributed as dist

    if dist.is_initialized():
        # Nobody leaves before rank 0 has logged the ending: under Slurm the first node to exit EXIT_REQUEUE gets the
        # others killed (srun --kill-on-bad-exit), and rank 0 may still be writing its `stopped` event or closing W&B.
        dist.barrier()
        dist.destroy_process_group()
    return code


def _record_error(run_dir: Path, message: str, rank: str) -> None:
    if (run_dir / META_FILE).is_file():
        # The host lets the batch script exclude the node when the failure looks like the node's (a requeue after it).
        runs.append_event(run_dir, "error", message=message.splitlines()[0][:500], rank=rank, host=socket.gethostname())


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything that matters is on disk (fsynced checkpoints, closed files, W&B finished); skipping interpreter
    # teardown of torch, DeepSpeed and gloo threads saves seconds per start and cannot hang after the work is done.
    os._exit(code)
