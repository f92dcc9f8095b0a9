"""Exact resume with real DeepSpeed on 2 gloo ranks: the resume test of record, plus the ways a checkpoint goes bad.

For ZeRO 0, 1, 2 and 3: N steps straight vs. stopped by a real SIGTERM mid-run (save at the step boundary, exit 75)
and resumed to N; the per-step losses and the final fp32 weights must be bit-identical. A SIGKILL in the middle of a
save must leave the previous checkpoint in charge, a truncated shard must be detected and skipped with a message, and
W&B's offline folders must carry one run id across restarts. Each launch is a tiny Mamba (d_model 32, 1 layer,
sequence 32) for 8 steps: seconds, most of it start-up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hpcds import facts, runs
from hpcds.train import checkpoint as ck

pytestmark = pytest.mark.deepspeed

MAX_STEPS = 8
EXIT_REQUEUE = 75


def tiny_spec(stage: int, wandb_mode: str = "disabled", **training):
    from hpcds.spec import validate_spec

    return validate_spec(
        {
            "name": f"tiny-z{stage}",
            "model": {"type": "mamba", "d_model": 32, "n_layer": 1, "vocab_size": 256, "max_seq_len": 32},
            "data": {"train": "builtin:stdlib-docs", "tokenizer": "bytes"},
            "training": {
                "precision": "fp32",
                "micro_batch_size": 2,
                "grad_accum_steps": 2,
                "lr": 3e-3,
                "warmup_steps": 2,
                "max_steps": MAX_STEPS,
                "log_interval_steps": 2,
                "eval_interval_steps": 4,
                "eval_iters": 2,
                **training,
            },
            "deepspeed": {"zero_stage": stage},
            "checkpoint": {"every_steps": 4, "keep_last": 2},
            "slurm": {"gpus_per_node": 0, "ranks_per_node": 2},
            "wandb": {"mode": wandb_mode},
        }
    )


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory):
    """One prepared corpus for every launch; a kept TORCH_EXTENSIONS_DIR so DeepSpeed's comm op compiles once."""
    cache = tmp_path_factory.mktemp("data-cache")
    env = {"HPCDS_DATA_CACHE": str(cache)}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", ""))
    if not env["TORCH_EXTENSIONS_DIR"]:
        env["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "torch_extensions")
    return env


def new_run(root: Path, spec) -> Path:
    from hpcds.cli.train_cmd import prepare_run

    run_dir, reused = prepare_run(spec, root, new=True)
    assert not reused
    return run_dir


def launch(run_dir: Path, env: dict[str, str], monkeypatch, fault: str = "") -> int:
    from hpcds.launch import launch_local

    for key, value in {**env, "HPCDS_TEST_FAULT": fault}.items():
        monkeypatch.setenv(key, value)
    return launch_local(run_dir, 2)


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Per-step losses rank 0 recorded; a step trained twice (after a kill) keeps its last record."""
    found = {}
    for line in (run_dir / "losses.jsonl").read_text().splitlines():
        record = json.loads(line)
        found[record["step"]] = record["loss"]
    return found


def final_weights(run_dir: Path, stage: int) -> dict:
    import torch

    ckpt_dir = run_dir / facts.CHECKPOINT_DIR
    tag = ck.tag_for(MAX_STEPS)
    if stage == 0:
        states = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def assert_identical(reference: Path, resumed: Path, stage: int) -> None:
    import torch

    want, got = losses_by_step(reference), losses_by_step(resumed)
    assert sorted(want) == list(range(1, MAX_STEPS + 1))
    assert got == want, "per-step losses differ after resume"
    ref_weights, new_weights = final_weights(reference, stage), final_weights(resumed, stage)
    assert ref_weights.keys() == new_weights.keys()
    for name, tensor in ref_weights.items():
        assert torch.equal(tensor, new_weights[name]), f"{name} differs after resume"


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in runs.read_events(run_dir) if e["event"] == kind]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sigterm_save_and_resume_is_bit_identical(stage, tmp_path, shared_env, monkeypatch):
    wandb_mode = "offline" if stage == 2 else "disabled"
    straight = new_run(tmp_path, tiny_spec(stage, wandb_mode))
    assert launch(straight, shared_env, monkeypatch) == 0

    # A real SIGTERM to rank 0 only after step 5 (not a checkpoint step): every rank must still agree to stop,
    # save step_5 and exit 75; the restart trains steps 6-8.
    interrupted = new_run(tmp_path, tiny_spec(stage, wandb_mode))
    assert launch(interrupted, shared_env, monkeypatch, fault="signal_at:5:TERM") == EXIT_REQUEUE
    stopped = events(interrupted, "stopped")
    assert stopped and stopped[-1]["step"] == 5 and stopped[-1]["signal"] == "SIGTERM"
    assert json.loads((interrupted / "checkpoints" / ck.POINTER).read_text())["step"] == 5
    assert launch(interrupted, shared_env, monkeypatch) == 0
    assert [e["step"] for e in events(interrupted, "train_start")] == [0, 5]
    assert events(interrupted, "finished")[-1]["step"] == MAX_STEPS

    assert_identical(straight, interrupted, stage)
    # ZeRO-3 builds the model inside zero.Init: rank 0 never held a whole parameter; other stages build it whole.
    built = events(straight, "model")[0]
    assert built["params"] == built["trainable"] > 0
    assert built["materialized"] == (0 if stage == 3 else built["params"])

    if wandb_mode == "offline":
        wandb_id = runs.read_meta(interrupted)["wandb_id"]
        folders = sorted((interrupted / "wandb").glob("offline-run-*"))
        assert len(folders) == 2, folders  # one per trainer start...
        assert all(f.name.endswith(f"-{wandb_id}") for f in folders)  # ...all in the run directory's W&B run
        assert json.loads((interrupted / facts.PROGRESS_FILE).read_text())["wandb_id"] == wandb_id
        # `hpcds sync` finds them, and without a W&B key says what to do instead of failing inside wandb.
        from click.testing import CliRunner

        from hpcds.cli import cli

        for name in ("WANDB_API_KEY", "WANDB_MODE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
        result = CliRunner().invoke(cli, ["sync", str(interrupted)])
        assert "wandb login" in str(result.exception)


def test_sigkill_during_save_resumes_from_previous_checkpoint(tmp_path, shared_env, monkeypatch):
    run_dir = new_run(tmp_path, tiny_spec(2))
    # Rank 0 dies after step_8's shards are on disk but before the commit; the launcher then ends rank 1.
    assert launch(run_dir, shared_env, monkeypatch, fault=f"kill_in_save:{MAX_STEPS}") not in (0, EXIT_REQUEUE)
    ckpt_dir = run_dir / "checkpoints"
    assert (ckpt_dir / "step_8").is_dir() and not (ckpt_dir / "step_8" / ck.COMMITTED).exists()
    assert json.loads((ckpt_dir / ck.POINTER).read_text())["step"] == 4

    assert launch(run_dir, shared_env, monkeypatch) == 0
    skipped = events(run_dir, "checkpoint_skipped")
    assert skipped and skipped[0]["tag"] == "step_8" and "COMMITTED" in skipped[0]["problems"][0]
    assert events(run_dir, "train_start")[-1]["step"] == 4
    assert (ckpt_dir / "step_8" / ck.COMMITTED).is_file()

    # The same steps after the crash as without one: compare with a straight run of the same spec.
    straight = new_run(tmp_path, tiny_spec(2))
    assert launch(straight, shared_env, monkeypatch) == 0
    assert_identical(straight, run_dir, 2)

    # A truncated shard in the newest checkpoint: detected by size, skipped with a message, previous one used.
    shard = ckpt_dir / "step_8" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size // 2)
    # Also a flipped byte (same size) in the one before: only the checksum can see it.
    victim = ckpt_dir / "step_4" / "mp_rank_00_model_states.pt"
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    found_before = ck.list_tags(ckpt_dir)
    assert found_before[:2] == ["step_8", "step_4"]
    assert launch(run_dir, shared_env, monkeypatch) == 0
    skipped = events(run_dir, "checkpoint_skipped")[-2:]
    assert (
        skipped[0]["tag"] == "step_8"
        and f"has {size // 2} bytes, the manifest says {size}" in skipped[0]["problems"][0]
    )
    assert skipped[1]["tag"] == "step_4" and "fails its checksum" in skipped[1]["problems"][0]
    assert events(run_dir, "train_start")[-1]["step"] == 0  # no good checkpoint left: from scratch, and said so
    assert_identical(straight, run_dir, 2)
