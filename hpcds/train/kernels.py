"""Which implementation runs a Mamba model's scan, chosen once when the trainer starts.

mamba-ssm's fused CUDA kernels (with causal-conv1d) or transformers' reference PyTorch path. transformers picks on its
own and silently: when mamba-ssm is missing, or installed but built for another torch, it falls back to the reference
path, which on a GPU is many times slower and holds the whole (batch, width, sequence, state) scan in memory, which
the planner does not count. So a GPU job whose model wants the kernels and cannot import them fails at start with the
import error and the fix; `model.kernels: reference` takes the reference path on purpose. `choose_kernels` is the
decision (no I/O here); `select_kernels` gathers its inputs (CUDA, the imports) and applies it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass

from hpcds.errors import HpcdsError

FUSED_PACKAGES = ("mamba_ssm", "causal_conv1d")
SSM_LAYOUTS = ("mamba", "mamba2")
GPU_EXTRA = "pip install 'hpcds[gpu]'"
# An extension built against another torch fails to load with a missing C++ symbol (e.g. "undefined symbol:
# _ZN3c10..." from selective_scan_cuda); reinstalling from source against the torch in use is the fix.
REBUILD = "pip install --no-cache-dir --no-build-isolation --force-reinstall mamba-ssm causal-conv1d"


@dataclass(frozen=True)
class KernelChoice:
    path: str  # "fused", "reference" (a Mamba model) or "attention" (every other model)
    detail: str  # the startup banner's `kernels` line
    mambapy: bool = False  # Mamba-1 on the reference path: mambapy's parallel scan instead of the sequential one


def choose_kernels(
    layout: str, setting: str, *, precision: str, cuda: bool, import_errors: dict[str, str | None], mambapy: bool
) -> KernelChoice:
    """The kernel path for a model `layout` under `model.kernels` = `setting` (auto / fused / reference).

    `import_errors` maps each of FUSED_PACKAGES to None (imported) or why it did not import ("not installed" or the
    exception's text); `mambapy`: whether the mambapy package imports. No I/O here.
    """
    if layout not in SSM_LAYOUTS:
        return KernelChoice("attention", f"PyTorch scaled-dot-product attention on {'CUDA' if cuda else 'CPU'}")
    failed = {name: why for name, why in import_errors.items() if why is not None}
    if setting == "fused" and not cuda:
        raise HpcdsError(
            "model.kernels: fused needs a CUDA GPU, and this rank sees none"
            "\nhint: run on GPUs (slurm.gpus_per_node), or set model.kernels: auto to use the reference path on CPU"
        )
    if setting != "reference" and cuda and failed:
        raise HpcdsError(_import_failure(layout, failed))
    if setting != "reference" and cuda:
        return KernelChoice("fused", "mamba-ssm fused CUDA kernels (selective scan + causal-conv1d)")
    why = "chosen by model.kernels: reference" if setting == "reference" else "no CUDA device"
    if layout == "mamba2":
        return KernelChoice("reference", f"reference PyTorch (chunked scan; {why})")
    # transformers' mambapy scan multiplies a float32 state by bf16 C and fails (transformers 5.23): bf16 and fp16
    # take the sequential scan.
    if mambapy and precision == "fp32":
        return KernelChoice("reference", f"reference PyTorch (mambapy parallel scan; {why})", mambapy=True)
    hint = "pip install mambapy for a faster scan" if not mambapy else f"mambapy's scan does not run in {precision}"
    return KernelChoice("reference", f"reference PyTorch (sequential scan, slow; {why}; {hint})")


def _import_failure(layout: str, failed: dict[str, str]) -> str:
    listed = "; ".join(f"{name}: {why}" for name, why in failed.items())
    mismatch = any("undefined symbol" in why or "was compiled" in why or "ABI" in why for why in failed.values())
    if mismatch:
        fix = f"these were built for another torch; rebuild them for this one: {REBUILD}"
    elif all(why == "not installed" for why in failed.values()):
        fix = GPU_EXTRA
    else:
        fix = f"{GPU_EXTRA}; if it is installed, reinstall it for this torch and CUDA: {REBUILD}"
    return (
        f"model.kernels: a {layout} model on a GPU uses mamba-ssm's fused kernels, and they do not import ({listed})"
        f"\nhint: {fix}; or set model.kernels: reference to train on the slow reference PyTorch path on purpose "
        "(it needs more GPU memory than the plan shows)"
    )


def import_error(name: str) -> str | None:
    """None when `name` imports, else why not. mamba-ssm can be installed yet unusable (its CUDA extension missing or
    built for another torch): only a real import tells."""
    if importlib.util.find_spec(name) is None:
        return "not installed"
    try:
        importlib.import_module(name)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def select_kernels(model, precision: str) -> KernelChoice:
    """Decide for this process (CUDA visible, the packages' imports) and make transformers follow the decision."""
    choice = choose_kernels(model.layout, model.kernels, precision=precision, **_this_process(model))
    if choice.path == "reference":
        hide_fused_packages()
    return choice


def describe_kernels(model, precision: str = "fp32") -> str:
    """What would run the model's hot loop in this process, for a report: select_kernels' line, without refusing."""
    try:
        return choose_kernels(model.layout, model.kernels, precision=precision, **_this_process(model)).detail
    except HpcdsError as exc:
        return f"reference PyTorch ({str(exc).splitlines()[0]})"


def _this_process(model) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    needed = model.layout in SSM_LAYOUTS and model.kernels != "reference" and cuda
    return {
        "cuda": cuda,
        "import_errors": {name: import_error(name) for name in FUSED_PACKAGES} if needed else {},
        "mambapy": importlib.util.find_spec("mambapy") is not None,
    }


def hide_fused_packages() -> None:
    """Make `import mamba_ssm` / `import causal_conv1d` fail in this process, so transformers (which picks an
    implementation when its Mamba modules are first imported) takes the reference path even where they import."""
    stale = ("transformers.models.mamba.modeling_mamba", "transformers.models.mamba2.modeling_mamba2")
    if any(name in sys.modules for name in stale) and any(sys.modules.get(name) for name in FUSED_PACKAGES):
        raise RuntimeError("hide_fused_packages must run before transformers' Mamba modules are imported")
    for name in FUSED_PACKAGES:
        sys.modules.setdefault(name, None)  # None in sys.modules makes an import raise ImportError
