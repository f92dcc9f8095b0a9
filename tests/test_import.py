"""`hpcds import`: specs written from what people already have (another tool's training YAML, a DeepSpeed JSON, a
model folder), taken from the public files in tests/fixtures (sources in their SOURCES.md)."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from hpcds.cli import main
from hpcds.spec import load_spec
from hpcds.spec.foreign import FOREIGN_KEYS, import_tree
from hpcds.spec.tree import get_path

FIXTURES = Path(__file__).parent / "fixtures"
FOREIGN = FIXTURES / "foreign_yaml"
TINY_QWEN3 = FIXTURES / "tiny-qwen3"


def imported(tmp_path, capsys, *args: str) -> tuple[int, Path, str]:
    out = tmp_path / "imported.yaml"
    try:
        main(["import", *args, "-o", str(out)])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, out, " ".join(capsys.readouterr().err.split())


def test_llamafactory_lora_yaml_becomes_a_spec_that_loads_and_lists_the_rest(tmp_path, capsys, monkeypatch):
    # LLaMA-Factory names its DeepSpeed file from where it is run: lay it out as in its repository.
    (tmp_path / "examples" / "deepspeed").mkdir(parents=True)
    ds_file = FIXTURES / "ds_configs" / "llamafactory_ds_z3_config.json"
    shutil.copy(ds_file, tmp_path / "examples" / "deepspeed" / "ds_z3_config.json")
    monkeypatch.chdir(tmp_path)
    source = FOREIGN / "llamafactory_qwen3_lora_sft_ds3.yaml"
    code, out, err = imported(tmp_path, capsys, str(source), "--model", str(TINY_QWEN3))
    assert code == 0, err
    spec = load_spec(out)
    model = spec.model
    assert (model.type, model.path, model.lora.r, model.max_seq_len) == ("hf", str(TINY_QWEN3), 8, 2048)
    training = spec.training
    assert (training.lr, training.micro_batch_size, training.grad_accum_steps) == (1e-4, 1, 2)
    assert (training.precision, training.decay, training.log_interval_steps) == ("bf16", "cosine", 10)
    assert (spec.deepspeed.zero_stage, spec.checkpoint.every_steps, spec.wandb.mode) == (3, 500, "disabled")
    # Every key of the source is either carried over (its field is in the written spec) or listed with its reason.
    written = yaml.safe_load(out.read_text())
    listed = {line.split(":")[0].strip("# ") for line in out.read_text().splitlines() if line.startswith("#   ")}
    for key in yaml.safe_load(source.read_text()):
        field = "deepspeed.config" if key == "deepspeed" else FOREIGN_KEYS.get(key, (None,))[0]
        carried = field is not None and get_path(written, field) is not None
        assert carried != (key in listed), (key, field)
    assert "num_train_epochs: 3.0  # hpcds calls this training.max_steps" in out.read_text()


def test_gpt_neox_yaml_keeps_deepspeeds_keys_as_deepspeed_config_and_says_what_is_missing(tmp_path, capsys):
    code, out, err = imported(tmp_path, capsys, str(FOREIGN / "gptneox_125M.yml"))
    assert code == 1 and "model.type: is required" in err and "Traceback" not in err
    written = yaml.safe_load(out.read_text())
    assert written["deepspeed"]["config"]["zero_optimization"]["stage"] == 1
    shape = {"n_layer": 12, "d_model": 768, "n_head": 12, "max_seq_len": 2048, "tie_embeddings": False}
    assert written["model"] == shape
    assert written["training"]["max_steps"] == 320000 and written["training"]["warmup_steps"] == 3200  # 0.01 of it


def test_a_deepspeed_json_and_a_model_folder_make_a_spec(tmp_path, capsys):
    ds_file = FIXTURES / "ds_configs" / "llamafactory_ds_z2_offload_config.json"
    code, out, err = imported(tmp_path, capsys, str(ds_file), "--model", str(TINY_QWEN3), "--name", "z2")
    assert code == 0, err
    spec = load_spec(out)
    assert (spec.name, spec.deepspeed.zero_stage, spec.deepspeed.offload_optimizer) == ("z2", 2, "cpu")
    assert spec.model.path == str(TINY_QWEN3)


def test_keys_that_name_one_field_twice_keep_the_first_and_list_the_rest():
    tree, notes = import_tree(
        {
            "lora_rank": 8,
            "lora_target": "q_proj,v_proj",
            "finetuning_type": "lora",
            "train_iters": 1000,
            "lr_decay_iters": 800,
            "learning_rate": 1e-4,
            "max_lr": 3e-4,
        }
    )
    assert tree["model"]["lora"] == {"r": 8, "target_modules": ["q_proj", "v_proj"]}
    assert tree["training"] == {"max_steps": 1000, "lr": 1e-4}
    assert [note.split(":")[0] for note in notes] == ["lr_decay_iters", "max_lr"]
    assert "training.max_steps is already 1000" in notes[0]
    assert import_tree({"max_steps": -1})[0] == {}  # -1: "run the epochs", no step count
