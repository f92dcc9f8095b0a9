"""What CPU can prove about precision and kernels.

bf16 through real DeepSpeed on 2 gloo ranks: a tiny Mamba and a tiny GPT-2 train under ZeRO-2 and ZeRO-3 and resume
bit-identically from a periodic checkpoint (test_resume.py covers the stop signal in fp32; here the straight run's
step-4 checkpoint is the resume point, which saves one launch per case). DeepSpeed keeps every parameter, Mamba's
A_log / D / dt_proj.bias included, as a bf16 copy for the forward pass and an fp32 master copy for the optimizer; the
Mamba case checks both. The kernel decision runs as a pure function for the branches a CPU machine cannot take (a
GPU with or without mamba-ssm). DeepSpeed's CPU Adam is compiled by two processes at once into an empty extensions
folder that holds a baton left by a killed build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

# the resume test's launch helpers (tests/ is on sys.path)
from test_resume import events, launch, new_run, shared_env  # noqa: F401

from hpcds.errors import HpcdsError
from hpcds.train import checkpoint as ck
from hpcds.train.kernels import REBUILD, choose_kernels

MAX_STEPS = 8
OK = {"mamba_ssm": None, "causal_conv1d": None}


def choose(layout="mamba", setting="auto", *, precision="bf16", cuda=True, errors=OK, mambapy=True):
    return choose_kernels(layout, setting, precision=precision, cuda=cuda, import_errors=errors, mambapy=mambapy)


def test_kernel_choice_on_a_gpu():
    assert choose().path == "fused"
    assert choose("mamba2", "fused").path == "fused"
    assert choose("gpt2", errors={}).path == "attention"
    # mamba-ssm missing on a GPU: the job fails at start with the import error and the fix...
    with pytest.raises(HpcdsError) as missing:
        choose(errors={"mamba_ssm": "not installed", "causal_conv1d": None})
    assert "mamba_ssm: not installed" in str(missing.value) and "pip install 'hpcds[gpu]'" in str(missing.value)
    assert "model.kernels: reference" in str(missing.value)
    # ...a build for another torch gets the rebuild command...
    symbol = "ImportError: selective_scan_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"
    with pytest.raises(HpcdsError) as mismatch:
        choose("mamba2", "fused", errors={"mamba_ssm": symbol, "causal_conv1d": None})
    assert symbol in str(mismatch.value) and REBUILD in str(mismatch.value)
    # ...and the reference path is taken only when asked for, without looking at the imports.
    chosen = choose(setting="reference", errors={}, precision="fp32")
    assert chosen.path == "reference" and chosen.mambapy and "model.kernels: reference" in chosen.detail


def test_kernel_choice_on_cpu():
    assert choose(cuda=False, errors={}, precision="fp32").mambapy
    # mambapy's scan fails in bf16 (transformers 5.23 multiplies its fp32 state by bf16 C): the sequential scan runs
    bf16 = choose(cuda=False, errors={}, precision="bf16")
    assert bf16.path == "reference" and not bf16.mambapy and "sequential" in bf16.detail
    assert choose("mamba2", cuda=False, errors={}).path == "reference"
    with pytest.raises(HpcdsError, match="fused needs a CUDA GPU"):
        choose(setting="fused", cuda=False, errors={})


def test_kernels_field_is_refused_for_models_without_a_scan():
    from hpcds.spec import validate_spec

    raw = {
        "model": {"type": "gpt2", "d_model": 16, "n_layer": 1, "n_head": 2, "kernels": "reference"},
        "data": {"train": "builtin:stdlib-docs", "tokenizer": "bytes"},
    }
    with pytest.raises(HpcdsError, match=r"model\.kernels: chooses Mamba's scan kernels, and a gpt2 model has none"):
        validate_spec(raw)


MODELS = {
    "mamba": {"type": "mamba", "d_model": 32, "n_layer": 1, "vocab_size": 256, "max_seq_len": 32},
    "gpt2": {"type": "gpt2", "d_model": 32, "n_layer": 1, "n_head": 2, "vocab_size": 256, "max_seq_len": 32},
}


def bf16_spec(family: str, stage: int):
    from hpcds.spec import validate_spec

    return validate_spec(
        {
            "name": f"bf16-{family}-z{stage}",
            "model": MODELS[family],
            "data": {"train": "builtin:stdlib-docs", "tokenizer": "bytes"},
            "training": {
                "precision": "bf16",
                "micro_batch_size": 2,
                "grad_accum_steps": 2,
                "lr": 3e-3,
                "warmup_steps": 2,
                "max_steps": MAX_STEPS,
                "log_interval_steps": 2,
                "eval_interval_steps": 100,
            },
            "deepspeed": {"zero_stage": stage},
            "checkpoint": {"every_steps": 4, "keep_last": 3},
            "slurm": {"gpus_per_node": 0, "ranks_per_node": 2},
            "wandb": {"mode": "disabled"},
        }
    )


def losses_by_step(run_dir) -> dict[int, float]:
    lines = (run_dir / "losses.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


def fp32_weights(run_dir) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag=ck.tag_for(MAX_STEPS))


def assert_identical(reference, resumed) -> None:
    import torch

    want, got = losses_by_step(reference), losses_by_step(resumed)
    assert sorted(want) == list(range(1, MAX_STEPS + 1)) and got == want, "per-step losses differ after resume"
    want, got = fp32_weights(reference), fp32_weights(resumed)
    assert want.keys() == got.keys()
    assert [name for name in want if not torch.equal(want[name], got[name])] == [], "weights differ after resume"


def rewind_to_step_4(straight, copy):
    """`copy`: the straight run as a job killed between steps 4 and 8 leaves it (step_8 never written)."""
    shutil.copytree(straight, copy)
    ckpt_dir = copy / "checkpoints"
    shutil.rmtree(ckpt_dir / ck.tag_for(MAX_STEPS))
    (ckpt_dir / ck.POINTER).write_text(json.dumps({"tag": ck.tag_for(4), "step": 4}))
    lines = (copy / "losses.jsonl").read_text().splitlines()
    (copy / "losses.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= 4))


@pytest.mark.deepspeed
@pytest.mark.parametrize(("family", "stage"), [("mamba", 2), ("mamba", 3), ("gpt2", 2), ("gpt2", 3)])
def test_bf16_trains_and_resumes_bit_identically(family, stage, tmp_path, shared_env, monkeypatch):  # noqa: F811
    import torch

    straight = new_run(tmp_path, bf16_spec(family, stage))
    assert launch(straight, shared_env, monkeypatch) == 0
    resumed = tmp_path / "resumed"
    rewind_to_step_4(straight, resumed)
    assert launch(resumed, shared_env, monkeypatch) == 0
    assert [e["step"] for e in events(resumed, "train_start")] == [0, 4]
    assert_identical(straight, resumed)

    built = events(straight, "model")[0]
    assert events(straight, "engine")[0]["precision"] == built["precision"] == "bf16"
    assert built["kernels"] == ("reference" if family == "mamba" else "attention")
    if family == "mamba":
        # mambapy's scan fails in bf16; the sequential scan ran
        assert "sequential" in built["kernels_detail"]
    if family == "mamba" and stage == 2:
        # The forward pass ran on bf16 copies of A_log, D and dt_proj.bias; the optimizer stepped fp32 masters,
        # whose bf16 rounding the copies are.
        tag = ck.tag_for(MAX_STEPS)
        module = torch.load(straight / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
        master = fp32_weights(straight)
        for name in ("A_log", "D", "dt_proj.bias"):
            key = f"backbone.layers.0.mixer.{name}"
            assert module["module"][key].dtype == torch.bfloat16
            assert master[key].dtype == torch.float32
            assert torch.equal(module["module"][key], master[key].bfloat16())
            assert not torch.equal(master[key], master[key].bfloat16().float()), f"{name}: master is only bf16"


CPU_ADAM = "from hpcds.train.ops import load_cpu_adam; op, compiled = load_cpu_adam(); print('compiled', compiled)"


@pytest.mark.deepspeed
def test_cpu_adam_builds_once_with_two_ranks_and_a_stale_baton(tmp_path):
    """Two processes ask for CPU Adam at once in an empty extensions folder holding the baton a killed build left:
    without hpcds's lock both would wait on that baton forever; with it one compiles and the other loads its op."""
    extensions = tmp_path / "torch_extensions"
    (extensions / "cpu_adam").mkdir(parents=True)
    (extensions / "cpu_adam" / "lock").touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    ranks = [
        subprocess.Popen([sys.executable, "-c", CPU_ADAM], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = []
    try:
        for rank in ranks:
            out, err = rank.communicate(timeout=480)  # one build takes 1-2 min on 2 cores
            assert rank.returncode == 0, err.decode()[-2000:]
            outputs.append(out.decode() + err.decode())
    finally:
        for rank in ranks:
            rank.kill()
    assert sorted("compiled True" in out for out in outputs) == [False, True], outputs
    assert sum("left by a build of DeepSpeed's cpu_adam op that was killed" in out for out in outputs) == 1
    assert list((extensions / "cpu_adam").glob("cpu_adam*.so")) and not (extensions / "cpu_adam" / "lock").exists()


@pytest.mark.deepspeed
def test_a_stale_baton_of_the_cpu_collective_op_does_not_block_a_start(tmp_path, shared_env):  # noqa: F811
    """DeepSpeed builds its CPU shared-memory collective at every CPU start unless it is built; a build killed before
    leaves torch's baton, and DeepSpeed alone would then wait on it forever. The trainer loads the op under hpcds's
    lock first: the run (2 ranks, the op already compiled in a copy of the extensions folder) goes through."""
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    extensions = tmp_path / "torch_extensions"
    built = ShareMemCommBuilder().name
    shutil.copytree(os.path.join(shared_env["TORCH_EXTENSIONS_DIR"], built), extensions / built)
    (extensions / built / "lock").touch()
    spec = bf16_spec("gpt2", 0)
    spec.training.max_steps = 2
    run_dir = new_run(tmp_path, spec)
    env = {**os.environ, **shared_env, "TORCH_EXTENSIONS_DIR": str(extensions)}
    argv = [sys.executable, "-m", "hpcds", "run", str(run_dir / "spec.yaml"), "--runs-dir", str(tmp_path / "runs")]
    # Its own limit: without the lock the ranks wait on the baton for ever (and DeepSpeed's launchers ignore TERM).
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, start_new_session=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "left by a build of DeepSpeed's deepspeed_shm_comm op that was killed" in done.stderr
    assert not (extensions / built / "lock").exists()
