"""LoRA fine-tuning of a Hugging Face model with real DeepSpeed on 2 gloo ranks, ZeRO-2 and ZeRO-3.

The base is a tiny Qwen3 (2 layers, 32 wide, byte vocabulary) written at test time with its weights; the adapters
cover every linear layer. For each stage: the loss falls, the base weights in the checkpoint equal the base folder's
bit for bit (only `lora_*` tensors moved), and the exported adapter (peft) and merged model (transformers) give the
live model's logits. Resume after a real SIGTERM is exact for frozen-base ZeRO-3 too. And `build_model` with a
ZeRO-3 config creates every base weight already partitioned (zero.Init), so a large base never sits whole on a rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.tiny_hf import (
    LORA_TARGETS,
    consolidated,
    launch_env,
    live_model,
    losses_by_step,
    relaunch,
    sample_ids,
    tiny_spec,
    train_run,
    write_tiny_qwen3,
)

pytestmark = pytest.mark.deepspeed

MAX_STEPS = 12
EXIT_REQUEUE = 75


def lora_spec(base: Path, stage: int):
    model = {"type": "hf", "path": str(base), "lora": {"r": 4, "alpha": 8, "target_modules": LORA_TARGETS}}
    return tiny_spec(f"lora-z{stage}", model, stage, max_steps=MAX_STEPS, lr=2e-2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{stage: (spec, run dir)}: one straight LoRA run per ZeRO stage, shared by the tests below."""
    root = tmp_path_factory.mktemp("lora")
    base = write_tiny_qwen3(root / "base", seed=3)
    env = launch_env(root / "data-cache")
    done = {}
    for stage in (2, 3):
        spec = lora_spec(base, stage)
        run_dir, code = train_run(root / "runs", spec, env)
        assert code == 0, f"ZeRO-{stage} LoRA run failed; see {run_dir}/events.jsonl"
        done[stage] = (spec, run_dir)
    return done, base, env, root


# zero_to_fp32 writes a tied head under its own name; the base folder stores it once, as the embedding.
TIED = {"lm_head.weight": "model.embed_tokens.weight"}


def hf_name(peft_name: str) -> str:
    """peft's name for a base weight -> transformers' (peft adds a prefix and `.base_layer` in adapted layers)."""
    name = peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return TIED.get(name, name)


def base_weights(base: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(base / "model.safetensors"))


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_lowers_the_loss_and_moves_only_the_adapters(stage, trained):
    import torch

    runs_by_stage, base, _, _ = trained
    _, run_dir = runs_by_stage[stage]
    losses = losses_by_step(run_dir)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.3, (first, last)

    state = consolidated(run_dir, MAX_STEPS, stage)
    original = base_weights(base)
    adapters = {k: v for k, v in state.items() if "lora_" in k}
    assert len(adapters) == 2 * len(LORA_TARGETS) * 2  # A and B, every target, 2 layers
    frozen = {k: v for k, v in state.items() if "lora_" not in k}
    for name, tensor in frozen.items():
        assert torch.equal(tensor, original[hf_name(name)]), f"frozen {name} changed"
    assert {hf_name(k) for k in frozen} == set(original)  # every base weight is in the checkpoint
    # lora_B starts at zero (peft's init); training must have moved every one.
    assert all(v.abs().max() > 0 for k, v in adapters.items() if "lora_B" in k)


@pytest.mark.parametrize("stage", [2, 3])
def test_exported_adapter_and_merged_model_give_the_live_logits(stage, trained):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hpcds.export import export_run

    runs_by_stage, base, _, root = trained
    spec, run_dir = runs_by_stage[stage]
    live = live_model(spec, consolidated(run_dir, MAX_STEPS, stage))
    ids = sample_ids()
    with torch.no_grad():
        want = live(input_ids=ids).logits

    adapter = export_run(run_dir, fmt="lora", step="final", out_dir=root / f"adapter-z{stage}")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapter.files)
    from safetensors.torch import load_file

    saved = load_file(str(adapter.out_dir / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # the adapter alone, no base weights
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter.out_dir))
    with torch.no_grad():
        got = with_adapter.eval()(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5

    merged = export_run(run_dir, fmt="hf", step=str(MAX_STEPS), out_dir=root / f"merged-z{stage}")
    model = AutoModelForCausalLM.from_pretrained(str(merged.out_dir)).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5


def test_lora_zero3_resume_after_sigterm_is_exact(trained):
    import torch

    runs_by_stage, base, env, root = trained
    _, straight = runs_by_stage[3]
    run_dir, code = train_run(root / "runs", lora_spec(base, 3), env, fault="signal_at:6:TERM")
    assert code == EXIT_REQUEUE
    assert relaunch(run_dir, env) == 0
    assert losses_by_step(run_dir) == losses_by_step(straight)
    want, got = consolidated(straight, MAX_STEPS, 3), consolidated(run_dir, MAX_STEPS, 3)
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), f"{name} differs after resume"


ZERO3_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "train_batch_size": 1,
    "zero_optimization": {"stage": 3},
}


def _build_partitioned(specs_json: list[str]) -> list[dict]:
    """In a fresh 1-rank gloo process: build each model under ZeRO-3 and count its sharded parameters."""
    code = f"""
import json, deepspeed
from hpcds.spec import ModelSpec
from hpcds.train.models import build_model
deepspeed.init_distributed(dist_backend="gloo")
for text in {specs_json!r}:
    net = build_model(ModelSpec.model_validate_json(text), seed=0, zero3_config={ZERO3_CONFIG!r})
    params = list(net.parameters())
    print(json.dumps({{
        "n": len(params),
        "sharded": sum(hasattr(p, "ds_id") for p in params),
        "local_numel": sum(p.numel() for p in params),
        "full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
    }}))
"""
    import json
    import os
    import subprocess
    import sys

    from hpcds.launch import free_port

    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_zero3_config_builds_the_model_already_partitioned(tmp_path):
    """With zero3_config, no rank materialises the base: every base parameter is a ZeRO-3 shard from construction
    (from_pretrained / from_config under HfDeepSpeedConfig; Mamba's own init would fail on an empty shard)."""
    from hpcds.spec import ModelSpec
    from hpcds.train.models import build_model

    specs = [
        ModelSpec(type="hf", path=str(write_tiny_qwen3(tmp_path / "base")), vocab_size=256),
        ModelSpec(type="gpt2", d_model=32, n_layer=2, n_head=4, vocab_size=256, max_seq_len=32, lora={"r": 4}),
        ModelSpec(type="mamba", d_model=32, n_layer=1, vocab_size=256, max_seq_len=32),
    ]
    sharded = _build_partitioned([spec.model_dump_json() for spec in specs])
    assert len(sharded) == len(specs)
    for spec, got in zip(specs, sharded, strict=True):
        whole = sum(p.numel() for p in build_model(spec, seed=0).parameters())
        assert got["full_numel"] == whole
        # Every base weight is a shard (empty outside a gather on 1 rank); LoRA adapters made after the base may
        # still be whole (DeepSpeed partitions them in initialize).
        adapters = 2 * 2 if spec.lora is not None else 0  # lora_A and lora_B of c_attn, 2 layers
        assert got["sharded"] >= got["n"] - adapters, got
        assert got["local_numel"] < whole // 10, got
