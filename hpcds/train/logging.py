"""Metrics sinks for the trainer: a `NullLogger` and a `WandbLogger` with the same three methods.

The loop never asks whether W&B is on. `wandb` is imported only when a WandbLogger is made, on rank 0. The run id
comes from the run directory (`meta.json`), so every restart of a run logs into the same W&B run (`resume="allow"`),
and every `log` passes the trainer's own step: offline W&B restarts at step 0 in each new process otherwise. A restart
that rewinds to an older checkpoint (a kill without a save) trains some steps again; their metrics are not logged a
second time: the highest step logged so far is kept in `wandb/logged_step`, and a new process logs only later steps
(the replayed steps are bit-identical anyway, since batches and learning rate are pure functions of the step).
W&B's service process is started with Slurm's warning signal blocked so it outlives it until the trainer is done,
and a W&B failure mid-run (its service ended by a TERM) costs the metrics, never the training.
Mode `auto` means online when an API key is available (WANDB_API_KEY, or an api.wandb.ai entry in ~/.netrc) and
offline otherwise; an online start that cannot reach the server falls back to offline with a message. The API key is
read by wandb itself from its usual places and never written anywhere by hpcds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hpcds.facts import SECRET_NAME, WARNING_SIGNUM

# An online start that cannot reach the server waits this long before falling back to offline files.
ONLINE_INIT_TIMEOUT_S = 30
LOGGED_STEP_FILE = "logged_step"


def choose_mode(requested: str, env: dict[str, str], netrc_text: str = "") -> str:
    """auto -> online with an API key, offline without one; other modes pass through. No I/O here."""
    if requested != "auto":
        return requested
    if env.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY") or "api.wandb.ai" in netrc_text:
        return "online"
    return "offline"


def read_netrc_text() -> str:
    try:
        return (Path(os.environ.get("NETRC", Path.home() / ".netrc"))).read_text()
    except OSError:
        return ""


def read_logged_step(path: Path) -> int:
    """The highest step earlier processes logged to the W&B run (-1 when none)."""
    try:
        return int(Path(path).read_text().strip())
    except (OSError, ValueError):
        return -1


def offline_run_dirs(run_dir: Path) -> list[Path]:
    """The `wandb/offline-run-*` folders of a run directory, oldest first (one per trainer start)."""
    return sorted((Path(run_dir) / "wandb").glob("offline-run-*"))


class NullLogger:
    mode = "disabled"
    url: str | None = None
    dir: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        run_id: str,
        mode: str,
        project: str,
        entity: str | None,
        tags: list[str],
        config: dict[str, Any],
        name: str,
    ) -> None:
        import wandb

        kwargs = dict(
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            project=project,
            entity=entity,
            tags=tags or None,
            config=config,
            name=name,
        )
        try:
            self.run = _init_shielded(wandb, mode=mode, settings=self._settings(wandb, mode), **kwargs)
        except Exception as exc:  # network, auth or server trouble: keep training, log to files
            if mode != "online":
                raise
            print(
                f"W&B online start failed ({type(exc).__name__}: {exc}); logging offline instead "
                f"(upload later with `hpcds sync {run_dir}`)",
                file=sys.stderr,
                flush=True,
            )
            mode = "offline"
            self.run = _init_shielded(wandb, mode=mode, settings=self._settings(wandb, mode), **kwargs)
        self.mode = mode
        self.broken = False
        self.step_file = Path(run_dir) / "wandb" / LOGGED_STEP_FILE
        self.logged_before = read_logged_step(self.step_file)  # steps up to this one are already in the W&B run
        self.url = self.run.url if mode == "online" else None
        self.dir = str(Path(self.run.dir).parent) if mode == "offline" else None

    @staticmethod
    def _settings(wandb, mode: str):
        # console="off": W&B would otherwise wrap stdout/stderr, which the launcher already captures per rank.
        return wandb.Settings(console="off", init_timeout=ONLINE_INIT_TIMEOUT_S, silent=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if step <= self.logged_before or self.broken:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as exc:  # W&B's service died (e.g. killed with the job step): training goes on without it
            self._give_up(exc)
            return
        from hpcds.runs import write_text_atomic

        write_text_atomic(self.step_file, f"{step}\n")

    def finish(self, exit_code: int = 0) -> None:
        if self.broken:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:
            self._give_up(exc)

    def _give_up(self, exc: Exception) -> None:
        self.broken = True
        print(f"W&B stopped working ({type(exc).__name__}: {exc}); no more metrics to W&B", file=sys.stderr, flush=True)


def redacted_config(spec_tree: dict[str, Any]) -> dict[str, Any]:
    """The spec as W&B's run config, with values of secret-looking `slurm.env` names (hpcds.facts.SECRET_NAME)
    replaced: W&B uploads its config, and an API key must never leave the machine that way. No I/O here."""
    tree = {**spec_tree, "slurm": dict(spec_tree.get("slurm") or {})}
    env = tree["slurm"].get("env") or {}
    tree["slurm"]["env"] = {name: "<redacted>" if SECRET_NAME.search(name) else value for name, value in env.items()}
    return tree


def _init_shielded(wandb, **kwargs):
    """wandb.init with SIGUSR2 blocked while it starts W&B's service process, which inherits the mask (it survives
    exec): Slurm's warning goes to every process of the job step, and the service would otherwise die of it, taking
    the last steps' metrics and the run's final state with it while the trainer saves. SIGTERM cannot be kept from
    it this way (its Go runtime unblocks it), so after a TERM the logger may lose the service and carries on without."""
    import signal

    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {WARNING_SIGNUM})
    try:
        return wandb.init(**kwargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def make_logger(run_dir: Path, spec, run_id: str | None, rank: int):
    """WandbLogger on rank 0 unless W&B is disabled (or no id is known); NullLogger elsewhere."""
    mode = choose_mode(spec.wandb.mode, dict(os.environ), read_netrc_text())
    if rank != 0 or mode == "disabled" or not run_id:
        return NullLogger()
    return WandbLogger(
        run_dir,
        run_id=run_id,
        mode=mode,
        project=spec.wandb.project,
        entity=spec.wandb.entity,
        tags=list(spec.wandb.tags),
        config=redacted_config(spec.model_dump(mode="json")),
        name=Path(run_dir).name,
    )
