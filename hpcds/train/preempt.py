"""Stop requests: signal handlers that only set a flag, and the one collective that makes every rank agree on it.

Slurm warns with SIGUSR2 (`--signal=USR2@lead`), requeue / preemption / time limit / scancel send SIGTERM, and Ctrl-C
under `hpcds run` sends SIGINT. Saving inside a handler hangs collectives, so a handler records the signal and returns;
at the next optimizer-step boundary all ranks take the MAX of their flags (a rank the signal missed still stops), save,
and exit with EXIT_REQUEUE. `hpcds launch` and `hpcds run` block all three before starting DeepSpeed's launcher (which
dies on USR2, and on TERM / INT kills the ranks 30 s later, however long their save takes); the ranks inherit the
mask and unblock it only once their handler is in place.

`HPCDS_TEST_FAULT` injects faults for the tests: `signal_at:N:TERM` makes rank 0 send itself that signal after step N,
`kill_in_save:N` SIGKILLs rank 0 in the middle of step N's save (after the shards, before the commit),
`kill_in_async_write:N` SIGKILLs rank 0 from its background writer once step N's files are written, before the commit
(training has gone on meanwhile), `async_write_sleep:S` makes every background write start S seconds late,
`raise_after:K` makes rank 0 raise at its K-th step boundary after each start, once a save in flight is committed (a
failing job that still makes progress;
`raise_after:K@HOST` only where rank 0 runs on HOST: a bad node),
`hang_after:K` makes rank 0 sleep there instead, in a job's first allocation only (a hung job: the other ranks wait
in the collective, heartbeats stop), `stop_save_sleep:S` makes rank 0 sleep S seconds before the save a stop signal
asks for (a slow save, as a big checkpoint's), `step_sleep:S[:N]` makes rank 0 sleep S seconds at every boundary
(of the first N allocations; a steady pace for tests that must catch a run mid-way, whatever the machine's load),
`convert_sleep:S` makes the universal-checkpoint conversion sleep S seconds once its slices are extracted (a slow
conversion, as a big checkpoint's; it runs in rank 0's converter process).
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass

from hpcds.facts import STOP_SIGNUMS


class StopFlag:
    """Set from a signal handler; read at step boundaries."""

    def __init__(self) -> None:
        self.signum = 0
        self.boundaries = 0  # step boundaries seen by this process, for the test faults
        self.written_ranks = 0  # ranks whose background checkpoint write was done at the last boundary
        self.commit_first = False  # a test fault is due at this boundary: the save in flight commits before it
        self._raise_due = False
        self.faults = faults_from_env()

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum

    def install(self) -> StopFlag:
        for sig in STOP_SIGNUMS:
            signal.signal(sig, self._handle)
        # Inherited blocked from `hpcds launch` / `hpcds run`, so that DeepSpeed's launchers never react to them; a
        # signal that came during start-up is pending and is delivered here.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNUMS))
        if not self.signum:
            self.signum = pending_in_launchers()
        return self

    def agree(self, written: bool = False) -> int:
        """The stop signal any rank received (0 = none), the same on every rank, from one collective per step; the
        same collective counts the ranks whose background checkpoint write is done (`written`) into `written_ranks`.

        A SUM of one-hot float flags rather than a MAX of an int: DeepSpeed routes float SUMs through its fast path
        (shared memory between CPU ranks, NCCL on GPUs), while a MAX falls back to gloo's TCP round trip, which
        measurably slowed small CPU steps. Several signals at once: the first of STOP_SIGNUMS wins, on every rank.
        """
        import torch
        from deepspeed import comm

        self.boundaries += 1
        self._inject_faults()
        flags = torch.zeros(len(STOP_SIGNUMS) + 2, dtype=torch.float32, device=collective_device())
        if self.signum:
            flags[STOP_SIGNUMS.index(self.signum)] = 1.0
        flags[-2], flags[-1] = float(self._raise_due), float(written)
        comm.all_reduce(flags)
        counts = flags.tolist()
        self.written_ranks = int(counts.pop())
        self.commit_first = counts.pop() > 0
        for sig, count in zip(STOP_SIGNUMS, counts, strict=True):
            if count > 0:
                return int(sig)
        return 0

    def _inject_faults(self) -> None:
        if os.environ.get("RANK", "0") != "0":
            return
        on_host = self.faults.raise_on_host in (None, socket.gethostname())
        # Raised by `fire`, once the save in flight is committed: the fault stands for a failure after progress
        # that a synchronous save would have committed already.
        self._raise_due = self.faults.raise_after == self.boundaries - 1 and on_host
        restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if self.faults.step_sleep_s and restart < self.faults.step_sleep_allocations:
            import time

            time.sleep(self.faults.step_sleep_s)
        first_start = restart == 0
        if self.faults.hang_after == self.boundaries - 1 and first_start:
            import time

            while True:  # a real hang: no heartbeat, the other ranks block in the collective
                time.sleep(60)

    def fire(self) -> None:
        """Raise the raise_after fault agreed due at this boundary (rank 0), after the trainer committed."""
        if self._raise_due:
            raise RuntimeError(f"HPCDS_TEST_FAULT raise_after:{self.faults.raise_after}: injected failure")


def pending_in_launchers(levels: int = 2) -> int:
    """A stop signal that reached DeepSpeed's launchers (this rank's parent and grandparent) before this rank existed.

    They keep the stop signals blocked, so such a signal stays pending there, and a new process does not inherit
    pending signals: Slurm's TERM to every process of the step during the launchers' start-up reached no rank, and
    the job trained on until it was killed. Read from /proc/<pid>/status (ShdPnd, SigPnd); 0 where there is none."""
    pid = os.getppid()
    for _ in range(levels):
        try:
            with open(f"/proc/{pid}/status") as handle:
                fields = dict(line.split(":", 1) for line in handle.read().splitlines() if ":" in line)
        except OSError:
            return 0
        pending = int(fields.get("ShdPnd", "0"), 16) | int(fields.get("SigPnd", "0"), 16)
        for sig in STOP_SIGNUMS:
            if pending >> (sig - 1) & 1:
                return int(sig)
        pid = int(fields.get("PPid", "0"))
        if pid <= 1:
            return 0
    return 0


def collective_device():
    """NCCL reduces only GPU tensors; gloo only CPU ones."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


@dataclass(frozen=True)
class Faults:
    signal_at_step: int | None = None
    signal_num: int = signal.SIGTERM
    kill_in_save_step: int | None = None
    kill_in_async_write_step: int | None = None
    async_write_sleep_s: float = 0.0
    raise_after: int | None = None
    raise_on_host: str | None = None  # raise_after only on this host (None: on every host)
    hang_after: int | None = None
    stop_save_sleep_s: float = 0.0
    step_sleep_s: float = 0.0
    step_sleep_allocations: int = 1 << 30  # the first N allocations of a job (by SLURM_RESTART_COUNT)
    convert_sleep_s: float = 0.0


def parse_faults(text: str) -> Faults:
    """'signal_at:4:TERM,kill_in_save:8' -> Faults. Unknown items are an error: a typo must not silently pass a test."""
    from dataclasses import replace

    faults = Faults()
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, rest = item.partition(":")
        if kind == "signal_at":
            step, _, name = rest.partition(":")
            faults = replace(faults, signal_at_step=int(step), signal_num=signal.Signals["SIG" + (name or "TERM")])
        elif kind == "kill_in_save":
            faults = replace(faults, kill_in_save_step=int(rest))
        elif kind == "kill_in_async_write":
            faults = replace(faults, kill_in_async_write_step=int(rest))
        elif kind == "async_write_sleep":
            faults = replace(faults, async_write_sleep_s=float(rest))
        elif kind == "raise_after":
            boundary, _, host = rest.partition("@")
            faults = replace(faults, raise_after=int(boundary), raise_on_host=host or None)
        elif kind == "hang_after":
            faults = replace(faults, hang_after=int(rest))
        elif kind == "stop_save_sleep":
            faults = replace(faults, stop_save_sleep_s=float(rest))
        elif kind == "step_sleep":
            seconds, _, allocations = rest.partition(":")
            faults = replace(faults, step_sleep_s=float(seconds), step_sleep_allocations=int(allocations or 1 << 30))
        elif kind == "convert_sleep":
            faults = replace(faults, convert_sleep_s=float(rest))
        else:
            raise ValueError(
                f"HPCDS_TEST_FAULT: unknown fault {item!r} "
                "(signal_at:N:SIG, kill_in_save:N, kill_in_async_write:N, async_write_sleep:S, raise_after:K[@HOST], "
                "hang_after:K, stop_save_sleep:S, step_sleep:S[:N], convert_sleep:S)"
            )
    return faults


def faults_from_env() -> Faults:
    return parse_faults(os.environ.get("HPCDS_TEST_FAULT", ""))
