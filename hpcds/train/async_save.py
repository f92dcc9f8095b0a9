"""The trainer's saves: periodic ones in the background where they fit, the rest synchronous; retention and the
`checkpoint` event once a save is committed.

An asynchronous save blocks training for the resume probe's forward pass and a copy of the state in host memory
(`checkpoint.write_shards(snapshot=True)`); a thread per rank writes the copy while training goes on. Every step
boundary already has one collective (the stop flag's, hpcds.train.preempt); each rank adds to it whether its writer is
done, and at the first boundary where every rank's is, all ranks commit together (`checkpoint.commit`). Until then
`latest.json` and resume see the previous checkpoint only. Any other save (a stop signal's, the final one, a save
while one is in flight) first waits for the one in flight and commits it; a stop signal's save is then written
synchronously, as before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcds import runs
from hpcds.train import checkpoint

# Leave this share of the node's free memory to everything else when checking the copy at start.
FREE_MEMORY_SHARE = 0.8


def agreed_by_all_ranks(verdict: bool) -> bool:
    """True only where every rank said True. Each rank judges its own node's free memory, and ranks that saved
    differently would call different collectives at a save and hang: one SUM (DeepSpeed's fast path) settles it."""
    import torch
    from deepspeed import comm

    from hpcds.train.preempt import collective_device

    votes = torch.tensor([0.0 if verdict else 1.0], device=collective_device())
    comm.all_reduce(votes)
    return votes.item() == 0.0


def choose_async(spec: Any) -> tuple[bool, str]:
    """Whether periodic saves run in the background, the same on every rank (every rank calls this), and why."""
    verdict, why = judge_async(spec)
    if agreed_by_all_ranks(verdict) or not verdict:
        return verdict, why
    return False, "periodic saves are synchronous: another node has too little free memory for the host copy"


def judge_async(spec: Any) -> tuple[bool, str]:
    """The planner's verdict for the run's pinned spec, then (unless the spec says true) this node's free memory now:
    `slurm.mem` may be unset, and `hpcds run` has none."""
    import psutil

    from hpcds.errors import HpcdsError
    from hpcds.plan import plan_job

    try:
        plan = plan_job(spec)
    except HpcdsError as exc:  # a shape the planner cannot count: no size for the copy, so no copy
        return False, f"periodic saves are synchronous: the planner cannot size the host copy ({exc})"
    if not plan.async_save or spec.checkpoint.async_save is True:
        return plan.async_save or spec.checkpoint.async_save is True, plan.async_save_reason
    row = plan.chosen or plan.recommended
    snapshot = row.snapshot_bytes_per_node if row else 0
    free = psutil.virtual_memory().available
    if snapshot > FREE_MEMORY_SHARE * free:
        return False, (
            f"periodic saves are synchronous: an asynchronous save's host copy ({snapshot / 2**30:.1f} GiB on this "
            f"node) is more than {FREE_MEMORY_SHARE:.0%} of its free memory ({free / 2**30:.1f} GiB)"
        )
    return True, plan.async_save_reason


@dataclass
class Saver:
    """Saves for one trainer process: at most one asynchronous save in flight (`pending`)."""

    engine: Any
    run_dir: Path
    ckpt_dir: Path
    rank: int
    world: int
    spec: Any
    faults: Any  # preempt.Faults
    asynchronous: bool = False
    pending: checkpoint.Pending | None = None
    buffers: Any = None  # shard_write.HostBuffers, reused by every background save of the process
    last_step: int | None = None  # the newest committed step and when it committed
    last_time: float | None = None
    _started: float = 0.0
    _blocking_s: float = 0.0
    _probe_s: float = 0.0
    _final: bool = False

    def written(self) -> bool:
        """This rank's share of the save in flight is on disk (False when none is in flight)."""
        return self.pending is not None and self.pending.done()

    def start(
        self,
        step: int,
        client_state: dict,
        rank_state: dict,
        *,
        started: float,
        probe_s: float,
        final: bool,
        periodic: bool,
        best_step: int | None,
        steps_now: int,
    ) -> None:
        """Save `step`: in the background when periodic and allowed, otherwise written and committed now."""
        background = periodic and self.asynchronous and not final
        if background and self.buffers is None:
            from hpcds.train.shard_write import HostBuffers

            self.buffers = HostBuffers()
        kill = self.faults.kill_in_async_write_step == step and self.rank == 0
        self.pending = checkpoint.write_shards(
            self.engine,
            self.ckpt_dir,
            step,
            client_state,
            rank_state,
            rank=self.rank,
            snapshot=background,
            pin=_on_gpu(),
            buffers=self.buffers,
            write_fault={"kill_before_done": kill, "sleep_s": self.faults.async_write_sleep_s},
        )
        self._started, self._probe_s, self._final = started, probe_s, final
        self._blocking_s = time.time() - started
        if not background:
            self.commit(best_step, steps_now)

    def commit(self, best_step: int | None, steps_now: int) -> None:
        """Every rank: commit the save in flight (waiting for this rank's writer first), prune, record it."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        background = pending.background is not None
        waited = time.time()
        manifest = checkpoint.commit(
            self.engine, self.ckpt_dir, pending, rank=self.rank, world=self.world,
            fault_kill_at_step=self.faults.kill_in_save_step,
            info={"zero_stage": self.spec.deepspeed.zero_stage, "world_size": self.world, "final": self._final},
        )  # fmt: skip
        if background:
            self.buffers.release()  # written and committed: the next copy may reuse them
        step = pending.step
        self.last_step, self.last_time = step, time.time()
        # What training waited for: the probe and the copy (or the whole synchronous save), and the commit.
        blocking_s = self._blocking_s + (self.last_time - waited if background else 0.0)
        if self.rank != 0:
            return
        keep = self.spec.checkpoint
        deleted = checkpoint.apply_retention(
            self.ckpt_dir,
            lambda committed: checkpoint.choose_retained(
                committed,
                keep_last=keep.keep_last,
                best_step=best_step,
                final_step=step if self._final else None,
                keep_every_steps=keep.keep_every_steps,
            ),
        )
        seconds = self.last_time - self._started
        removed = f" (removed {', '.join(deleted)})" if deleted else ""
        how = f", {blocking_s:.1f} s of it blocking training" if background else ""
        print(
            f"checkpoint step_{step}: {manifest['total_bytes'] / 1e6:.1f} MB in {seconds:.1f} s{how}{removed}",
            flush=True,
        )
        runs.append_event(
            self.run_dir,
            "checkpoint",
            step=step,
            bytes=manifest["total_bytes"],
            seconds=round(seconds, 3),
            blocking_s=round(blocking_s, 3),
            background=background,
            committed_at_step=steps_now,
            phases_s={"probe": round(self._probe_s, 3), **manifest["timings_s"]},
        )


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
