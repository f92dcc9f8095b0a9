"""`model.init_from` on real DeepSpeed gloo ranks: stage 2 starts from stage 1's weights across ZeRO stages and world
sizes, with its own optimizer state, step 0 and W&B id; the loaded weights give stage 1's loss on the same batch.

Stage 1 is a tiny Mamba on 2 ranks under ZeRO-2 that evaluates every 4 steps. Stage 2 takes its best checkpoint
under ZeRO-3 on 1 rank, and a third run takes the same checkpoint through a folder `hpcds export` wrote (ZeRO-0,
2 ranks). The comparison is the resume probe's fixed batch: stage 1 stored its loss on it with the checkpoint,
and a run that starts from those weights recomputes it before its first step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpcds import facts, runs
from hpcds.train.init_from import match_problems, source_key, split_source

REPO = Path(__file__).resolve().parents[1]


def test_source_names_and_weight_matching():
    assert split_source("stage1:best") == ("stage1", "best")
    assert split_source("/runs/a:12") == ("/runs/a", "12")
    assert split_source("/data/x:y") == ("/data/x:y", None)  # not a selector: part of the folder's name
    assert source_key("base_model.model.backbone.layers.0.mixer.in_proj.base_layer.weight") == (
        "backbone.layers.0.mixer.in_proj.weight"
    )
    assert source_key("base_model.model.x.lora_A.default.weight") is None  # adapters start fresh
    wanted = {"a": (2, 3), "b": (4,), "c": (1,)}
    problems = match_problems(wanted, {"a": (2, 3), "b": (5,)})
    assert problems == [
        "the source lacks 1 weights, e.g. c",
        "1 weights have other shapes, e.g. b (5,) (the model has (4,))",
    ]


def tiny_tree(name: str, stage: int, ranks: int, **model) -> dict:
    return {
        "name": name,
        "model": {"type": "mamba", "d_model": 32, "n_layer": 1, "vocab_size": 256, "max_seq_len": 32, **model},
        "data": {"train": "builtin:stdlib-docs", "tokenizer": "bytes"},
        "training": {
            "precision": "fp32",
            "micro_batch_size": 2,
            "grad_accum_steps": 2,
            "lr": 3e-3,
            "warmup_steps": 2,
            "max_steps": 8,
            "log_interval_steps": 1,
            "eval_interval_steps": 4,
            "eval_iters": 2,
        },
        "deepspeed": {"zero_stage": stage},
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "slurm": {"gpus_per_node": 0, "ranks_per_node": ranks},
        "wandb": {"mode": "disabled"},
    }


def hpcds(args: list[str], root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hpcds", *args, "--runs-dir", str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in runs.read_events(run_dir) if e["event"] == kind]


@pytest.mark.deepspeed
def test_stage_two_starts_from_stage_one_best_across_stages_and_world_sizes(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HPCDS_DATA_CACHE": str(tmp_path / "data-cache")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    root = tmp_path / "runs"
    (tmp_path / "stage1.yaml").write_text(yaml.safe_dump(tiny_tree("stage1", stage=2, ranks=2)))
    first = hpcds(["run", str(tmp_path / "stage1.yaml")], root, env)
    assert first.returncode == 0, first.stdout + first.stderr
    (stage1,) = runs.list_runs(root)

    # By the spec's name: its newest run. ZeRO-3 on one rank, from ZeRO-2 on two.
    (tmp_path / "stage2.yaml").write_text(
        yaml.safe_dump(tiny_tree("stage2", stage=3, ranks=1, init_from="stage1:best"))
    )
    second = hpcds(["run", str(tmp_path / "stage2.yaml"), "--set", "training.max_steps=2"], root, env)
    assert second.returncode == 0, second.stdout + second.stderr
    stage2 = next(d for d in runs.list_runs(root) if d.name.startswith("stage2-"))
    pinned = yaml.safe_load((stage2 / facts.SPEC_FILE).read_text())["model"]["init_from"]
    assert pinned == f"{stage1}:best"  # the run directory names its source for good

    best = [int(m) for m in re.findall(r"eval at step (\d+): loss \S+ \| perplexity \S+ \(best\)", first.stdout)]
    (loaded,) = events(stage2, "init_from")
    assert loaded["source_run"] == stage1.name and loaded["zero_stage"] == 2
    assert best and loaded["step"] == best[-1] and loaded["tag"] == f"step_{best[-1]}"
    (probe,) = events(stage2, "init_probe")
    assert probe["ok"] and probe["saved_loss"] is not None
    # fp32 on CPU: the same weights on the same batch give the same loss, whatever the stage and world size
    assert abs(probe["loss"] - probe["saved_loss"]) <= 1e-5 * abs(probe["saved_loss"]), probe
    # weights only: step 0, no checkpoint of its own, a new W&B id
    (start,) = events(stage2, "train_start")
    assert start["step"] == 0 and start["resumed_from"] is None
    assert runs.read_meta(stage2)["wandb_id"] != runs.read_meta(stage1)["wandb_id"]
    first_lr = json.loads((stage2 / "losses.jsonl").read_text().splitlines()[0])["lr"]
    assert first_lr == pytest.approx(3e-3 / 3)  # warmup from the start: a fresh schedule

    # The same weights through a folder `hpcds export` wrote, into ZeRO-0 on two ranks.
    exported = hpcds(["export", stage1.name, "--format", "safetensors", "--step", str(loaded["step"])], root, env)
    assert exported.returncode == 0, exported.stdout + exported.stderr
    folder = next((stage1 / "export").iterdir())
    args = ["run", str(tmp_path / "stage2.yaml"), "--new", "--set", "training.max_steps=2"]
    args += ["--set", f"model.init_from={folder}", "--set", "deepspeed.zero_stage=0", "--set", "slurm.ranks_per_node=2"]
    third = hpcds(args, root, env)
    assert third.returncode == 0, third.stdout + third.stderr
    stage3 = sorted(d for d in runs.list_runs(root) if d.name.startswith("stage2-"))[-1]
    (from_folder,) = events(stage3, "init_probe")
    assert from_folder["saved_loss"] is None  # an export folder stores no probe: compared with stage 2's instead
    assert abs(from_folder["loss"] - probe["loss"]) <= 1e-5 * abs(probe["loss"])


def test_a_source_without_the_checkpoint_is_refused_before_anything_is_created(tmp_path):
    from hpcds.cli.train_cmd import local_spec, prepare_run
    from hpcds.errors import HpcdsError
    from hpcds.spec import validate_spec

    source, _ = prepare_run(local_spec(validate_spec(tiny_tree("stage1", 2, 2)), 2), tmp_path, new=True)
    spec = local_spec(validate_spec(tiny_tree("stage2", 3, 1, init_from=f"{source.name}:final")), 1)
    with pytest.raises(HpcdsError, match=r"(?s)has no committed checkpoint yet.*--after"):
        prepare_run(spec, tmp_path, new=True)
    assert [d.name for d in runs.list_runs(tmp_path)] == [source.name]
    with pytest.raises(HpcdsError, match="no run 'nothing-here'"):
        prepare_run(local_spec(validate_spec(tiny_tree("s", 3, 1, init_from="nothing-here")), 1), tmp_path, new=True)


@pytest.mark.deepspeed
def test_lora_adapters_train_on_a_base_initialised_from_a_run(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "fixtures"))
    from tiny_hf import LORA_TARGETS, launch_env, relaunch, tiny_spec, train_run, write_tiny_qwen3

    from hpcds.cli.train_cmd import prepare_run
    from hpcds.model_folder import with_folder_shape

    env = launch_env(tmp_path / "data-cache")
    base = write_tiny_qwen3(tmp_path / "base")
    spec, _ = with_folder_shape(tiny_spec("full", {"type": "hf", "path": str(base)}, 2, max_steps=4))
    full, code = train_run(tmp_path / "runs", spec, env)
    assert code == 0
    lora = {"r": 4, "alpha": 8, "target_modules": LORA_TARGETS}
    model = {"type": "hf", "path": str(base), "lora": lora, "init_from": f"{full}:final"}
    spec, _ = with_folder_shape(tiny_spec("adapters", model, 2, max_steps=2))
    run_dir, _ = prepare_run(spec, tmp_path / "runs", new=True)
    assert relaunch(run_dir, env) == 0
    (loaded,) = events(run_dir, "init_from")
    assert loaded["source_run"] == full.name and loaded["step"] == 4
    # lora_B starts at zero, so the adapted model is the loaded base: stage 1's final probe loss exactly
    (probe,) = events(run_dir, "init_probe")
    assert probe["ok"] and abs(probe["loss"] - probe["saved_loss"]) <= 1e-5 * abs(probe["saved_loss"]), probe
