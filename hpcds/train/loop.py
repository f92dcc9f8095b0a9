"""The trainer every rank runs: set up DeepSpeed from a run directory, resume, train, save, stop when asked.

`train()` is the loop itself and fits on one screen (resume if a checkpoint is there, step, log, maybe eval, maybe
save, check the stop flag); `Trainer` holds the pieces it calls. Exactness across restarts rests on three things:
batches are a pure function of (seed, step, micro-batch, rank), the learning rate is a pure function of the step (set
on the optimizer here, no DeepSpeed scheduler), and every rank's RNG states are saved and restored.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcds import runs
from hpcds.train import checkpoint
from hpcds.train.preempt import EXIT_REQUEUE, StopFlag, collective_device, faults_from_env, signal_name
from hpcds.train.progress import format_step_line, render_banner, write_heartbeat, write_progress
from hpcds.train.schedule import lr_for_spec

LOSSES_FILE = "losses.jsonl"


def train(t: Trainer) -> int:
    t.resume()
    while t.step < t.max_steps:
        signum = t.flag.agree()
        if signum:
            return t.stop(signum)
        loss = t.train_step()
        if t.step % t.spec.training.log_interval_steps == 0 or t.step in (1, t.max_steps):
            t.log(loss)
        improved = stop_early = False
        if t.spec.training.eval_interval_steps and t.step % t.spec.training.eval_interval_steps == 0:
            improved, stop_early = t.evaluate()
        if t.step % t.spec.checkpoint.every_steps == 0 or improved or stop_early or t.step == t.max_steps:
            t.save(final=stop_early or t.step == t.max_steps)
        if stop_early:
            break
        t.inject_faults()
    return t.finish()


@dataclass
class Trainer:
    run_dir: Path
    spec: Any
    engine: Any
    data: Any
    logger: Any
    flag: StopFlag
    rank: int
    world: int
    local_rank: int
    micro_batch: int
    grad_accum: int
    ckpt_dir: Path
    step: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    last_ckpt_step: int | None = None
    last_ckpt_time: float | None = None
    interval_start: tuple[float, int] = (0.0, 0)
    last_loss: float | None = None
    last_tokens_per_s: float | None = None
    faults: Any = field(default_factory=faults_from_env)
    startup_phases_s: dict[str, float] = field(default_factory=dict)
    found: checkpoint.Resumed | None = None  # verified before the model was built (see __main__)

    @property
    def max_steps(self) -> int:
        return self.spec.training.max_steps

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world * self.spec.model.max_seq_len

    # -- one optimizer step ------------------------------------------------------------------------------------------
    def train_step(self) -> float:
        lr = lr_for_spec(self.step, self.spec.training)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(self.grad_accum):
            x, y = self.data.train_batch(self.step, micro, self.rank, self.world, self.micro_batch)
            loss = self.loss_of(x, y)
            self.engine.backward(loss)
            self.engine.step()  # steps the optimizer only at the accumulation boundary
            loss_sum += loss.detach().float().item()
        self.step += 1
        loss = loss_sum / self.grad_accum
        if self.rank == 0:
            record = {
                "step": self.step,
                "loss": loss,
                "lr": lr,
                "grad_norm": _as_float(self.grad_norm()),
                "time": time.time(),
            }
            with open(self.run_dir / LOSSES_FILE, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        return loss

    def loss_of(self, x, y):
        import torch.nn.functional as F

        logits = self.engine(input_ids=x.to(self.engine.device)).logits
        targets = y.to(logits.device).reshape(-1)
        total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, reduction="sum")
        # Mean over the targets; an SFT micro-batch can hold none (prompts longer than the sequence): 0, not NaN.
        return total / (targets != -100).sum().clamp(min=1)

    def grad_norm(self):
        return self.engine.get_global_grad_norm()

    def mean_over_ranks(self, value: float) -> float:
        import torch
        from deepspeed import comm

        # float32 SUM: DeepSpeed's fast path (shared memory on CPU, NCCL on GPU); float64 would fall back to gloo TCP.
        tensor = torch.tensor([value], dtype=torch.float32, device=collective_device())
        comm.all_reduce(tensor)
        return tensor.item() / self.world

    # -- logging, eval ---------------------------------------------------------------------------------------------
    def log(self, loss: float) -> None:
        mean_loss = self.mean_over_ranks(loss)
        now = time.time()
        start_time, start_step = self.interval_start
        step_time_s = (now - start_time) / max(1, self.step - start_step)
        self.interval_start = (now, self.step)
        tokens_per_s = self.tokens_per_step / step_time_s if step_time_s > 0 else 0.0
        lr = lr_for_spec(self.step - 1, self.spec.training)
        if self.local_rank == 0:
            write_heartbeat(self.run_dir, self.step)
        if self.rank != 0:
            return
        print(format_step_line(self.step, self.max_steps, mean_loss, lr, tokens_per_s, step_time_s), flush=True)
        metrics = {"train/loss": mean_loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s, **_memory_gb()}
        if (norm := _as_float(self.grad_norm())) is not None:
            metrics["train/grad_norm"] = norm
        self.logger.log(metrics, step=self.step)
        self.last_loss, self.last_tokens_per_s = mean_loss, tokens_per_s
        self.write_progress()

    def write_progress(self) -> None:
        write_progress(
            self.run_dir,
            step=self.step,
            max_steps=self.max_steps,
            last_checkpoint_step=self.last_ckpt_step,
            last_checkpoint_time=self.last_ckpt_time,
            world_size=self.world,
            wandb_id=self.wandb_id,
            wandb_url=self.logger.url,
            wandb_dir=self.logger.dir,
            loss=self.last_loss,
            tokens_per_s=self.last_tokens_per_s,
        )

    @property
    def wandb_id(self) -> str | None:
        return runs.read_meta(self.run_dir).get("wandb_id")

    def evaluate(self) -> tuple[bool, bool]:
        """Mean validation loss over ranks; returns (improved, stop early)."""
        import math

        import torch

        self.engine.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(self.spec.training.eval_iters):
                x, y = self.data.val_batch(i, self.rank, self.world, self.micro_batch)
                total += self.loss_of(x, y).item()
        self.engine.train()
        eval_loss = self.mean_over_ranks(total / self.spec.training.eval_iters)
        improved = self.best_eval_loss is None or eval_loss < self.best_eval_loss
        if improved:
            self.best_eval_loss, self.best_step, self.bad_evals = eval_loss, self.step, 0
        else:
            self.bad_evals += 1
        patience = self.spec.training.early_stopping_patience
        stop_early = patience is not None and self.bad_evals >= patience
        if self.rank == 0:
            perplexity = math.exp(min(eval_loss, 50.0))
            print(
                f"eval at step {self.step}: loss {eval_loss:.4f} | perplexity {perplexity:.2f}"
                + (" (best)" if improved else f" ({self.bad_evals} without improvement)"),
                flush=True,
            )
            self.logger.log({"eval/loss": eval_loss, "eval/perplexity": perplexity}, step=self.step)
            if stop_early:
                print(f"early stopping: {self.bad_evals} evaluations without a better loss", flush=True)
                runs.append_event(self.run_dir, "early_stop", step=self.step, best_step=self.best_step)
        return improved, stop_early

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data_step": self.step,
            "best_eval_loss": self.best_eval_loss,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "wandb_id": self.wandb_id,
            "zero_stage": self.spec.deepspeed.zero_stage,
            "world_size": self.world,
        }

    def save(self, final: bool = False) -> None:
        if self.last_ckpt_step == self.step:
            return
        started = time.time()
        state = self.trainer_state()
        manifest = checkpoint.save(
            self.engine,
            self.ckpt_dir,
            self.step,
            state,
            {"trainer": state, "rng": capture_rng()},
            rank=self.rank,
            world=self.world,
            fault_kill_at_step=self.faults.kill_in_save_step,
            info={"zero_stage": self.spec.deepspeed.zero_stage, "world_size": self.world, "final": final},
        )
        self.last_ckpt_step, self.last_ckpt_time = self.step, time.time()
        if self.rank != 0:
            return
        final_step = self.step if final else None
        deleted = checkpoint.apply_retention(
            self.ckpt_dir,
            lambda committed: checkpoint.choose_retained(
                committed,
                keep_last=self.spec.checkpoint.keep_last,
                best_step=self.best_step,
                final_step=final_step,
                keep_every_steps=self.spec.checkpoint.keep_every_steps,
            ),
        )
        seconds = self.last_ckpt_time - started
        size_mb = manifest["total_bytes"] / 1e6
        print(
            f"checkpoint step_{self.step}: {size_mb:.1f} MB in {seconds:.1f} s"
            + (f" (removed {', '.join(deleted)})" if deleted else ""),
            flush=True,
        )
        runs.append_event(
            self.run_dir,
            "checkpoint",
            step=self.step,
            bytes=manifest["total_bytes"],
            seconds=round(seconds, 3),
            phases_s=manifest["timings_s"],
        )

    def resume(self) -> None:
        started = time.time()
        found = self.found or checkpoint.find_resumable(self.ckpt_dir, rank=self.rank, world=self.world)
        for tag, problems in found.skipped:
            if self.rank == 0:
                print(f"skipping checkpoint {self.ckpt_dir / tag}: " + "; ".join(problems), flush=True)
                runs.append_event(self.run_dir, "checkpoint_skipped", tag=tag, problems=problems)
        if found.tag is not None:
            from hpcds.train import universal

            # Through DeepSpeed's universal format when the number of ranks changed (e.g. resumed on fewer nodes).
            saved, converted = universal.load_for_resume(
                self.engine,
                self.ckpt_dir,
                found.tag,
                found.manifest,
                zero_stage=self.spec.deepspeed.zero_stage,
                rank=self.rank,
                world_size=self.world,
            )
            if converted and self.rank == 0:
                runs.append_event(self.run_dir, "checkpoint_converted", **converted)
            state = saved["trainer"]
            self.step, self.best_eval_loss = state["step"], state["best_eval_loss"]
            self.best_step, self.bad_evals = state["best_step"], state["bad_evals"]
            self.last_ckpt_step, self.last_ckpt_time = self.step, saved["saved_time"]
            restore_rng(saved["rng"])
            self.startup_phases_s["load"] = round(time.time() - started, 3)
        if self.rank == 0:
            import psutil

            where = f"resuming from {found.tag}" if found.tag else "starting at step 0 (no checkpoint yet)"
            print(where, flush=True)
            runs.append_event(
                self.run_dir,
                "train_start",
                step=self.step,
                world_size=self.world,
                resumed_from=found.tag,
                resume_s=round(time.time() - started, 3),  # verify + load
                startup_s=round(time.time() - psutil.Process().create_time(), 3),  # process start to first step
                phases_s=self.startup_phases_s,
            )
            self.write_progress()
        if self.local_rank == 0:
            write_heartbeat(self.run_dir, self.step)
        self.interval_start = (time.time(), self.step)

    # -- endings -----------------------------------------------------------------------------------------------------
    def stop(self, signum: int) -> int:
        self.save()
        if self.rank == 0:
            print(
                f"stopped by {signal_name(signum)} at step {self.step}; checkpoint step_{self.step} saved", flush=True
            )
            runs.append_event(self.run_dir, "stopped", signal=signal_name(signum), step=self.step)
            self.write_progress()
            self.logger.finish(exit_code=EXIT_REQUEUE)
        return EXIT_REQUEUE

    def finish(self) -> int:
        self.save(final=True)
        if self.rank == 0:
            print(f"finished at step {self.step}", flush=True)
            runs.append_event(self.run_dir, "finished", step=self.step)
            self.write_progress()
            self.logger.finish(exit_code=0)
        return 0

    def inject_faults(self) -> None:
        if self.rank == 0 and self.faults.signal_at_step == self.step:
            os.kill(os.getpid(), self.faults.signal_num)


def capture_rng() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)


def _memory_gb() -> dict[str, float]:
    import psutil
    import torch

    metrics = {"sys/cpu_mem_gb": psutil.Process().memory_info().rss / 1e9}
    if torch.cuda.is_available():
        metrics["sys/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return metrics


def banner(t: Trainer, *, params: int, kernels: str, backend: str, nodes: int) -> str:
    spec, ds = t.spec, t.spec.deepspeed
    lines = {
        "run": str(t.run_dir),
        "model": f"{spec.model.type}, {params / 1e6:.2f}M parameters, sequence {spec.model.max_seq_len}",
        "kernels": kernels,
        "world size": f"{t.world} ({nodes} node{'s' if nodes != 1 else ''} x {t.world // nodes} ranks, {backend})",
        "ZeRO": f"stage {ds.zero_stage}, offload optimizer: {ds.offload_optimizer}, params: {ds.offload_params}",
        "precision": spec.training.precision,
        "batch": f"micro {t.micro_batch} x accum {t.grad_accum} x {t.world} ranks = global "
        f"{t.micro_batch * t.grad_accum * t.world} sequences ({t.tokens_per_step} tokens/step)",
        "steps": f"{t.max_steps}, lr {spec.training.lr:g} ({spec.training.decay}, warmup {spec.training.warmup_steps})",
        "checkpoints": f"{t.ckpt_dir} (every {spec.checkpoint.every_steps} steps, "
        f"keep last {spec.checkpoint.keep_last})",
        "W&B": f"{t.logger.mode}" + (f", {t.logger.url or t.logger.dir}" if (t.logger.url or t.logger.dir) else ""),
    }
    return "hpcds trainer\n" + render_banner(lines)
