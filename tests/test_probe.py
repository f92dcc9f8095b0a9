"""The resume probe: every checkpoint stores the loss on a fixed batch, and every resume recomputes it before its
first step. Real DeepSpeed on CPU ranks: a plain resume gives the saved loss exactly, a resume on fewer ranks (through
the universal format) within the stated tolerance, and a checkpoint whose weights were changed and whose checksums
were recomputed, so that it passes every file check, is refused with both losses named."""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import pytest

from hpcds import facts, runs
from hpcds.train.checkpoint import rank_state_name
from hpcds.train.loss import CONVERTED_RTOL, SAME_LAYOUT_RTOL, probe_verdict


def test_the_verdict_allows_the_stated_tolerance_and_names_both_losses():
    saved = {"loss": 5.0}
    assert probe_verdict(saved, 5.0, converted=False, checkpoint="c/step_4") is None
    assert probe_verdict(saved, 5.0 * (1 + SAME_LAYOUT_RTOL / 2), converted=False, checkpoint="c/step_4") is None
    assert probe_verdict(saved, 5.0 * (1 + 2 * SAME_LAYOUT_RTOL), converted=False, checkpoint="c/step_4")
    assert probe_verdict(saved, 5.0 * (1 + CONVERTED_RTOL / 2), converted=True, checkpoint="c/step_4") is None
    problem = probe_verdict(saved, 5.2, converted=True, checkpoint="c/step_4")
    assert "loss 5.200000" in problem and "saved with 5.000000" in problem and "c/step_4 is not used" in problem
    assert "after a universal conversion" in problem and "hint:" in problem


# ---------------------------------------------------------------------------------------------------------------------
# Real DeepSpeed


def tiny_spec():
    from hpcds.spec import validate_spec

    return validate_spec(
        {
            "name": "tiny-probe",
            "model": {"type": "gpt2", "d_model": 32, "n_layer": 2, "n_head": 2, "vocab_size": 256, "max_seq_len": 32},
            "data": {"train": "builtin:stdlib-docs", "tokenizer": "bytes"},
            "training": {
                "precision": "fp32",
                "micro_batch_size": 2,
                "grad_accum_steps": 1,
                "lr": 3e-3,
                "warmup_steps": 1,
                "max_steps": 4,
                "eval_interval_steps": 0,
            },
            "deepspeed": {"zero_stage": 2},
            "checkpoint": {"every_steps": 2, "keep_last": 2},
            "slurm": {"gpus_per_node": 0, "ranks_per_node": 2},
            "wandb": {"mode": "disabled"},
        }
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-rank ZeRO-2 run that finished at step 4 (checkpoints step_2 and step_4), and the environment it ran in."""
    from hpcds.cli.train_cmd import prepare_run
    from hpcds.launch import launch_local

    root = tmp_path_factory.mktemp("runs")
    env = {"HPCDS_DATA_CACHE": str(root / "data-cache")}
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache/torch_extensions")
    run_dir, _ = prepare_run(tiny_spec(), root, new=True)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        assert launch_local(run_dir, 2) == 0
    return run_dir, env


def _resumed(finished_run, tmp_path, ranks: int, change=None):
    """A copy of the finished run, optionally changed, started again on `ranks` ranks: (exit code, its events)."""
    from hpcds.launch import launch_local

    source, env = finished_run
    run_dir = tmp_path / source.name
    shutil.copytree(source, run_dir)
    if change:
        change(run_dir / facts.CHECKPOINT_DIR / "step_4")
    before = len(runs.read_events(run_dir))
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        code = launch_local(run_dir, ranks)
    return code, runs.read_events(run_dir)[before:]


def _saved_probe(run_dir: Path) -> dict:
    import torch

    state = torch.load(run_dir / facts.CHECKPOINT_DIR / "step_4" / rank_state_name(0), weights_only=False)
    return state["trainer"]["probe"]


@pytest.mark.deepspeed
def test_every_checkpoint_stores_the_probe(finished_run):
    probe = _saved_probe(finished_run[0])
    assert (probe["step"], probe["data_step"], probe["sequences"]) == (4, 4, 2)
    assert probe["loss"] > 0


@pytest.mark.deepspeed
def test_a_resume_recomputes_the_saved_probe_loss_exactly(finished_run, tmp_path):
    code, events = _resumed(finished_run, tmp_path, ranks=2)
    assert code == 0
    (probe,) = [e for e in events if e["event"] == "probe"]
    assert (probe["tag"], probe["ok"], probe["converted"]) == ("step_4", True, False)
    assert probe["loss"] == probe["saved_loss"] == _saved_probe(finished_run[0])["loss"]
    print(f"probe on resume: {probe['seconds']} s")


@pytest.mark.deepspeed
def test_a_resume_on_fewer_ranks_passes_the_probe_after_conversion(finished_run, tmp_path):
    code, events = _resumed(finished_run, tmp_path, ranks=1)
    assert code == 0
    assert [e["to_world_size"] for e in events if e["event"] == "checkpoint_converted"] == [1]
    (probe,) = [e for e in events if e["event"] == "probe"]
    assert (probe["ok"], probe["converted"]) == (True, True)
    off = abs(probe["loss"] - probe["saved_loss"]) / probe["saved_loss"]
    print(f"probe after a 2 -> 1 rank conversion: {probe['loss']} vs {probe['saved_loss']} saved ({off:.2e} relative)")
    assert off <= CONVERTED_RTOL


def _change_weights_and_rewrite_checksums(folder: Path) -> None:
    """Move every weight DeepSpeed could load (the module's and ZeRO's fp32 master partitions) by 1 %, then write
    the manifest's sizes and CRCs anew: the checkpoint passes every file check and holds other weights."""
    import torch

    def perturbed(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value * 1.01
        if isinstance(value, dict):
            return {k: perturbed(v) for k, v in value.items()}
        if isinstance(value, list):
            return [perturbed(v) for v in value]
        return value

    manifest = json.loads((folder / "manifest.json").read_text())
    for rel in manifest["files"]:
        path = folder / rel
        if path.name.startswith("rank_"):  # the trainer's state (with the saved probe) stays as saved
            continue
        state = torch.load(path, weights_only=False)
        if "module" in state:
            state["module"] = perturbed(state["module"])
        optimizer = state.get("optimizer_state_dict") or {}
        if "single_partition_of_fp32_groups" in optimizer:
            optimizer["single_partition_of_fp32_groups"] = perturbed(optimizer["single_partition_of_fp32_groups"])
        torch.save(state, path)
        data = path.read_bytes()
        manifest["files"][rel] = {"size_bytes": len(data), "crc32": zlib.crc32(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


@pytest.mark.deepspeed
def test_changed_weights_with_fresh_checksums_are_refused_by_the_probe(finished_run, tmp_path, capfd):
    code, events = _resumed(finished_run, tmp_path, ranks=2, change=_change_weights_and_rewrite_checksums)
    assert code != 0
    assert not [e for e in events if e["event"] == "checkpoint_skipped"]  # every file check passed
    (probe,) = [e for e in events if e["event"] == "probe"]
    assert probe["ok"] is False and probe["loss"] != probe["saved_loss"]
    errors = [e["message"] for e in events if e["event"] == "error"]
    assert errors and "the resume probe failed" in errors[0] and f"{probe['saved_loss']:.6f}" in errors[0]
    assert "step_4 is not used" in errors[0]
    # Nothing trained from it, and the checkpoint stays where it was for a person to look at.
    assert not [e for e in events if e["event"] in ("checkpoint", "finished")]
    assert (tmp_path / finished_run[0].name / facts.CHECKPOINT_DIR / "step_4" / "COMMITTED").is_file()


def test_status_history_shows_the_probe_of_each_resume():
    from hpcds.slurm.status import history_lines, job_history

    log = [
        {"time": 0, "event": "started", "job_id": "7", "restart": 0},
        {"time": 5, "event": "train_start", "step": 0},
        {"time": 50, "event": "stopped", "signal": "SIGUSR2", "step": 12},
        {"time": 51, "event": "exited", "job_id": "7", "restart": 0, "rc": 75, "class": "requeued"},
        {"time": 60, "event": "started", "job_id": "7", "restart": 1},
        {"time": 64, "event": "probe", "tag": "step_12", "ok": True},
        {"time": 65, "event": "train_start", "step": 12},
        {"time": 70, "event": "stopped", "signal": "SIGUSR2", "step": 14},
        {"time": 71, "event": "exited", "job_id": "7", "restart": 1, "rc": 75, "class": "requeued"},
        {"time": 80, "event": "started", "job_id": "7", "restart": 2},
        {"time": 84, "event": "probe", "tag": "step_14", "ok": False},
        {"time": 84, "event": "error", "message": "the resume probe failed: ...", "rank": "0"},
        {"time": 85, "event": "exited", "job_id": "7", "restart": 2, "rc": 1, "class": "failed"},
    ]
    assert [h["probe"] for h in job_history("7", log)] == [None, "probe ok", "probe failed"]
    assert history_lines(job_history("7", log))[1:] == [
        "restart 1: resumed at 12 (probe ok), SIGUSR2 at step 14, ran 0:11, requeued (exit 75)",
        "restart 2: resume refused (probe failed), ran 0:05, failed (exit 1); the resume probe failed: ...",
    ]
