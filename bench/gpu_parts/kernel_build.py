"""What the node has (imports, versions, GPU), and mamba-ssm + causal-conv1d's CUDA kernels: imported if they work,
else installed from a wheel an earlier window built, else compiled from the wheelhouse's sdists for this GPU alone.

Their setup.py files hard-code `-gencode` flags for every architecture the CUDA version knows (nine with CUDA 13),
which makes torch ignore TORCH_CUDA_ARCH_LIST: `restrict_gencode` rewrites them to the detected one. Builds run in
source folders kept under the work folder, so a build cut short by its budget continues where ninja left it; the
wheel it makes is kept for the next window.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

MODULES = ("torch", "deepspeed", "transformers", "triton", "mamba_ssm", "causal_conv1d", "mambapy", "pydantic", "wandb")
MODULES += ("submitit", "hpcds")
# Build order: causal-conv1d first, it is small and both Mamba families' fast paths want it.
KERNELS = (("causal_conv1d", "CAUSAL_CONV1D_FORCE_BUILD"), ("mamba_ssm", "MAMBA_FORCE_BUILD"))
_GENCODE = re.compile(r'( *)cc_flag\.append\("-gencode"\)\n *cc_flag\.append\("arch=compute_(\d+),code=sm_\d+"\)\n')


def restrict_gencode(setup_text: str, arch: str) -> str:
    """A kernel package's setup.py compiling for `arch` alone ("90" for sm_90): its first gencode pair becomes
    this architecture's, the others become `pass`. No I/O here."""
    seen = []

    def one(match: re.Match) -> str:
        seen.append(match.group(2))
        indent = match.group(1)
        if len(seen) > 1:
            return f"{indent}pass\n"  # a pair can be alone in an `if` on the CUDA version
        return f'{indent}cc_flag.append("-gencode")\n{indent}cc_flag.append("arch=compute_{arch},code=sm_{arch}")\n'

    text = _GENCODE.sub(one, setup_text)
    if not seen:
        raise ValueError("no -gencode flags found in setup.py: its layout changed, restrict_gencode needs updating")
    return text


def versions() -> dict:
    import torch

    found: dict = {"versions": {}, "import_errors": {}}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
            found["versions"][name] = getattr(module, "__version__", "?")
        except Exception as exc:  # a broken extension raises more than ImportError
            found["import_errors"][name] = f"{type(exc).__name__}: {exc}"[:300]
    found["versions"]["cuda"] = torch.version.cuda
    props = torch.cuda.get_device_properties(0)
    found |= {
        "python": sys.version.split()[0],
        "gpu_name": props.name,
        "gpu_mem_gb": props.total_memory / 1e9,
        "gpu_arch": f"{props.major}{props.minor}",
        "gpu_count": torch.cuda.device_count(),
        "cpus": os.cpu_count(),
    }
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True) if _which("nvcc") else None
    found["nvcc"] = nvcc.stdout.strip().splitlines()[-1] if nvcc and nvcc.returncode == 0 else None
    return found


def _which(name: str) -> bool:
    import shutil

    return shutil.which(name) is not None


def usable() -> dict[str, str | None]:
    """Each kernel package: None when its CUDA extension imports, else why not (in a fresh process: a failed
    import in this one would stick)."""
    checks = {"causal_conv1d": "import causal_conv1d_cuda", "mamba_ssm": "import selective_scan_cuda"}
    found = {}
    for name, code in checks.items():
        done = subprocess.run([sys.executable, "-c", f"import {name}; {code}"], capture_output=True, text=True)
        found[name] = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1][:300]
    return found


def _pip_install(wheel: Path, site: Path) -> None:
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade"]
    subprocess.run([*argv, "--target", str(site), str(wheel)], check=True)


def build(name: str, force_env: str, wheelhouse: Path, work: Path, arch: str) -> float:
    """Compile one kernel package into a wheel under work/kernel-wheels; returns the seconds it took."""
    sdist = next(wheelhouse.glob(f"{name}-*.tar.gz"))
    source_root = work / "kernel-src"
    folder = source_root / sdist.name.removesuffix(".tar.gz")
    if not folder.is_dir():
        with tarfile.open(sdist) as archive:
            archive.extractall(source_root, filter="data")
        setup = folder / "setup.py"
        setup.write_text(restrict_gencode(setup.read_text(), arch))
    env = {**os.environ, force_env: "TRUE", "TORCH_CUDA_ARCH_LIST": f"{arch[:-1]}.{arch[-1]}"}
    env["MAX_JOBS"] = str(os.cpu_count() or 4)
    started = time.monotonic()
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-v"]
    subprocess.run([*argv, "-w", str(work / "kernel-wheels"), str(folder)], env=env, check=True)
    return time.monotonic() - started


def kernels(wheelhouse: Path, work: Path) -> dict:
    import torch

    site = work / "site"
    props = torch.cuda.get_device_properties(0)
    arch = f"{props.major}{props.minor}"
    result: dict = {"before": usable(), "installed_from": {}, "build_s": {}}
    for name, force_env in KERNELS:
        if result["before"][name] is None:
            continue
        built = sorted((work / "kernel-wheels").glob(f"{name}-*.whl"))
        if not built:
            result["build_s"][name] = round(build(name, force_env, wheelhouse, work, arch), 1)
            built = sorted((work / "kernel-wheels").glob(f"{name}-*.whl"))
        _pip_install(built[-1], site)
        result["installed_from"][name] = built[-1].name
        result["wheel_bytes"] = {w.name: w.stat().st_size for w in (work / "kernel-wheels").glob("*.whl")}
    result["after"] = usable()
    result["usable"] = all(v is None for v in result["after"].values())
    return result
