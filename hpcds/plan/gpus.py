"""Peak dense tensor-core throughput of common GPUs, and model FLOPs utilisation (MFU) against it. No I/O here.

The figures are NVIDIA's datasheet numbers without structured sparsity: the datasheets' headline figure for H100 SXM
bf16 is 1,979 TFLOP/s, the sparse one; dense training gets at most half of it, 989. This module imports nothing:
bench/gpu_check.py loads this file by its path on a fresh node, before pydantic or anything else is installed.
"""

from __future__ import annotations

# (a piece of the GPU's name, dense bf16 TFLOP/s, dense fp16 TFLOP/s), matched against torch.cuda.get_device_name()
# or what a person types ("H100 SXM"), case aside. The first match wins, so variants come before the family name.
# None: no tensor cores for that type (V100 has no bf16). fp16 and bf16 run at the same rate wherever both exist.
DENSE_PEAK_TFLOPS = (
    ("GH200", 989.0, 989.0),
    ("H200", 989.0, 989.0),
    ("H100 NVL", 835.0, 835.0),
    ("H100 PCIe", 756.0, 756.0),
    ("H100", 989.0, 989.0),  # SXM
    ("B200", 2250.0, 2250.0),
    ("A100", 312.0, 312.0),
    ("L40S", 362.0, 362.0),
    ("L4", 121.0, 121.0),
    ("A10", 125.0, 125.0),
    ("RTX 4090", 165.0, 165.0),  # fp32 accumulate, as training uses
    ("V100", None, 125.0),  # SXM2
)
PRECISIONS = ("bf16", "fp16")  # the columns above, in order


def gpu_entry(gpu_name: str) -> tuple[str, float | None, float | None] | None:
    """The table's row for a GPU name, or None when no row's piece is in it."""
    for entry in DENSE_PEAK_TFLOPS:
        if entry[0].lower() in gpu_name.lower():
            return entry
    return None


def dense_peak_tflops(gpu_name: str, precision: str = "bf16") -> float | None:
    """Dense peak per GPU in TFLOP/s for `precision` (bf16 or fp16); None for a GPU or precision the table lacks."""
    entry = gpu_entry(gpu_name)
    if entry is None or precision not in PRECISIONS:
        return None
    return entry[1 + PRECISIONS.index(precision)]


def known_gpu_names() -> list[str]:
    return [entry[0] for entry in DENSE_PEAK_TFLOPS]


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation of one GPU: the planner's training FLOPs per token (no recomputation) at its measured
    rate, over its dense peak."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)
