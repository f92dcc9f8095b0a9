"""The memory planner against DeepSpeed's own estimators, the paper's formula, and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcds import runs
from hpcds.cli import cli
from hpcds.errors import HpcdsError
from hpcds.plan import (
    GIB,
    STRATEGY_ORDER,
    ParamCount,
    Strategy,
    activation_bytes,
    checkpoint_bytes,
    checkpoint_save_s,
    count_params,
    model_state_bytes,
    pin_strategy,
    plan_job,
    refusals,
)
from hpcds.spec import load_spec

# (total params, largest layer): the presets' true counts, plus odd sizes that exercise DeepSpeed's int() truncation
MODELS = {
    "7b_mamba": (6_922_702_592, 244_450_048),
    "3b_mamba": (2_761_866_240, 180_121_088),
    "gpt2-xl": (1_557_611_200, 80_411_200),
    "odd": (123_456_789, 9_876_543),
}
# (model, GPUs per node, nodes)
LAYOUTS = [
    ("7b_mamba", 4, 1),
    ("7b_mamba", 6, 1),
    ("7b_mamba", 8, 1),
    ("7b_mamba", 8, 2),
    ("3b_mamba", 4, 1),
    ("3b_mamba", 3, 3),
    ("gpt2-xl", 1, 1),
    ("gpt2-xl", 2, 4),
    ("odd", 7, 1),
    ("odd", 5, 3),
]
ZERO2 = [(Strategy(2), False), (Strategy(2, offload_optimizer=True), True)]
ZERO3 = [
    (Strategy(3), (False, False)),
    (Strategy(3, offload_optimizer=True), (True, False)),
    (Strategy(3, offload_optimizer=True, offload_params=True), (True, True)),
]


@pytest.fixture(scope="module")
def ds():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    return stage_1_and_2, stage3


def _count(model: str) -> ParamCount:
    total, largest = MODELS[model]
    return ParamCount(total=total, trainable=total, frozen=0, largest_layer=largest)


@pytest.mark.parametrize(("model", "gpus", "nodes"), LAYOUTS)
def test_model_states_equal_deepspeed_estimators_to_the_byte(ds, model, gpus, nodes):
    stage12, stage3 = ds
    params = _count(model)
    for strategy, offload in ZERO2:  # 10 layouts x 5 strategies = 50 cases
        cpu_ds, gpu_ds = stage12.estimate_zero2_model_states_mem_needs(
            params.total, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=offload
        )
        p, g, o, cpu = model_state_bytes(strategy, params, gpus, nodes, "bf16")
        assert (p + g + o, cpu) == (gpu_ds, cpu_ds), strategy.name
    for strategy, (off_opt, off_par) in ZERO3:
        cpu_ds, gpu_ds, _ = stage3.estimate_zero3_model_states_mem_needs(
            params.total,
            params.largest_layer,
            num_gpus_per_node=gpus,
            num_nodes=nodes,
            cpu_offload=off_opt,
            cpu_offload_params=off_par,
            zero_init=True,
        )
        p, g, o, cpu = model_state_bytes(strategy, params, gpus, nodes, "bf16")
        assert (p + g + o, cpu) == (gpu_ds, cpu_ds), strategy.name


def _printed(text: str) -> list[tuple[str, str, str]]:
    return re.findall(r"^\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", text, re.MULTILINE)


@pytest.mark.parametrize("gpus", [4, 6, 8])
def test_all_cold_printouts_match_the_plan_for_7b_mamba(ds, capsys, gpus):
    """The `_all_cold` helpers print their table; the planner's rows print the same numbers."""
    stage12, stage3 = ds
    params = _count("7b_mamba")
    stage12.estimate_zero2_model_states_mem_needs_all_cold(params.total, num_gpus_per_node=gpus)
    zero2 = _printed(capsys.readouterr().out)
    stage3.estimate_zero3_model_states_mem_needs_all_cold(params.total, params.largest_layer, num_gpus_per_node=gpus)
    zero3 = [row for row in _printed(capsys.readouterr().out) if row[2].endswith("zero_init=1")]
    # The options column names the offload device ("cpu", or "OffloadDeviceEnum.cpu" on some Pythons) or "none".
    for cpu_gb, gpu_gb, options in zero2:
        strategy = Strategy(2, "offload_optimizer=none" not in options)
        p, g, o, cpu = model_state_bytes(strategy, params, gpus, 1)
        assert (f"{cpu / GIB:.2f}", f"{(p + g + o) / GIB:.2f}") == (cpu_gb, gpu_gb)
    for cpu_gb, gpu_gb, options in zero3:
        strategy = Strategy(3, "offload_optimizer=none" not in options, "offload_param=none" not in options)
        p, g, o, cpu = model_state_bytes(strategy, params, gpus, 1)
        assert (f"{cpu / GIB:.2f}", f"{(p + g + o) / GIB:.2f}") == (cpu_gb, gpu_gb)
    assert len(zero2) == 2 and len(zero3) == 3


def test_zero0_and_zero1_follow_the_same_bookkeeping():
    params = _count("odd")
    total = params.total
    p, g, o, _ = model_state_bytes(Strategy(0), params, 4, 1)
    assert (p, g, o) == (2 * total, 6 * total, 12 * total)  # 20 bytes per parameter, nothing sharded
    p, g, o, _ = model_state_bytes(Strategy(1), params, 4, 1)
    assert p + g + o == 4 * total + int(16 * total / 4)  # only fp32 master, fp32 gradients and Adam sharded
    p, g, o, _ = model_state_bytes(Strategy(0), params, 4, 1, "fp32")
    assert p + g + o == 16 * total  # fp32 weights and gradients, Adam moments, no master copy


def test_gpt_activations_equal_korthikanti_table_2():
    spec = load_spec(None, preset="gpt2-xl")
    model = spec.model
    s, b, h, a, n_layer = model.max_seq_len, 2, model.d_model, model.n_head, model.n_layer
    logits = b * s * model.vocab_size * (2 + 4 + 4)
    final = b * s * (4 * h + 4)  # ln_f input and statistics, LM head input
    per_layer = s * b * h * (34 + 5 * a * s / h)
    no_recompute = activation_bytes(model, b, s, "bf16", checkpointing=False)
    assert no_recompute == pytest.approx(n_layer * per_layer + final + logits)
    with_recompute = activation_bytes(model, b, s, "bf16", checkpointing=True)
    assert with_recompute == pytest.approx(n_layer * 2 * s * b * h + per_layer + final + logits)


def test_mamba_activations_per_token_and_layer():
    spec = load_spec(None, preset="7b_mamba")
    model = spec.model
    d, di, n, rank = 4864, 9728, 16, 304
    # docs/memory.md, Mamba table: norm 4d + 2·2d, xz 2·2di, x_dbl 2(R+2N), B and C 2·2N, scan output 2di
    per_token = 4 * d + 4 * d + 4 * di + 2 * (rank + 2 * n) + 4 * n + 2 * di
    scan_states = di * 2 * 2 * n * 4  # two 2048-token chunks of fp32 (d_inner, 2N) states
    logits = 4096 * model.vocab_size * 10
    final = 4096 * (4 * d + 4 * d)  # norm_f: fp32 input, 16-bit normalised output, LM head input
    expected = model.n_layer * (4096 * per_token + scan_states) + final + logits
    assert activation_bytes(model, 1, 4096, "bf16", checkpointing=False) == expected


def _plan_spec(gpus: int, *sets: str, preset: str = "7b_mamba"):
    return load_spec(None, list(sets), {"gpus_per_node": gpus}, preset=preset)


def test_7b_mamba_on_24gb_cards():
    no_fit = plan_job(_plan_spec(4), gpu_mem_gb=24)
    assert not no_fit.row(Strategy(2)).fits and not no_fit.row(Strategy(2, True)).fits
    ckpt = plan_job(_plan_spec(8, "training.activation_checkpointing=true"), gpu_mem_gb=24)
    assert ckpt.recommended.strategy == Strategy(2, offload_optimizer=True)
    assert ckpt.params.total == 6_922_702_592
    assert ckpt.flops_per_token == pytest.approx(6 * 6.92e9, rel=0.01)


def test_recommendation_is_the_first_fitting_strategy_in_order():
    plan = plan_job(_plan_spec(8, "training.activation_checkpointing=true"), gpu_mem_gb=80)
    fitting = [r.strategy for r in plan.rows if r.fits]
    assert plan.recommended.strategy == fitting[0] == next(s for s in STRATEGY_ORDER if s in fitting)
    assert [r.strategy for r in plan.rows] == list(STRATEGY_ORDER)


def test_pin_strategy_resolves_auto_and_keeps_fixed_stages():
    spec = _plan_spec(8, "training.activation_checkpointing=true", "slurm.gpu_mem_gb=24")
    pinned = pin_strategy(spec)
    assert pinned.deepspeed.zero_stage == 2 and pinned.deepspeed.offload_optimizer == "cpu"
    assert pinned.deepspeed.offload_params == "none" and spec.deepspeed.zero_stage == "auto"
    fixed = _plan_spec(8, "deepspeed.zero_stage=3", "slurm.gpu_mem_gb=24")
    assert pin_strategy(fixed) is fixed
    big = _plan_spec(8, "training.activation_checkpointing=true", "slurm.gpu_mem_gb=80")
    assert pin_strategy(big).deepspeed.zero_stage == 1 and pin_strategy(big).deepspeed.offload_optimizer == "none"


def test_pin_strategy_keeps_the_offload_device_the_spec_asked_for():
    spec = _plan_spec(8, "deepspeed.offload_optimizer=nvme", "deepspeed.nvme_path=/nvme", "slurm.gpu_mem_gb=80")
    pinned = pin_strategy(spec)
    assert pinned.deepspeed.offload_optimizer == "nvme" and pinned.deepspeed.zero_stage in (1, 2, 3)


def test_nothing_fits_says_by_how_much_and_what_to_do():
    spec = _plan_spec(1, "slurm.gpu_mem_gb=8", "training.micro_batch_size=8")
    with pytest.raises(HpcdsError) as caught:
        pin_strategy(spec)
    text = str(caught.value)
    assert "6.92B parameters" in text and "GiB per GPU" in text
    assert "micro_batch_size" in text and "activation_checkpointing" in text and "--nodes" in text


def test_cpu_ram_limit_from_slurm_mem():
    spec = _plan_spec(4, "slurm.mem=64G", "training.activation_checkpointing=true", "slurm.gpu_mem_gb=80")
    plan = plan_job(spec)
    offload = plan.row(Strategy(3, True, True))
    assert offload.cpu_bytes_per_node > 64 * GIB and not offload.fits


def test_checkpoint_size_and_save_time():
    params = ParamCount(total=1000, trainable=100, frozen=900, largest_layer=10)
    assert checkpoint_bytes(params, "bf16") == 1000 * 2 + 100 * 12
    assert checkpoint_save_s(2 * 10**9, bandwidth_gb_s=0.5) == pytest.approx(4.0)


def test_hf_without_sizes_asks_for_them(tmp_path):
    spec = load_spec(None, flags={}, sets=["name=x", "model.type=hf", f"model.path={tmp_path}"])
    with pytest.raises(HpcdsError, match=r"model\.d_model, model\.n_layer"):
        count_params(spec.model)
    # a config.json without model_type: no layout, and transformers cannot build it to count it; no Llama guess
    (tmp_path / "config.json").write_text(
        json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 100})
    )
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(f"name: x\nmodel:\n  type: hf\n  path: {tmp_path}\n")
    result = CliRunner().invoke(cli, ["plan", str(spec_path), "--json"])
    assert result.exit_code == 1 and isinstance(result.exception, HpcdsError)
    assert "names no model_type" in str(result.exception) and "hint: set model.n_params" in str(result.exception)
    # the person names the layout: planned as Llama blocks from the file's sizes
    spec_path.write_text(f"name: x\nmodel:\n  type: hf\n  path: {tmp_path}\n  hf_arch: llama\n")
    result = CliRunner().invoke(cli, ["plan", str(spec_path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["params"] == 100 * 64 * 2 + 2 * (4 * 64 * 64 + 3 * 64 * 96 + 2 * 64) + 64


def test_cli_json_and_table():
    args = ["plan", "--preset", "7b_mamba", "--gpus-per-node", "8", "--gpu-mem-gb", "24"]
    result = CliRunner().invoke(cli, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["params"] == pytest.approx(6.92e9, rel=0.001)
    assert len(data["strategies"]) == len(STRATEGY_ORDER)
    assert {"stage", "params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes", "fits"} <= set(
        data["strategies"][0]
    )
    table = CliRunner().invoke(cli, [*args, "--set", "training.activation_checkpointing=true"])
    assert table.exit_code == 0, table.output
    assert "recommended" in table.output and "ZeRO-2 + optimizer→CPU" in table.output
    assert "6,922,702,592" in table.output


def test_plan_command_stays_light():
    code = (
        "import sys; from hpcds.cli import main\n"
        "try: main(['plan', '--preset', 'gpt2-xl', '--json'])\n"
        "except SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'transformers', 'wandb') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_a_fixed_stage_is_reported_as_the_specs_own_choice():
    spec = _plan_spec(4, "deepspeed.zero_stage=2", "slurm.gpu_mem_gb=24", "training.activation_checkpointing=true")
    plan = plan_job(spec)
    assert plan.chosen.strategy == Strategy(2) and not plan.chosen.fits
    assert plan.recommended.strategy == Strategy(2, offload_optimizer=True)  # the same stage, with offload
    assert plan_job(_plan_spec(4)).chosen is None
    result = CliRunner().invoke(cli, ["plan", "--preset", "7b_mamba", "--gpus-per-node", "4", "--gpu-mem-gb", "24",
                                      "--set", "deepspeed.zero_stage=2"])  # fmt: skip
    assert result.exit_code == 0 and "ZeRO-2 does not fit" in result.output


@pytest.mark.parametrize("preset", ["quickstart", "1b_mamba", "gpt2-xl"])
def test_fp32_layers_cost_more_than_bf16_but_the_loss_less(preset):
    model = load_spec(None, preset=preset).model
    tokens_x_vocab = 2 * 64 * model.vocab_size
    for checkpointing in (False, True):
        # bf16 keeps 16-bit logits, their fp32 copy and the fp32 log-softmax (10 B); fp32 needs no copy (8 B).
        bf16 = activation_bytes(model, 2, 64, "bf16", checkpointing) - 10 * tokens_x_vocab
        fp32 = activation_bytes(model, 2, 64, "fp32", checkpointing) - 8 * tokens_x_vocab
        assert bf16 < fp32 <= 2 * bf16


def test_mamba2_plans():
    spec = load_spec(None, ["model.type=mamba2", "model.head_dim=64"], {"gpus_per_node": 2}, preset="1b_mamba")
    plan = plan_job(spec, gpu_mem_gb=80)
    assert plan.recommended is not None and plan.params.total > 0.5e9


def test_communication_buckets_follow_the_rendered_deepspeed_config():
    from hpcds.plan import bucket_bytes

    spec = _plan_spec(4)
    params = count_params(spec.model)
    # ZeRO-1/2: reduce_bucket_size (5e8) allocated twice with overlap_comm, in bf16
    assert bucket_bytes(spec, Strategy(2), params) == 2 * 500_000_000 * 2
    small = _plan_spec(4, "deepspeed.config.zero_optimization.reduce_bucket_size=200000000")
    assert bucket_bytes(small, Strategy(2, offload_optimizer=True), params) == 2 * 200_000_000 * 2
    d = spec.model.d_model  # ZeRO-3: a reduce bucket of d² and a prefetch bucket of 0.9 d²
    assert bucket_bytes(spec, Strategy(3), params) == (d * d + int(0.9 * d * d)) * 2
    row = plan_job(spec, gpu_mem_gb=80).row(Strategy(2))
    assert row.total_bytes == row.model_state_bytes + row.activations_bytes + row.buffers_bytes


def test_lora_cpu_ram_charges_optimizer_state_to_the_adapters_only():
    """Offloaded optimizer state is 16 B per trainable parameter; loading and offloaded weights hold every weight."""
    total, trainable, largest = 8_234_382_336, 43_646_976, 622_329_856  # Qwen3-8B + r-16 adapters on every projection
    lora = ParamCount(total=total, trainable=trainable, frozen=total - trainable, largest_layer=largest)
    gpus, nodes = 4, 2

    def cpu(strategy: Strategy) -> int:
        return model_state_bytes(strategy, lora, gpus, nodes)[3]

    # ZeRO-2: every rank first loads the whole model in fp32 (4 B), DeepSpeed's 4 B x GPUs in the job when offloading
    assert cpu(Strategy(2)) == int(total * 4 * gpus * 1.5)
    assert cpu(Strategy(2, offload_optimizer=True)) == int(total * 4 * gpus * nodes * 1.5)
    # ZeRO-3: fp32 master, Adam moments and fp32 gradients (16 B) for the adapters, + 2 B per offloaded 16-bit weight
    assert cpu(Strategy(3)) == int(largest * 4 * gpus * 1.5)
    assert cpu(Strategy(3, offload_optimizer=True)) == int(trainable * 16 / nodes * 1.5)
    assert cpu(Strategy(3, True, True)) == int((2 * total + 16 * trainable) / nodes * 1.5)
    # few GPUs and mostly trainable weights: ZeRO-2's optimizer state outgrows the loading copies
    most = ParamCount(total=1000, trainable=900, frozen=100, largest_layer=10)
    assert model_state_bytes(Strategy(2, offload_optimizer=True), most, 2, 1)[3] == int(900 * 16 * 1.5)


def test_lora_configs_cpu_column_follows_the_adapters():
    """Qwen3-8B LoRA with parameters and optimizer offloaded: the bf16 base and the adapters' states, not 18 B/param."""
    spec = load_spec("configs/qwen3-8b-lora-zero3.yaml")
    plan = plan_job(spec)
    params = plan.params
    row = plan.row(Strategy(3, offload_optimizer=True, offload_params=True))
    deepspeed_cpu = row.cpu_bytes_per_node - row.snapshot_bytes_per_node  # less the asynchronous save's copy
    assert deepspeed_cpu == int((2 * params.total + 16 * params.trainable) * 1.5)
    assert deepspeed_cpu < 25 * GIB < params.total * 18


def _hf_folder(tmp_path, config: dict, spec_lines: str = ""):
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(f"name: x\nmodel:\n  type: hf\n  path: {tmp_path}\n{spec_lines}")
    return spec_path


QWEN3_CONFIG = {
    "model_type": "qwen3",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "vocab_size": 300,
    "tie_word_embeddings": True,
}


def test_plan_reads_the_whole_shape_from_config_json_and_says_so(tmp_path):
    spec_path = _hf_folder(tmp_path, QWEN3_CONFIG)
    result = CliRunner().invoke(cli, ["plan", str(spec_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    # embedding (tied, once) + final norm + per block: q 64·128, k and v 64·32, o 128·64, MLP 3·64·96, q/k norms of
    # 16 each, two 64-wide norms
    block = 64 * 128 + 2 * 64 * 32 + 128 * 64 + 3 * 64 * 96 + 2 * 16 + 2 * 64
    assert data["params"] == 300 * 64 + 64 + 2 * block
    read = [note for note in data["notes"] if note.startswith("read from")]
    fields = ("d_model", "n_layer", "n_head", "n_kv_head", "attn_head_dim", "d_ff", "tie_embeddings", "hf_arch")
    assert len(read) == 1 and all(f"model.{name}" in read[0] for name in fields)
    table = CliRunner().invoke(cli, ["plan", str(spec_path)])
    assert table.exit_code == 0 and "note: read from" in table.output


def test_plan_keeps_the_specs_shape_fields_and_reports_differences(tmp_path):
    spec_path = _hf_folder(tmp_path, QWEN3_CONFIG, "  n_head: 8\n  n_kv_head: 8\n  tie_embeddings: false\n")
    data = json.loads(CliRunner().invoke(cli, ["plan", str(spec_path), "--json"]).output)
    notes = " | ".join(data["notes"])
    assert "model.n_kv_head is 8 in the spec, 2 in" in notes and "model.tie_embeddings is False" in notes
    other_layout = _hf_folder(tmp_path, QWEN3_CONFIG, "  hf_arch: llama\n")
    notes = json.loads(CliRunner().invoke(cli, ["plan", str(other_layout), "--json"]).output)["notes"]
    assert any("model.hf_arch is llama in the spec, qwen3 in" in note for note in notes)
    # planned as the spec says (multi-head, untied), the rest from config.json
    block = 4 * 64 * 128 + 3 * 64 * 96 + 2 * 16 + 2 * 64
    assert data["params"] == 2 * 300 * 64 + 64 + 2 * block


def test_plan_reads_gemma3s_text_config_and_rejects_a_bad_shape(tmp_path):
    text = {**QWEN3_CONFIG, "model_type": "gemma3_text", "num_key_value_heads": 4}
    del text["tie_word_embeddings"]  # Gemma 3 configs leave it out: tied by default
    spec_path = _hf_folder(tmp_path, {"model_type": "gemma3", "text_config": text, "vision_config": {}})
    data = json.loads(CliRunner().invoke(cli, ["plan", str(spec_path), "--json"]).output)
    block = 64 * 128 + 2 * 64 * 64 + 128 * 64 + 3 * 64 * 96 + 2 * 16 + 4 * 64  # four norms per Gemma 3 block
    assert data["params"] == 300 * 64 + 64 + 2 * block
    bad = _hf_folder(tmp_path, {**QWEN3_CONFIG, "num_key_value_heads": 3})
    result = CliRunner().invoke(cli, ["plan", str(bad)])
    assert result.exit_code == 1 and isinstance(result.exception, HpcdsError)
    assert "model.n_kv_head" in str(result.exception) and "hint:" in str(result.exception)
    # Phi-3's blocks hold Llama's weights (q/k/v and gate/up fused into matrices of the same sizes)
    phi3 = _hf_folder(tmp_path, {**QWEN3_CONFIG, "model_type": "phi3"})
    notes = json.loads(CliRunner().invoke(cli, ["plan", str(phi3), "--json"]).output)["notes"]
    assert any(note.startswith("read from") and "model.hf_arch" in note for note in notes)


# config.json as transformers writes it: only the values that differ from the config class's defaults (transformers 4's
# to_diff_dict; 5 writes every field). google/gemma-3-4b-it's file, written by transformers 4.50, gives the text model
# neither vocab_size (262208), num_attention_heads (8), num_key_value_heads (4) nor head_dim (256).
GEMMA3_4B_CONFIG = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 896,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
        "vision_use_head": False,
    },
}


def _save_diff(config, folder, omitted: tuple[str, ...]) -> dict:
    """save_pretrained, then drop what equals the class's defaults (as transformers 4 writes it); returns the file."""
    config.save_pretrained(folder)
    path = folder / "config.json"
    written = json.loads(path.read_text())
    nested = "text_config" in written
    text, cls = (written["text_config"], type(config.text_config)) if nested else (written, type(config))
    defaults = cls().to_dict()
    for key in [k for k in text if k != "model_type" and text[k] == defaults.get(k)]:
        del text[key]
    path.write_text(json.dumps(written, indent=2))
    assert not set(omitted) & set(text), "the file must omit the fields left at their defaults"
    return written


def _built_count(folder) -> int:
    """Parameters of the model transformers builds from the folder (meta device); Gemma 3: its text model."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    text = config.text_config if config.model_type == "gemma3" else config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(text)
    return sum(p.numel() for p in model.parameters())


def _planned(folder, spec_lines: str = "") -> dict:
    spec_path = folder / "job.yaml"
    spec_path.write_text(f"name: x\nmodel:\n  type: hf\n  path: {folder}\n{spec_lines}")
    result = CliRunner().invoke(cli, ["plan", str(spec_path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_gemma3_4b_config_as_published_plans_the_real_count(tmp_path):
    """The text model of Gemma 3 4B: 3.88B with transformers' defaults, not 3.34B with vocab 50,257 and 8 kv heads."""
    (tmp_path / "config.json").write_text(json.dumps(GEMMA3_4B_CONFIG))
    data = _planned(tmp_path)
    assert data["params"] == _built_count(tmp_path) == 3_880_263_168
    notes = " | ".join(data["notes"])
    assert "transformers' defaults for model_type 'gemma3_text'" in notes
    assert "model.vocab_size 262208" in notes and "model.n_kv_head 4" in notes and "model.attn_head_dim 256" in notes
    assert "model.d_model" in next(note for note in data["notes"] if note.startswith("read from"))
    # the spec still wins, and the note names the default it overrides
    kept = _planned(tmp_path, "  vocab_size: 300000\n")
    assert kept["params"] == 3_880_263_168 + (300000 - 262208) * 2560
    assert any("model.vocab_size is 300000 in the spec, 262208 in transformers' default" in n for n in kept["notes"])


def _transformers_configs():
    transformers = pytest.importorskip("transformers")
    small = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96}
    return [  # (config, the fields it leaves at their defaults)
        (transformers.Qwen3Config(**small), ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim")),
        (
            transformers.Qwen3Config(**small, num_attention_heads=4, num_key_value_heads=2, vocab_size=300),
            ("head_dim",),
        ),
        # Llama's None defaults (n_kv_head = n_head, head_dim = width / heads) are resolved before writing: kept
        (transformers.LlamaConfig(**small, num_attention_heads=4), ("vocab_size", "tie_word_embeddings")),
        (transformers.MistralConfig(**small, num_attention_heads=16, vocab_size=300), ("num_key_value_heads",)),
        (transformers.Qwen2Config(**small), ("vocab_size", "num_attention_heads", "num_key_value_heads")),
        (
            transformers.Gemma3Config(text_config={**small, "num_attention_heads": 4}),
            ("vocab_size", "num_key_value_heads", "head_dim", "tie_word_embeddings"),
        ),
        (transformers.Gemma3TextConfig(**small, num_attention_heads=4, vocab_size=300), ("num_key_value_heads",)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_config_json_written_by_transformers_plans_what_transformers_builds(tmp_path, case):
    config, omitted = _transformers_configs()[case]
    _save_diff(config, tmp_path, omitted)
    data = _planned(tmp_path)
    assert data["params"] == _built_count(tmp_path)
    assert any("transformers' defaults for model_type" in note for note in data["notes"])


def test_fields_nobody_gives_are_named_in_the_notes(tmp_path):
    """A model_type without a layout or known defaults: counted on the meta device; the notes name the fields the
    activation estimate had to take from the spec's defaults."""
    config = {"model_type": "starcoder2", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96}
    (tmp_path / "config.json").write_text(json.dumps(config))
    data = _planned(tmp_path)
    notes = " | ".join(data["notes"])
    assert (
        "gives no model.n_head, model.n_kv_head, model.attn_head_dim, model.vocab_size, model.tie_embeddings" in notes
    )
    assert "no transformers defaults for model_type 'starcoder2'" in notes and "the spec default 50257" in notes
    assert "counted by transformers on the meta device" in notes and data["params"] == _built_count(tmp_path)
    llama = {**config, "model_type": "llama", "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    notes = " | ".join(_planned(tmp_path)["notes"])
    assert "model.vocab_size 32000" in notes and "model.n_kv_head = n_head" in notes


def test_plan_with_a_local_folder_stays_light(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GEMMA3_4B_CONFIG))
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(f"name: x\nmodel:\n  type: hf\n  path: {tmp_path}\n")
    code = (
        "import sys; from hpcds.cli import main\n"
        f"try: main(['plan', {str(spec_path)!r}, '--json'])\n"
        "except SystemExit as exc: assert not exc.code, exc.code\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'transformers', 'wandb') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("nodes", [None, 2])
@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_plans_a_strategy_that_fits_its_hardware(config, nodes):
    from hpcds.model_folder import with_folder_shape
    from hpcds.plan import lead_shortfall, misfit

    spec, _ = with_folder_shape(load_spec(config, [], {"nodes": nodes}))
    pinned = pin_strategy(spec)
    assert misfit(pinned) is None and lead_shortfall(pinned) is None
    if pinned.slurm.gpus_per_node:
        assert plan_job(pinned).chosen.fits


def test_a_pinned_strategy_that_does_not_fit_is_refused_unless_forced(tmp_path, capsys):
    from hpcds.cli import main

    args = ["--preset", "7b_mamba", "--nodes", "2", "--gpus-per-node", "4", "--set", "slurm.gpu_mem_gb=24"]
    args += ["--set", "deepspeed.zero_stage=2", "--set", "training.activation_checkpointing=true"]
    for command in (["submit", "--dry-run"], ["render"]):
        with pytest.raises(SystemExit) as exited:
            main([*command, *args, "--runs-dir", str(tmp_path)])
        err = " ".join(capsys.readouterr().err.split())
        assert exited.value.code == 1 and "deepspeed: ZeRO-2 does not fit 6.92B parameters" in err, err
        assert "GiB short per GPU" in err and "strategies that fit: ZeRO-2 + optimizer→CPU" in err
    assert not list(tmp_path.iterdir())  # nothing created
    main(["submit", "--dry-run", *args, "--runs-dir", str(tmp_path), "--force"])
    (run_dir,) = runs.list_runs(tmp_path)
    (forced,) = [e for e in runs.read_events(run_dir) if e["event"] == "forced"]
    assert forced["verdict"].startswith("deepspeed: ZeRO-2 does not fit")


def test_a_warning_lead_too_short_for_the_checkpoint_is_refused_with_the_numbers(tmp_path, capsys):
    from hpcds.cli import main

    # 7B Mamba: 90.3 GiB per save; at 1 GB/s (the default) a save takes 97 s, so the lead needs 2 x 97 + 30 = 224 s.
    args = ["--preset", "7b_mamba", "--nodes", "2", "--gpus-per-node", "4", "--set", "slurm.gpu_mem_gb=80"]
    args += ["--set", "slurm.signal_lead_s=200", "--runs-dir", str(tmp_path)]
    with pytest.raises(SystemExit):
        main(["submit", "--dry-run", *args])
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "slurm.signal_lead_s: 200 s is shorter than 2 x 97 s (a 90.3 GiB checkpoint at checkpoint.write_gbps 1)" in err
    )
    assert "+ 30 s = 224 s" in err and not list(tmp_path.iterdir())
    main(["submit", "--dry-run", *args, "--set", "checkpoint.write_gbps=4"])  # a faster file system: 2 x 24 + 30 s
    assert len(runs.list_runs(tmp_path)) == 1


def test_async_save_host_copy_is_counted_and_refused_where_it_does_not_fit():
    """7B Mamba on 2 nodes x 4 GPUs, ZeRO-2 + optimizer offload, bf16: the copy on rank 0's node is the bf16 weights
    whole (rank 0 writes them) and the node's half of the fp32 master weights and moments."""
    sets = ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu", "slurm.nodes=2"]
    roomy = plan_job(_plan_spec(4, *sets, "slurm.mem=512G"))
    params, row = roomy.params, roomy.chosen
    assert row.snapshot_bytes_per_node == int(params.total * 2 + params.trainable * 12 / 2)
    assert row.cpu_bytes_per_node == model_state_bytes(Strategy(2, True), params, 4, 2)[3] + row.snapshot_bytes_per_node
    assert roomy.async_save and "periodic saves are asynchronous: a 51.6 GiB host copy per node" in roomy.notes[0]

    # 340 GiB holds what DeepSpeed needs on the node (309.5 GiB) but not the copy beside it: synchronous, and said.
    tight = plan_job(_plan_spec(4, *sets, "slurm.mem=340G"))
    assert not tight.async_save and tight.chosen.snapshot_bytes_per_node == 0 and tight.chosen.fits
    assert "does not fit slurm.mem (340 GiB)" in tight.async_save_reason and tight.async_save_reason in tight.notes
    assert refusals(_plan_spec(4, *sets, "slurm.mem=340G")) == []  # auto falls back; only `true` is refused
    (refused,) = refusals(_plan_spec(4, *sets, "slurm.mem=340G", "checkpoint.async_save=true"))
    assert refused.startswith("checkpoint.async_save: periodic saves are synchronous") and "hint:" in refused

    off = plan_job(_plan_spec(4, *sets, "checkpoint.async_save=false"))
    assert not off.async_save and off.chosen.snapshot_bytes_per_node == 0
    args = ["plan", "--preset", "7b_mamba", "--gpus-per-node", "4", "--nodes", "2", "--json"]
    data = json.loads(CliRunner().invoke(cli, [*args, "--set", "slurm.mem=340G", *(f"--set={s}" for s in sets)]).output)
    assert data["async_save"] is False and data["async_save_reason"] in data["notes"]


def test_a_cpu_rank_spec_the_planner_cannot_count_is_judged_only_on_what_it_asks():
    """A CPU-rank spec of an hf model folder whose shape is not filled in trains (tests, debugging): nothing to
    refuse. Asking for background saves needs the copy's size, which the planner then cannot give."""
    from hpcds.errors import HpcdsError
    from hpcds.plan.strategy import refusals
    from hpcds.spec import validate_spec

    tree = {"name": "x", "model": {"type": "hf", "path": "/no/such/folder"}, "slurm": {"gpus_per_node": 0}}
    tree["deepspeed"] = {"zero_stage": 2}
    assert refusals(validate_spec(tree)) == []
    with pytest.raises(HpcdsError, match="d_model"):
        refusals(validate_spec(tree | {"checkpoint": {"async_save": True}}))
