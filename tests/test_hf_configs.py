"""Model folders as users have them: published config.json files (tests/fixtures/hf_configs, sources in SOURCES.md)
planned through `hpcds plan`, the same path the CLI takes, against what transformers builds from them on the meta
device; mixture-of-experts active parameters against an independent count; layout-less folders counted on the meta
device in a child process; mamba / mamba2 specs filled from their folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcds.cli import cli
from hpcds.errors import HpcdsError
from hpcds.spec.hf_config import HF_DEFAULTS, LAYOUT_ASSUMES, read_shape

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

FIXTURES = Path(__file__).parent / "fixtures" / "hf_configs"
NAMES = sorted(p.parent.name for p in FIXTURES.glob("*/config.json"))
# the text model of a multimodal config: what the planner counts (the trainer's LoRA and full runs train it)
TEXT_ONLY = {"gemma-3-4b-it"}


def _config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def _meta_model(config: dict):
    """transformers' own model for a config.json, built on the meta device (no weights, no memory)."""
    hf_config = transformers.AutoConfig.for_model(**config)
    if config.get("text_config") is not None:
        hf_config = hf_config.get_text_config()
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(hf_config)


def _counts(model) -> tuple[int, int]:
    """(total, largest module) as DeepSpeed counts them: shared tensors once; parameters a module holds itself."""
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def _plan(folder: Path, tmp_path: Path, spec_lines: str = "", model_type: str = "hf") -> dict:
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(f"name: x\nmodel:\n  type: {model_type}\n  path: {folder}\n{spec_lines}")
    result = CliRunner().invoke(cli, ["plan", str(spec_path), "--json"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_the_fixtures_are_the_families_people_fine_tune():
    """Every layout has a published file among the fixtures, and SOURCES.md names each fixture's origin."""
    layouts = {read_shape(_config(name)).arch for name in NAMES}
    expected = {"llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi", "gptj", "gpt_neox", "mixtral", "qwen2_moe"}
    assert layouts >= expected | {"qwen3_moe", "mamba", "mamba2"}
    sources = (FIXTURES / "SOURCES.md").read_text()
    assert all(f"`{name}/`" in sources for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_plan_counts_what_transformers_builds(name, tmp_path):
    """`hpcds plan` on the folder: total and ZeRO-3's largest module exactly as transformers builds it (meta device)."""
    data = _plan(FIXTURES / name, tmp_path)
    total, largest = _counts(_meta_model(_config(name)))
    assert data["params"] == total
    assert data["param_count"]["largest_layer"] == largest
    assert not any("meta device" in note for note in data["notes"]), "a fixture with a layout needs no meta count"


def _active_independently(model, config: dict) -> int:
    """Parameters one token passes through: everything but the routed experts, plus top-k of every expert tensor."""
    experts_key = "num_local_experts" if "num_local_experts" in config else "num_experts"
    n_experts, top_k = config[experts_key], config["num_experts_per_tok"]
    routed = [p for name, p in model.named_parameters() if ".experts." in name]
    assert routed and all(p.shape[0] == n_experts for p in routed), "transformers 5 stacks experts on dim 0"
    dense = sum(p.numel() for name, p in model.named_parameters() if ".experts." not in name)
    return dense + sum(p.numel() // n_experts * top_k for p in routed)


@pytest.mark.parametrize("name", ["Mixtral-8x7B-v0.1", "Qwen1.5-MoE-A2.7B", "Qwen3-30B-A3B"])
def test_mixture_of_experts_active_parameters(name, tmp_path):
    config = _config(name)
    data = _plan(FIXTURES / name, tmp_path)
    assert data["params_active"] == _active_independently(_meta_model(config), config)
    assert data["params_active"] < data["params"] == data["param_count"]["total"]
    # ZeRO's model states hold every expert: ZeRO-0's 16-bit weights are 2 bytes for each of the total, not the active
    zero0 = next(row for row in data["strategies"] if row["stage"] == 0 and not row["offload_optimizer"])
    assert zero0["params_bytes"] == 2 * data["params"]


PUBLISHED_ACTIVE = {"Mixtral-8x7B-v0.1": 12.9e9, "Qwen3-30B-A3B": 3.3e9, "Qwen1.5-MoE-A2.7B": 2.7e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED_ACTIVE))
def test_active_parameters_agree_with_the_model_cards(name, tmp_path):
    """The model cards' rounded figures: Mixtral 12.9B active, Qwen3-30B-A3B 3.3B, Qwen1.5-MoE-A2.7B 2.7B."""
    data = _plan(FIXTURES / name, tmp_path)
    assert data["params_active"] == pytest.approx(PUBLISHED_ACTIVE[name], rel=0.02)


def test_defaults_and_assumptions_equal_the_transformers_config_classes():
    """The tables in hpcds.spec.hf_config (kept there because transformers' config code imports torch) must agree
    with the installed transformers: defaults for omitted fields, and the settings each layout counts at."""
    for model_type, defaults in HF_DEFAULTS.items():
        fresh = transformers.AutoConfig.for_model(model_type)
        for key, value in defaults.items():
            if value is None:  # derived as the planner derives an unset field
                # 4 heads, not a class's own default of 32: a fixed default must not pass for a derived one
                width = {"hidden_size": 96, "num_attention_heads": 4, "n_embd": 96, "n_head": 4}
                other = transformers.AutoConfig.for_model(model_type, **width)
                derived = {"num_key_value_heads": 4, "head_dim": 96 // 4}.get(key)
                assert getattr(other, key, derived) in (derived, None), (model_type, key)
            else:
                assert getattr(fresh, key) == value, (model_type, key)
    for model_type, assumed in LAYOUT_ASSUMES.items():
        fresh = transformers.AutoConfig.for_model(model_type)
        for key, value in assumed.items():
            assert getattr(fresh, key) == value, (model_type, key)


def _folder(tmp_path: Path, config: dict, name: str = "model") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("base", "change"),
    [
        ("Llama-3.1-8B-Instruct", {"attention_bias": True}),  # a setting the llama layout does not count
        ("Qwen3-30B-A3B", {"mlp_only_layers": [0, 47], "num_hidden_layers": 48}),  # dense blocks among the experts
        ("Mistral-7B-Instruct-v0.3", {"model_type": "starcoder2", "architectures": ["Starcoder2ForCausalLM"]}),
        ("mamba-2.8b-hf", {"time_step_rank": 100}),  # the layout's dt rank is ceil(hidden_size / 16) = 160
    ],
)
def test_a_folder_without_a_layout_is_counted_on_the_meta_device(base, change, tmp_path):
    config = {**_config(base), **change}
    data = _plan(_folder(tmp_path, config), tmp_path)
    total, largest = _counts(_meta_model(config))
    assert data["params"] == total
    assert any("counted by transformers on the meta device" in note for note in data["notes"])
    # without a layout the largest module is bounded, not known: never below the real one (ZeRO-3 gathers it)
    assert data["param_count"]["largest_layer"] >= largest


def test_a_folder_transformers_cannot_build_is_an_error_with_a_hint(tmp_path):
    remote = {**_config("Mistral-7B-Instruct-v0.3"), "model_type": "my_own_lm"}
    remote["auto_map"] = {"AutoConfig": "configuration_mine.MyConfig"}
    with pytest.raises(HpcdsError, match="could not build it") as info:
        _plan(_folder(tmp_path, remote), tmp_path)
    assert "my_own_lm" in str(info.value) and "hint: set model.n_params" in str(info.value)
    # the person's own count skips the meta device, and is what the planner uses
    data = _plan(tmp_path / "model", tmp_path, "  n_params: 1234567890\n")
    assert data["params"] == 1_234_567_890


@pytest.mark.parametrize(("name", "family"), [("mamba-2.8b-hf", "mamba"), ("Mamba-Codestral-7B-v0.1", "mamba2")])
def test_mamba_specs_take_their_shape_from_the_folder(name, family, tmp_path):
    """model.type mamba / mamba2 with a folder: no shape lines needed; the count is what the trainer builds."""
    from hpcds.spec import load_spec
    from hpcds.train.models import model_config

    data = _plan(FIXTURES / name, tmp_path, model_type=family)
    assert data["params"] == _counts(_meta_model(_config(name)))[0]
    assert any(note.startswith("read from") and "model.d_model" in note for note in data["notes"])
    from hpcds.model_folder import with_folder_shape

    spec, _ = with_folder_shape(load_spec(tmp_path / "job.yaml"))
    with torch.device("meta"):
        built = transformers.AutoModelForCausalLM.from_config(model_config(spec.model))
    assert _counts(built)[0] == data["params"]  # the trainer's own config builds the folder's model


def test_a_mamba_spec_that_disagrees_with_its_folder_fails_early(tmp_path):
    with pytest.raises(HpcdsError, match=r"model\.d_model is 2048 in the spec, 2560 in"):
        _plan(FIXTURES / "mamba-2.8b-hf", tmp_path, "  d_model: 2048\n", model_type="mamba")
    with pytest.raises(HpcdsError, match=r"falcon_mamba model, not mamba; use model\.type hf"):
        _plan(FIXTURES / "falcon-mamba-7b", tmp_path, model_type="mamba")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HpcdsError, match=r"model\.d_model and model\.n_layer not set"):
        _plan(empty, tmp_path, model_type="mamba2")


def test_an_untied_mamba_head_is_built_untied_and_counted(tmp_path):
    """falcon-mamba's head is its own matrix: a mamba spec may say so, the trainer builds it, the planner counts it."""
    from hpcds.plan import count_params
    from hpcds.spec import ModelSpec
    from hpcds.train.models import model_config

    for family in ("mamba", "mamba2"):
        extra = {"head_dim": 16} if family == "mamba2" else {}
        spec = ModelSpec(type=family, d_model=32, n_layer=2, vocab_size=100, tie_embeddings=False, **extra)
        model = transformers.AutoModelForCausalLM.from_config(model_config(spec))
        assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
        assert count_params(spec).total == _counts(model)[0]
        tied = count_params(spec.model_copy(update={"tie_embeddings": None})).total
        assert count_params(spec).total == tied + 100 * 32


def test_other_commands_see_the_filled_shape(tmp_path):
    """render (and submit, run: the same spec_options) see the folder's shape; only plan prints the notes."""
    folder = shutil.copytree(FIXTURES / "Qwen3-30B-A3B", tmp_path / "qwen")
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(f"name: x\nmodel:\n  type: hf\n  path: {folder}\ndeepspeed:\n  zero_stage: 3\n")
    result = CliRunner().invoke(cli, ["render", str(spec_path), "--ds-config", "--force"])  # 30B on one GPU
    assert result.exit_code == 0, result.output
    # ZeRO-3's buckets follow the hidden size (hpcds.plan.memory.zero_buckets): hidden_size² from the folder's file,
    # where a spec without the shape would get DeepSpeed's fixed default
    zero = json.loads(result.stdout)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 2048 * 2048
    assert "read from" not in result.output


def test_flops_of_a_mixture_of_experts_follow_the_active_parameters(tmp_path):
    """6 FLOPs per weight a token passes through (its input embedding is a lookup) plus attention's token mixing."""
    config = _config("Mixtral-8x7B-v0.1")
    data = _plan(FIXTURES / "Mixtral-8x7B-v0.1", tmp_path, "  max_seq_len: 2048\n")
    d, vocab, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    mixing = 3 * layers * 4 * 2048 * config["num_attention_heads"] * (d // config["num_attention_heads"])
    assert data["flops_per_token"] == 6 * (data["params_active"] - vocab * d) + mixing


def test_the_table_shows_active_parameters(tmp_path):
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(f"name: x\nmodel:\n  type: hf\n  path: {FIXTURES / 'Qwen3-30B-A3B'}\n")
    result = CliRunner().invoke(cli, ["plan", str(spec_path)])
    assert result.exit_code == 0, result.output
    assert "parameters: 30,532,122,624 (30.53B), active per token 3,353,032,704 (3.35B)" in result.output


def test_the_meta_count_keeps_the_login_node_command_light(tmp_path):
    """The meta-device count runs in a child: `hpcds plan` itself still imports neither torch nor transformers."""
    import subprocess
    import sys

    config = {**_config("Mistral-7B-Instruct-v0.3"), "model_type": "starcoder2"}
    folder = _folder(tmp_path, config)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(f"name: x\nmodel:\n  type: hf\n  path: {folder}\n")
    code = (
        "import json, sys; from hpcds.cli import main\n"
        f"try: main(['plan', {str(spec_path)!r}, '--json'])\n"
        "except SystemExit as exc: assert not exc.code, exc.code\n"
        "heavy = [m for m in ('torch', 'deepspeed', 'transformers', 'wandb') if m in sys.modules]\n"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["params"] == _counts(_meta_model(config))[0]


def test_expert_fields_are_checked_with_dotted_paths_and_hints():
    from hpcds.errors import SpecError
    from hpcds.spec import load_spec

    def problems(*sets: str) -> str:
        with pytest.raises(SpecError) as info:
            load_spec(None, flags={}, sets=["name=x", "model.type=hf", "model.path=/nowhere", *sets])
        return str(info.value)

    text = problems("model.hf_arch=qwen2_moe", "model.n_experts=8", "model.experts_per_token=9")
    assert "model.expert_d_ff: is required for hf_arch qwen2_moe" in text
    assert "model.shared_expert_d_ff: is required for hf_arch qwen2_moe" in text
    assert "model.experts_per_token: 9 is more than model.n_experts 8" in text and "hint:" in text
    text = problems("model.hf_arch=llama", "model.n_experts=8")
    assert "model.n_experts: applies to the mixture-of-experts layouts" in text
    assert "model.shared_expert_d_ff: hf_arch mixtral has no shared expert" in problems(
        "model.hf_arch=mixtral", "model.n_experts=8", "model.experts_per_token=2", "model.shared_expert_d_ff=8"
    )
    text = problems("model.type=mamba", "model.n_experts=8", "model.tie_embeddings=false", "model.d_model=8")
    assert "model.n_experts: applies to model.type hf only" in text and "tie_embeddings" not in text
