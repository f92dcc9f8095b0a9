"""A user's own DeepSpeed config: read into the spec, "auto" resolved, conflicts refused; and a corpus of public
configs (tests/fixtures/ds_configs, sources in its SOURCES.md), each either rendered into a config DeepSpeed's own
classes accept or refused before submit with the place to fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpcds import runs
from hpcds.cli import main
from hpcds.deepspeed_check import check_with_deepspeed
from hpcds.errors import SpecError
from hpcds.render import render_run_files
from hpcds.spec import load_spec

CORPUS = Path(__file__).parent / "fixtures" / "ds_configs"
TINY_GPT2 = {"type": "gpt2", "d_model": 64, "n_layer": 2, "n_head": 2, "vocab_size": 256, "max_seq_len": 64}


def write_spec(folder: Path, **sections) -> Path:
    tree = {"name": "byo", "preset": "quickstart", "model": TINY_GPT2, **sections}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def problems_of(excinfo) -> dict[str, str]:
    return {p.path: p.message for p in excinfo.value.problems}


def rendered(spec_path: Path, *sets: str):
    pinned, files = render_run_files(load_spec(spec_path, list(sets)))
    return pinned, json.loads(files["ds_config.json"])


def leaves(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# What hpcds makes of each public config with the tiny GPT-2 above on 2 CPU ranks: the pinned strategy and precision,
# or the places it refuses, each a fix the person can make.
ACCEPTED = {
    "llamafactory_ds_z0_config.json": (0, "none", "none", "fp32"),
    "llamafactory_ds_z2_config.json": (2, "none", "none", "fp32"),
    "llamafactory_ds_z2_offload_config.json": (2, "cpu", "none", "fp32"),
    "llamafactory_ds_z3_config.json": (3, "none", "none", "fp32"),
    "llamafactory_ds_z3_offload_config.json": (3, "cpu", "cpu", "fp32"),
    "transformers_ds_config_zero2.json": (2, "cpu", "none", "fp32"),
    # 16 sequences a step = the preset's micro batch 8 x 2 ranks; fp16 and the optimizer's lr come from the file.
    # fp16 needs GPUs: these two render for 2 GPUs a node and are refused for the CPU ranks below.
    "dsexamples_megatron_ds_zero2_config.json": (2, "none", "none", "fp16"),
    "dsexamples_autotuning_ds_config_fp16_z3.json": (3, "none", "none", "fp16"),
}
# The optimizer DeepSpeed wraps the trainer's AdamW in, by ZeRO stage (stage 0 steps AdamW itself).
ZERO_OPTIMIZER = {
    0: "AdamW",
    1: "DeepSpeedZeroOptimizer",
    2: "DeepSpeedZeroOptimizer",
    3: "DeepSpeedZeroOptimizer_Stage3",
}
FP16 = {name for name, (*_, precision) in ACCEPTED.items() if precision == "fp16"}
ON_GPUS = {"slurm": {"gpus_per_node": 2}}
# Top-level sections in LLaMA-Factory's files that DeepSpeed 0.19 never reads (its keys are comms_logger and
# csv_monitor): warned about at submit, not refused, since DeepSpeed itself runs with them.
IGNORED_BY_DEEPSPEED = {
    f"llamafactory_ds_{kind}_config.json": {"comms_config", "monitor_config"}
    for kind in ("z0", "z2", "z2_offload", "z3", "z3_offload")
}
REFUSED = {
    # 1-bit Adam: hpcds trains with torch's AdamW.
    "dsexamples_bingbertsquad_onebitadam_config.json": {"deepspeed.config.optimizer.type"},
    # A log-shaped warmup of 500 steps: hpcds warms up linearly.
    "transformers_ds_config_zero3.json": {"deepspeed.config.scheduler.params.warmup_type"},
    "dsexamples_megatron_ds_zero2_cpu_offload_config.json": {"deepspeed.config.zero_optimization.cpu_offload"},
    "dsexamples_cifar_ds_config.json": {
        "deepspeed.config.zero_optimization.cpu_offload",
        "deepspeed.config.scheduler.params.warmup_type",
    },
}


def test_the_corpus_is_covered_and_sourced():
    files = {p.name for p in CORPUS.glob("*.json")}
    assert files == set(ACCEPTED) | set(REFUSED) and len(files) >= 10
    sources = (CORPUS / "SOURCES.md").read_text()
    assert all(f"| {name} |" in sources for name in files)


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_public_config_renders_what_deepspeed_accepts_and_the_spec_agrees(tmp_path, name):
    raw = json.loads((CORPUS / name).read_text())
    gpus = ON_GPUS if name in FP16 else {}
    pinned, ds = rendered(write_spec(tmp_path, deepspeed={"config": str(CORPUS / name)}, **gpus))
    stage, offload_optimizer, offload_params, precision = ACCEPTED[name]
    ds_spec = pinned.deepspeed
    assert (ds_spec.zero_stage, ds_spec.offload_optimizer, ds_spec.offload_params) == (
        stage,
        offload_optimizer,
        offload_params,
    )
    assert pinned.training.precision == precision
    # The run's config says what the pinned spec says, nothing is left "auto", and the user's other values stay.
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    assert zero.get("offload_optimizer", {}).get("device", "none") == offload_optimizer
    assert zero.get("offload_param", {}).get("device", "none") == offload_params
    assert ds["train_micro_batch_size_per_gpu"] == pinned.training.micro_batch_size
    assert ds["train_batch_size"] == pinned.global_batch_size
    assert ds.get("bf16", {}).get("enabled", False) is (precision == "bf16")
    assert ds.get("fp16", {}).get("enabled", False) is (precision == "fp16")
    assert "auto" not in dict(leaves(ds)).values()
    assert "optimizer" not in ds and "scheduler" not in ds  # the trainer's own AdamW and schedule
    kept = {k: v for k, v in leaves(raw) if v != "auto" and not k.startswith(("optimizer.", "scheduler."))}
    assert {k: dict(leaves(ds))[k] for k in kept} == kept
    if stage == 3:  # "auto" buckets take the hidden size's rule, as transformers' integration does
        assert (zero["reduce_bucket_size"], zero["stage3_param_persistence_threshold"]) == (64 * 64, 640)
    # DeepSpeed's own classes accept it, as submit asks them; what they would ignore is named, and only that.
    ignored = check_with_deepspeed(ds, pinned.world_size)
    assert {p.path.removeprefix("deepspeed.config.") for p in ignored} == IGNORED_BY_DEEPSPEED.get(name, set())


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_public_config_that_cannot_run_as_written_is_refused_with_the_place(tmp_path, name):
    with pytest.raises(SpecError) as excinfo:
        rendered(write_spec(tmp_path, deepspeed={"config": str(CORPUS / name)}))
    assert set(problems_of(excinfo)) == REFUSED[name]


@pytest.mark.parametrize("name", sorted(FP16))
def test_public_fp16_config_is_refused_on_cpu_ranks_where_it_was_written(tmp_path, name):
    with pytest.raises(SpecError) as excinfo:
        rendered(write_spec(tmp_path, deepspeed={"config": str(CORPUS / name)}))
    assert problems_of(excinfo) == {
        "training.precision": "fp16 on CPU ranks (slurm.gpus_per_node is 0): DeepSpeed runs fp16 only on GPUs and on "
        "CPUs with fp16 kernels, and refuses it at start elsewhere (as written in deepspeed.config.fp16.enabled)"
    }


def test_raw_settings_fill_unset_spec_fields_and_conflicts_name_both_places(tmp_path):
    raw = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5, "bf16": {"enabled": True}}
    raw["zero_optimization"] = {"stage": 1}
    pinned, ds = rendered(write_spec(tmp_path, deepspeed={"config": raw}))
    assert (pinned.training.micro_batch_size, pinned.training.grad_clip, pinned.training.precision) == (4, 0.5, "bf16")
    assert pinned.deepspeed.zero_stage == 1 and ds["zero_optimization"]["stage"] == 1
    assert ds["train_batch_size"] == 4 * 2 and ds["bf16"] == {"enabled": True}

    with pytest.raises(SpecError) as excinfo:
        load_spec(write_spec(tmp_path, deepspeed={"config": raw, "zero_stage": 2}, training={"grad_clip": 1.0}))
    found = problems_of(excinfo)
    assert "deepspeed.zero_stage is 2" in found["deepspeed.config.zero_optimization.stage"]
    assert "training.grad_clip is 1.0" in found["deepspeed.config.gradient_clipping"]


def test_fp16_and_bf16_both_on_is_refused(tmp_path):
    both = {"fp16": {"enabled": True}, "bf16": {"enabled": True}}
    with pytest.raises(SpecError) as excinfo:
        load_spec(write_spec(tmp_path, deepspeed={"config": both}))
    assert "both true" in problems_of(excinfo)["deepspeed.config.fp16.enabled"]


def test_a_raw_fp16_section_beside_the_default_precision_makes_one_precision(tmp_path):
    # Before, the preset's fp32 (or the default bf16) and the raw fp16 section were both enabled.
    raw = {"fp16": {"enabled": True, "loss_scale": 0}}
    pinned, ds = rendered(write_spec(tmp_path, deepspeed={"config": raw}, **ON_GPUS))
    assert pinned.training.precision == "fp16" and ds["fp16"]["enabled"] is True and "bf16" not in ds


def test_config_file_path_is_relative_to_the_spec_and_json_or_yaml(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "z3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    pinned, _ = rendered(write_spec(tmp_path, deepspeed={"config": "ds/z3.json"}))
    assert pinned.deepspeed.zero_stage == 3
    (tmp_path / "ds" / "z1.yaml").write_text("zero_optimization:\n  stage: 1\n")
    assert rendered(write_spec(tmp_path, deepspeed={"config": "ds/z1.yaml"}))[0].deepspeed.zero_stage == 1
    with pytest.raises(SpecError) as excinfo:
        load_spec(write_spec(tmp_path, deepspeed={"config": "ds/missing.json"}))
    assert "cannot read" in problems_of(excinfo)["deepspeed.config"]


def test_auto_without_a_value_and_a_wrong_global_batch_are_refused_before_submit(tmp_path):
    with pytest.raises(SpecError) as excinfo:
        rendered(write_spec(tmp_path, deepspeed={"config": {"flops_profiler": {"profile_step": "auto"}}}))
    assert "no value" in problems_of(excinfo)["deepspeed.config.flops_profiler.profile_step"]
    with pytest.raises(SpecError) as excinfo:  # 16 sequences per step on 2 ranks needs a micro batch of 8
        rendered(write_spec(tmp_path, deepspeed={"config": {"train_batch_size": 64}}))
    assert "x 2 ranks = 16" in problems_of(excinfo)["deepspeed.config.train_batch_size"]


def test_optimizer_and_scheduler_numbers_become_the_trainers(tmp_path):
    raw = {
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "weight_decay": 0.0}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 5, "warmup_type": "linear"}},
    }
    pinned, ds = rendered(write_spec(tmp_path, deepspeed={"config": raw}))
    assert "optimizer" not in ds and "scheduler" not in ds
    training = pinned.training
    assert (training.lr, training.adam_betas, training.weight_decay) == (1e-3, (0.9, 0.99), 0.0)
    assert (training.warmup_steps, training.decay, training.min_lr) == (5, "linear", 0.0)
    with pytest.raises(SpecError) as excinfo:
        load_spec(write_spec(tmp_path, deepspeed={"config": {"optimizer": {"type": "OneBitLamb", "params": {}}}}))
    assert "torch's AdamW" in problems_of(excinfo)["deepspeed.config.optimizer.type"]


def test_submit_asks_deepspeed_and_refuses_every_problem_at_once_before_anything_is_created(tmp_path, capsys):
    raw = {
        "zero_optimizaton": {"stage": 2},  # misspelt: DeepSpeed would ignore it and train without it
        "zero_optimization": {"overlap_com": True, "reduce_bucket_size": 0},
        "fp16": {"enabled": False, "loss_scal": 0},
        "flops_profiler": {"enabled": False},
    }
    spec = write_spec(tmp_path, deepspeed={"config": raw})
    runs_root = tmp_path / "runs"
    with pytest.raises(SystemExit) as exited:
        main(["submit", str(spec), "--dry-run", "--runs-dir", str(runs_root)])
    assert exited.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    for place, hint in [
        ("deepspeed.config.zero_optimizaton: is not a DeepSpeed setting", "did you mean 'zero_optimization'?"),
        ("deepspeed.config.zero_optimization.overlap_com: is not a DeepSpeed setting here", "'overlap_comm'"),
        ("deepspeed.config.fp16.loss_scal: is not a DeepSpeed setting here", "'loss_scale'"),
        ("deepspeed.config.zero_optimization.reduce_bucket_size: DeepSpeed refuses 0", "greater than 0"),
    ]:
        assert place in err and hint in err.split(place, 1)[1][:200], place
    assert "Traceback" not in err and not runs_root.exists()


def test_keys_deepspeed_ignores_are_warned_about_and_the_run_is_created(tmp_path, capsys):
    spec = write_spec(tmp_path, deepspeed={"config": {"monitor_config": {"enabled": True}}})
    main(["submit", str(spec), "--dry-run", "--runs-dir", str(tmp_path / "runs")])
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: deepspeed.config.monitor_config: is not a setting DeepSpeed reads: it is ignored" in err
    assert len(list((tmp_path / "runs").iterdir())) == 1


@pytest.mark.deepspeed
@pytest.mark.parametrize("name", sorted(set(ACCEPTED) - FP16))
def test_public_config_trains_on_cpu_ranks_as_written(tmp_path, name):
    """`hpcds run` with the public file as written, 2 steps on 2 CPU ranks: DeepSpeed builds the stage, offloads and
    precision the table says (read back from the engine), the run finishes, and the sections DeepSpeed ignores are
    named on the way in. LLaMA-Factory's ZeRO-3 offload file builds stage 3 with optimizer and parameters offloaded."""
    spec = write_spec(
        tmp_path,
        deepspeed={"config": str(CORPUS / name)},
        training={"max_steps": 2, "warmup_steps": 1, "eval_interval_steps": 100},
        wandb={"mode": "disabled"},
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    result = subprocess.run(
        [sys.executable, "-m", "hpcds", "run", str(spec), "--runs-dir", str(tmp_path / "runs")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for section in IGNORED_BY_DEEPSPEED.get(name, ()):
        assert f"warning: deepspeed.config.{section}: is not a setting DeepSpeed reads" in result.stderr
    (run_dir,) = runs.list_runs(tmp_path / "runs")
    events = runs.read_events(run_dir)
    (engine,) = [e for e in events if e["event"] == "engine"]
    stage, offload_optimizer, offload_params, precision = ACCEPTED[name]
    built = {k: engine[k] for k in ("zero_stage", "offload_optimizer", "offload_params", "precision")}
    assert built == {
        "zero_stage": stage,
        "offload_optimizer": offload_optimizer == "cpu",
        "offload_params": offload_params == "cpu",
        "precision": precision,
    }
    assert engine["optimizer"] == ZERO_OPTIMIZER[stage]
    assert [e["step"] for e in events if e["event"] == "finished"] == [2]


@pytest.mark.parametrize(
    "zero, field, message",
    [
        (
            {"stage": 0, "offload_optimizer": {"device": "cpu"}},
            "deepspeed.offload_optimizer",
            "needs ZeRO stage 1, 2 or 3",
        ),
        ({"stage": 2, "offload_param": {"device": "cpu"}}, "deepspeed.offload_params", "needs ZeRO stage 3, not 2"),
    ],
)
def test_impossible_raw_combinations_are_refused_where_they_were_written(tmp_path, zero, field, message):
    with pytest.raises(SpecError) as excinfo:
        load_spec(write_spec(tmp_path, deepspeed={"config": {"zero_optimization": zero}}))
    device_key = "offload_optimizer" if "optimizer" in field else "offload_param"
    assert problems_of(excinfo) == {
        field: f"{message} (as written in deepspeed.config.zero_optimization.{device_key}.device)"
    }


def test_deepspeeds_verdict_is_asked_once_per_config_and_cached_by_content(tmp_path, monkeypatch):
    import hpcds.deepspeed_check as check

    monkeypatch.setenv("HPCDS_CACHE_DIR", str(tmp_path / "cache"))
    asked = []
    real_run = subprocess.run
    monkeypatch.setattr(check.subprocess, "run", lambda *a, **k: asked.append(a) or real_run(*a, **k))
    config = {"train_micro_batch_size_per_gpu": 2, "monitor_config": {}}
    first = check.check_with_deepspeed(config, 1)
    again = check.check_with_deepspeed(config, 1)
    assert len(asked) == 1 and first == again and [p.path for p in first] == ["deepspeed.config.monitor_config"]
    check.check_with_deepspeed({**config, "gradient_clipping": 0.5}, 1)  # another config: asked again
    check.check_with_deepspeed(config, 2)  # another world size: asked again
    assert len(asked) == 3 and len(list((tmp_path / "cache").rglob("*.json"))) == 3


@pytest.mark.parametrize(
    "config, places",
    [
        # fp16 and bf16 both hold `enabled`: the refusal is placed in the section DeepSpeed refused
        ({"fp16": {"enabled": False}, "bf16": {"enabled": "maybe"}}, ["bf16.enabled"]),
        # a refused null is dropped like any value, so the next refusal is found too
        (
            {"zero_optimization": {"stage": None}, "tensorboard": {"output_path": 3}},
            ["zero_optimization.stage", "tensorboard.output_path"],
        ),
        # DeepSpeed's asserts for removed features name their block: each is placed there, all of them found
        (
            {"progressive_layer_drop": {"enabled": True}, "sparse_attention": {"mode": "fixed"}},
            ["sparse_attention", "progressive_layer_drop"],
        ),
    ],
)
def test_every_refusal_is_placed_where_deepspeed_refused_it(config, places):
    with pytest.raises(SpecError) as excinfo:
        check_with_deepspeed({"train_micro_batch_size_per_gpu": 1, **config}, 1)
    assert [p.path.removeprefix("deepspeed.config.") for p in excinfo.value.problems] == places
