"""The trainer every rank runs: resume, train, save, stop when asked.

`train()` is the loop itself and fits on one screen (resume if a checkpoint is there, step, log, maybe eval, maybe
save, check the stop flag). The `Trainer` it drives keeps three things apart: `Settings`, fixed for the process (the
spec, this rank's place in the world, the batch shape); `TrainState`, exactly what a checkpoint saves and a resume
restores; and the services it calls (the DeepSpeed engine, the data, the metrics logger, the stop flag). Exactness
across restarts rests on three things: batches are a pure function of (seed, step, micro-batch, rank), the learning
rate is a pure function of the step (set on the optimizer here, no DeepSpeed scheduler), and every rank's RNG states
are saved and restored.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpcds import runs
from hpcds.errors import HpcdsError
from hpcds.facts import EXIT_REQUEUE, LOSSES_FILE
from hpcds.train import checkpoint
from hpcds.train.async_save import Saver, choose_async
from hpcds.train.loss import eval_loss, loss_of, probe_batch, probe_record, probe_verdict
from hpcds.train.preempt import StopFlag, collective_device, signal_name
from hpcds.train.progress import format_step_line, process_age_s, write_heartbeat, write_progress
from hpcds.train.rng import capture_rng, restore_rng
from hpcds.train.schedule import lr_for_spec
from hpcds.train.step_records import StepRecords


def train(t: Trainer) -> int:
    t.resume()
    every = t.settings.spec.training
    while t.state.step < t.settings.max_steps:
        signum = t.flag.agree(written=t.saver.written())
        # The save in flight commits once every rank has written it, or before a test fault that stands for a crash.
        if t.flag.written_ranks == t.settings.world or t.flag.commit_first:
            t.commit_save()
        t.flag.fire()
        if signum:
            return t.stop(signum)
        loss = t.train_step()
        step = t.state.step
        if step % every.log_interval_steps == 0 or step in (1, t.settings.max_steps):
            t.log(loss)
        improved = stop_early = False
        if every.eval_interval_steps and step % every.eval_interval_steps == 0:
            improved, stop_early = t.evaluate()
        if step % t.settings.spec.checkpoint.every_steps == 0 or improved or stop_early or step == t.settings.max_steps:
            t.save(final=stop_early or step == t.settings.max_steps, periodic=True)
        if stop_early:
            break
        t.inject_faults()
    return t.finish()


@dataclass(frozen=True)
class Settings:
    """Fixed for the life of the process: from the run directory's spec and the launcher's environment."""

    run_dir: Path
    spec: Any  # the run's pinned JobSpec
    rank: int
    world: int
    local_rank: int
    micro_batch: int
    grad_accum: int
    ckpt_dir: Path
    wandb_id: str | None  # chosen at submit (meta.json); every restart logs into the same W&B run

    @property
    def max_steps(self) -> int:
        return self.spec.training.max_steps

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world * self.spec.model.max_seq_len


@dataclass
class TrainState:
    """What a checkpoint saves of the trainer and a resume restores (the data position is the step itself)."""

    step: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0


@dataclass
class Reported:
    """What the console, progress.json and status last heard: kept per process, not checkpointed."""

    loss: float | None = None
    tokens_per_s: float | None = None
    checkpoint_step: int | None = None
    checkpoint_time: float | None = None
    interval_start: tuple[float, int] = (0.0, 0)  # (time, step) the current tokens/s interval began


@dataclass
class Trainer:
    settings: Settings
    engine: Any
    data: Any
    logger: Any
    flag: StopFlag
    found: checkpoint.Resumed | None = None  # verified before the model was built (see __main__)
    startup_phases_s: dict[str, float] = field(default_factory=dict)
    state: TrainState = field(default_factory=TrainState)
    reported: Reported = field(default_factory=Reported)
    saver: Saver = field(init=False)
    records: StepRecords = field(init=False)  # rank 0's losses.jsonl, read from the device at intervals

    def __post_init__(self) -> None:
        s = self.settings
        self.records = StepRecords(s.run_dir / LOSSES_FILE)
        self.saver = Saver(self.engine, s.run_dir, s.ckpt_dir, s.rank, s.world, s.spec, self.flag.faults)
        self.saver.asynchronous, why = choose_async(s.spec)
        if s.rank == 0:
            print(f"checkpoints: {why}", flush=True)

    # -- one optimizer step ------------------------------------------------------------------------------------------
    def train_step(self) -> Any:
        """One optimizer step; returns this rank's mean loss over its micro-batches, a tensor on the device."""
        s, step = self.settings, self.state.step
        lr = lr_for_spec(step, s.spec.training)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = None
        for micro in range(s.grad_accum):
            x, y = self.data.train_batch(step, micro, s.rank, s.world, s.micro_batch)
            loss = loss_of(self.engine, x, y)
            self.engine.backward(loss)
            self.engine.step()  # steps the optimizer only at the accumulation boundary
            loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        self.state.step = step = step + 1
        loss = loss_sum / s.grad_accum
        if s.rank == 0:
            norm = self.engine.get_global_grad_norm()
            self.records.add(step=step, loss=loss, lr=lr, grad_norm=norm, time=time.time())
        return loss

    def grad_norm(self) -> float | None:
        return _as_float(self.engine.get_global_grad_norm())

    def mean_over_ranks(self, value: Any) -> float:
        import torch
        from deepspeed import comm

        # float32 SUM: DeepSpeed's fast path (shared memory on CPU, NCCL on GPU); float64 would fall back to gloo TCP.
        if isinstance(value, torch.Tensor):
            tensor = value.detach().reshape(1).to(collective_device(), torch.float32, copy=True)
        else:
            tensor = torch.tensor([value], dtype=torch.float32, device=collective_device())
        comm.all_reduce(tensor)
        return tensor.item() / self.settings.world

    # -- logging, eval ---------------------------------------------------------------------------------------------
    def log(self, loss: Any) -> None:
        s, step = self.settings, self.state.step
        if s.rank == 0:
            self.records.write()  # before the mean: the collective sums in place
        mean_loss = self.mean_over_ranks(loss)
        now = time.time()
        start_time, start_step = self.reported.interval_start
        step_time_s = (now - start_time) / max(1, step - start_step)
        self.reported.interval_start = (now, step)
        tokens_per_s = s.tokens_per_step / step_time_s if step_time_s > 0 else 0.0
        lr = lr_for_spec(step - 1, s.spec.training)
        if s.local_rank == 0:
            write_heartbeat(s.run_dir, step)
        if s.rank != 0:
            return
        print(format_step_line(step, s.max_steps, mean_loss, lr, tokens_per_s, step_time_s), flush=True)
        metrics = {"train/loss": mean_loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s, **_memory_gb()}
        if (norm := self.grad_norm()) is not None:
            metrics["train/grad_norm"] = norm
        self.logger.log(metrics, step=step)
        self.reported.loss, self.reported.tokens_per_s = mean_loss, tokens_per_s
        self.write_progress()

    def write_progress(self) -> None:
        s, reported = self.settings, self.reported
        write_progress(
            s.run_dir,
            step=self.state.step,
            max_steps=s.max_steps,
            last_checkpoint_step=reported.checkpoint_step,
            last_checkpoint_time=reported.checkpoint_time,
            world_size=s.world,
            wandb_id=s.wandb_id,
            wandb_url=self.logger.url,
            wandb_dir=self.logger.dir,
            loss=reported.loss,
            tokens_per_s=reported.tokens_per_s,
        )

    def evaluate(self) -> tuple[bool, bool]:
        """Mean validation loss over ranks; returns (improved, stop early)."""
        import math

        s, state = self.settings, self.state
        batches = (self.data.val_batch(i, s.rank, s.world, s.micro_batch) for i in range(s.spec.training.eval_iters))
        loss = self.mean_over_ranks(eval_loss(self.engine, batches))
        improved = state.best_eval_loss is None or loss < state.best_eval_loss
        if improved:
            state.best_eval_loss, state.best_step, state.bad_evals = loss, state.step, 0
        else:
            state.bad_evals += 1
        patience = s.spec.training.early_stopping_patience
        stop_early = patience is not None and state.bad_evals >= patience
        if s.rank == 0:
            perplexity = math.exp(min(loss, 50.0))
            print(
                f"eval at step {state.step}: loss {loss:.4f} | perplexity {perplexity:.2f}"
                + (" (best)" if improved else f" ({state.bad_evals} without improvement)"),
                flush=True,
            )
            self.logger.log({"eval/loss": loss, "eval/perplexity": perplexity}, step=state.step)
            if stop_early:
                print(f"early stopping: {state.bad_evals} evaluations without a better loss", flush=True)
                runs.append_event(s.run_dir, "early_stop", step=state.step, best_step=state.best_step)
        return improved, stop_early

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def checkpointed(self) -> dict[str, Any]:
        """The trainer's part of a checkpoint: its state, plus facts a resume checks against (the probe among them)."""
        s, step = self.settings, self.state.step
        return {
            **asdict(self.state),
            "data_step": step,
            "wandb_id": s.wandb_id,
            "zero_stage": s.spec.deepspeed.zero_stage,
            "world_size": s.world,
            "probe": probe_record(
                self.probe_loss(), step=step, lr=lr_for_spec(step, s.spec.training), sequences=s.micro_batch
            ),
        }

    def probe_loss(self) -> float:
        return self.mean_over_ranks(eval_loss(self.engine, [probe_batch(self.data, self.settings.micro_batch)]))

    def check_probe(self, tag: str, saved: dict[str, Any], converted: bool) -> None:
        """Recompute the saved probe loss before the first step; stop if the loaded state does not give it."""
        s, started = self.settings, time.time()
        measured = self.probe_loss()
        problem = probe_verdict(saved, measured, converted=converted, checkpoint=str(s.ckpt_dir / tag))
        if s.rank == 0:
            seconds = round(time.time() - started, 3)
            facts = {"saved_loss": saved["loss"], "loss": measured, "converted": converted, "seconds": seconds}
            runs.append_event(s.run_dir, "probe", tag=tag, ok=problem is None, **facts)
        if problem:
            raise HpcdsError(problem)

    def save(self, final: bool = False, periodic: bool = False) -> None:
        """Save this step: in the background when periodic and asynchronous saves are on, otherwise now. A save in
        flight is committed first (waiting for its writes), so a stop signal's save is never overtaken."""
        step = self.state.step
        if self.settings.rank == 0:
            self.records.write()  # the records up to a checkpoint are on disk before it is
        self.commit_save()
        if self.reported.checkpoint_step == step:
            return
        started = time.time()
        saved = self.checkpointed()  # computes the probe loss: a forward pass on one micro-batch
        self.saver.start(
            step,
            saved,
            {"trainer": saved, "rng": capture_rng()},
            started=started,
            probe_s=time.time() - started,
            final=final,
            periodic=periodic,
            best_step=self.state.best_step,
            steps_now=step,
        )
        self.note_committed()

    def commit_save(self) -> None:
        """Every rank together: commit the save in flight, if any (waiting for this rank's writes)."""
        self.saver.commit(self.state.best_step, self.state.step)
        self.note_committed()

    def note_committed(self) -> None:
        if self.saver.last_step is not None:
            self.reported.checkpoint_step, self.reported.checkpoint_time = self.saver.last_step, self.saver.last_time

    def resume(self) -> None:
        s = self.settings
        started = time.time()
        found = self.found or checkpoint.find_resumable(s.ckpt_dir, rank=s.rank, world=s.world)
        for tag, problems in found.skipped if s.rank == 0 else ():
            renamed = found.set_aside.get(tag)  # a committed reject, renamed so that retention never counts it
            note = f"; renamed to {renamed} (kept for inspection, never resumed from)" if renamed else ""
            print(f"skipping checkpoint {s.ckpt_dir / tag}: {'; '.join(problems)}{note}", flush=True)
            runs.append_event(s.run_dir, "checkpoint_skipped", tag=tag, problems=problems, renamed_to=renamed)
        if found.tag is not None:
            from hpcds.train import universal

            # Through DeepSpeed's universal format when the number of ranks changed (e.g. resumed on fewer nodes).
            saved, converted = universal.load_for_resume(
                self.engine,
                s.ckpt_dir,
                found.tag,
                found.manifest,
                zero_stage=s.spec.deepspeed.zero_stage,
                rank=s.rank,
                world_size=s.world,
                run_dir=s.run_dir,
            )
            if converted and s.rank == 0:
                runs.append_event(s.run_dir, "checkpoint_converted", **converted)
            trainer = saved["trainer"]
            if "probe" in trainer:  # checkpoints written before the probe existed have none
                self.check_probe(found.tag, trainer["probe"], converted=bool(converted))
            self.state = TrainState(**{name: trainer[name] for name in asdict(TrainState())})
            self.reported.checkpoint_step, self.reported.checkpoint_time = self.state.step, saved["saved_time"]
            restore_rng(saved["rng"])
            self.startup_phases_s["load"] = round(time.time() - started, 3)
        if s.rank == 0:
            where = f"resuming from {found.tag}" if found.tag else "starting at step 0 (no checkpoint yet)"
            print(where, flush=True)
            runs.append_event(
                s.run_dir,
                "train_start",
                step=self.state.step,
                world_size=s.world,
                resumed_from=found.tag,
                resume_s=round(time.time() - started, 3),  # verify + load
                startup_s=round(process_age_s(), 3),  # process start to first step
                phases_s=self.startup_phases_s,
            )
            self.write_progress()
        if s.local_rank == 0:
            write_heartbeat(s.run_dir, self.state.step)
        self.reported.interval_start = (time.time(), self.state.step)

    # -- endings -----------------------------------------------------------------------------------------------------
    def stop(self, signum: int) -> int:
        if self.settings.rank == 0 and self.flag.faults.stop_save_sleep_s:
            time.sleep(self.flag.faults.stop_save_sleep_s)  # test fault: a save as slow as a big checkpoint's
        s, step = self.settings, self.state.step
        trained = step > 0 or self.reported.checkpoint_step is not None
        if trained:  # before the first step of a fresh run there is nothing to keep, and a big model's save is slow
            self.save()
        if s.rank == 0:
            kept = f"checkpoint step_{step} saved" if trained else "nothing trained yet, nothing saved"
            print(f"stopped by {signal_name(signum)} at step {step}; {kept}", flush=True)
            runs.append_event(s.run_dir, "stopped", signal=signal_name(signum), step=step, saved=trained)
            self.write_progress()
            self.logger.finish(exit_code=EXIT_REQUEUE)
        return EXIT_REQUEUE

    def finish(self) -> int:
        self.save(final=True)
        if self.settings.rank == 0:
            print(f"finished at step {self.state.step}", flush=True)
            runs.append_event(self.settings.run_dir, "finished", step=self.state.step)
            self.write_progress()
            self.logger.finish(exit_code=0)
        return 0

    def inject_faults(self) -> None:
        faults = self.flag.faults
        if self.settings.rank == 0 and faults.signal_at_step == self.state.step:
            os.kill(os.getpid(), faults.signal_num)


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
