"""`hpcds export`: which checkpoint (pure), and real exports of real 2-rank DeepSpeed runs on CPU.

A full-weight tiny Qwen3 under ZeRO-3 exports to safetensors (bit-equal to DeepSpeed's consolidated fp32 weights) and
to a Hugging Face folder that transformers loads with the live model's logits; a tiny Mamba under ZeRO-2 exports to
transformers' Mamba format and generates. Broken checkpoints are refused or skipped with the reason; the export runs
without a process group, and importing the command costs no torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.tiny_hf import consolidated, launch_env, live_model, sample_ids, tiny_spec, train_run, write_tiny_qwen3

from hpcds.errors import HpcdsError
from hpcds.export import Candidate, choose_step, dedupe_shared

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


# ---------------------------------------------------------------------------------------------------------------------
# Pure


def test_choose_step_latest_final_best_and_numbers():
    found = [Candidate(4), Candidate(8), Candidate(12, final=True, best_step=4)]
    assert choose_step(None, found, pointer_step=12) == 12
    assert choose_step("latest", found, pointer_step=None) == 12
    assert choose_step("latest", found, pointer_step=99) == 12  # a pointer to a broken checkpoint is not followed
    assert choose_step("final", found, None) == 12
    assert choose_step("best", found, None) == 4
    assert choose_step("8", found, None) == 8


def test_choose_step_errors_say_what_exists():
    found = [Candidate(4), Candidate(8)]
    with pytest.raises(HpcdsError, match="no committed checkpoint at step 6; committed steps: 4, 8"):
        choose_step("6", found, None)
    with pytest.raises(HpcdsError, match="no final checkpoint"):
        choose_step("final", found, None)
    with pytest.raises(HpcdsError, match="no evaluation"):
        choose_step("best", found, None)
    with pytest.raises(HpcdsError, match="expected a step number"):
        choose_step("last", found, None)
    with pytest.raises(HpcdsError, match="no committed checkpoint yet"):
        choose_step(None, [], None)


def test_dedupe_shared_keeps_tied_tensors_once():
    import torch

    embedding = torch.randn(4, 3)
    kept, aliases = dedupe_shared({"embed.weight": embedding, "head.weight": embedding, "norm": torch.ones(3)})
    assert sorted(kept) == ["embed.weight", "norm"] and aliases == {"head.weight": "embed.weight"}


def test_export_command_imports_no_torch():
    heavy = "('torch', 'deepspeed', 'transformers')"
    code = f"import sys, hpcds.cli.export_cmd; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------------------------------
# Real runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A full-weight tiny Qwen3 under ZeRO-3 and a tiny Mamba under ZeRO-2, STEPS steps each on 2 gloo ranks."""
    root = tmp_path_factory.mktemp("export")
    base = write_tiny_qwen3(root / "base", seed=5)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # stand-ins for a real model's tokenizer files
        (base / name).write_text(json.dumps({"source": "test"}) + "\n")
    env = launch_env(root / "data-cache")
    specs = {
        "qwen3-z3": tiny_spec("qwen3-z3", {"type": "hf", "path": str(base)}, 3, max_steps=STEPS, lr=3e-3),
        "mamba-z2": tiny_spec("mamba-z2", {"type": "mamba", "d_model": 32, "n_layer": 1}, 2, max_steps=STEPS),
    }
    made = {}
    for name, spec in specs.items():
        run_dir, code = train_run(root / "runs", spec, env)
        assert code == 0, f"{name} failed; see {run_dir}/events.jsonl"
        made[name] = (spec, run_dir)
    return made, root


@pytest.mark.deepspeed
def test_zero3_export_equals_the_consolidated_weights_and_gives_live_logits(runs):
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hpcds.export import export_run

    made, root = runs
    spec, run_dir = made["qwen3-z3"]
    live_state = consolidated(run_dir, STEPS, 3)

    flat = export_run(run_dir, fmt="safetensors", out_dir=root / "z3-flat")
    assert flat.step == STEPS
    saved = load_file(str(flat.out_dir / "model.safetensors"))
    aliases = json.loads((flat.out_dir / "tied_weights.json").read_text()) if "tied_weights.json" in flat.files else {}
    assert set(saved) | set(aliases) == set(live_state)
    for name, tensor in live_state.items():
        assert torch.equal(saved[aliases.get(name, name)], tensor), name

    folder = export_run(run_dir, fmt="hf", step="final", out_dir=root / "z3-hf")
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "special_tokens_map.json"} <= set(folder.files)
    model = AutoModelForCausalLM.from_pretrained(str(folder.out_dir)).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, live_state[name]), name
    ids = sample_ids()
    with torch.no_grad():
        want = live_model(spec, live_state)(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert not dist.is_initialized()  # consolidation needed no process group

    half = export_run(run_dir, fmt="hf", out_dir=root / "z3-bf16", dtype="bf16")
    loaded = AutoModelForCausalLM.from_pretrained(str(half.out_dir))
    assert next(loaded.parameters()).dtype == torch.bfloat16


@pytest.mark.deepspeed
def test_mamba_exports_to_transformers_mamba_and_generates(runs):
    import torch
    from transformers import MambaForCausalLM

    from hpcds.export import export_run

    made, root = runs
    spec, run_dir = made["mamba-z2"]
    live_state = consolidated(run_dir, STEPS, 2)
    done = export_run(run_dir, fmt="hf", out_dir=root / "mamba-hf")
    config = json.loads((done.out_dir / "config.json").read_text())
    assert config["model_type"] == "mamba" and config["hidden_size"] == 32
    model = MambaForCausalLM.from_pretrained(str(done.out_dir)).eval()
    ids = sample_ids()
    with torch.no_grad():
        want = live_model(spec, live_state)(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    prompt = torch.tensor([list(b"def ")])
    out = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 12) and bytes(out[0, 4:].tolist()).decode("utf-8", "replace")


@pytest.mark.deepspeed
def test_broken_checkpoints_are_refused_or_skipped(runs, tmp_path):
    from hpcds.export import export_run

    made, _ = runs
    _, source = made["mamba-z2"]
    run_dir = tmp_path / source.name
    shutil.copytree(source, run_dir)
    ckpt = run_dir / "checkpoints"
    (ckpt / f"step_{STEPS}" / "COMMITTED").unlink()
    with pytest.raises(HpcdsError, match=f"no committed checkpoint at step {STEPS}"):
        export_run(run_dir, fmt="safetensors", step=str(STEPS), out_dir=tmp_path / "a")
    # A flipped byte in the step before: only the checksum sees it, and then no checkpoint is left to export.
    shard = ckpt / "step_4" / "mp_rank_00_model_states.pt"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    with pytest.raises(HpcdsError, match="no committed checkpoint yet"):
        export_run(run_dir, fmt="safetensors", out_dir=tmp_path / "b")
    with pytest.raises(HpcdsError, match="fails its checksum"):
        export_run(run_dir, fmt="safetensors", step="4", out_dir=tmp_path / "c")
    with pytest.raises(HpcdsError, match="no adapter to export"):
        export_run(source, fmt="lora", out_dir=tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x").write_text("x")
    with pytest.raises(HpcdsError, match="not empty"):
        export_run(source, fmt="hf", out_dir=tmp_path / "e")


@pytest.mark.deepspeed
def test_cli_exports_by_run_name_on_a_machine_without_gpus(runs):
    from click.testing import CliRunner

    from hpcds.cli.export_cmd import export

    made, _ = runs
    _, run_dir = made["qwen3-z3"]
    result = CliRunner().invoke(
        export, [run_dir.name, "--runs-dir", str(run_dir.parent), "--format", "safetensors", "--step", "4"]
    )
    assert result.exit_code == 0, result.output
    assert f"exported step_4 of {run_dir.name} as safetensors" in result.output
    assert (run_dir / "export" / "step_4-safetensors" / "model.safetensors").is_file()

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HPCDS_RUNS_DIR": str(run_dir.parent)}
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(name, None)
    argv = [sys.executable, "-m", "hpcds.cli.export_cmd", run_dir.name, "--step", "12"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "no committed checkpoint at step 12; committed steps: 4, 8" in done.stderr
    assert "Traceback" not in done.stderr
