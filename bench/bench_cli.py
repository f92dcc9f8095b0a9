"""How fast the login-node side of hpcds starts: `hpcds render`, `plan`, `status` and `--help`, start to exit, each
against a bare `python -c pass`, and the in-process render time of a 1,024-node x 8-GPU run (batch script, hostfile of
1,024 hosts, DeepSpeed config).

    python bench/bench_cli.py [--repeats 15] [--importtime] [--floor] [--against OTHER_CHECKOUT]

The commands run interleaved (render, plan, status, help, pass, render, ...) so machine noise hits all alike; the
table shows medians and each one's ratio to `python -c pass` (the goal for render: <= 3). `status` reads an empty runs
folder (its start-up, without Slurm). `--against DIR` adds the same commands run from another checkout of hpcds
(`python -m hpcds` with DIR as the working folder, and this checkout's commands the same way), interleaved with the
rest: before and after a change, in one run. `--importtime` adds the slowest imports of `hpcds render` (python -X
importtime, cumulative), which is where start-up time goes. `--floor` adds the start-up of the libraries the commands
cannot do without (click, PyYAML, pydantic with one model built, jinja2, rich), alone and together, each against
`python -c pass`: the ratio no change inside hpcds can beat.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC = "configs/mamba7b.yaml"
RATIO_GOAL = 3.0


def hpcds_argv() -> list[str]:
    script = Path(sys.executable).parent / "hpcds"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "hpcds"]


# The commands may write their .pyc files (in the warm-up run), as an installed hpcds has them: with
# PYTHONDONTWRITEBYTECODE set, every module edited since its .pyc was written would be compiled again in every run.
BENCH_ENV = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def wall_s(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=BENCH_ENV)
    return time.perf_counter() - start


def interleaved_medians(commands: dict[str, list[str]], repeats: int) -> dict[str, float]:
    """Median wall time of each command, the commands taking turns so machine noise hits them alike."""
    for argv in commands.values():
        wall_s(argv)  # warm the page cache and .pyc files once
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, argv in commands.items():
            times[name].append(wall_s(argv))
    return {name: statistics.median(values) for name, values in times.items()}


def command_lines(empty_runs: str) -> dict[str, list[str]]:
    """The commands timed, as arguments to hpcds."""
    return {
        f"hpcds render {SPEC}": ["render", SPEC],
        f"hpcds plan {SPEC}": ["plan", SPEC],
        "hpcds status (empty runs folder)": ["status", "--runs-dir", empty_runs],
        "hpcds --help": ["--help"],
    }


def in_checkout(checkout: Path, argv: list[str]) -> list[str]:
    """`python -m hpcds ARGV` importing hpcds from `checkout` (its folder first on sys.path), relative paths there."""
    return ["env", "-C", str(checkout), sys.executable, "-m", "hpcds", *argv]


def start_times(repeats: int, against: Path | None = None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="hpcds-bench-runs-") as empty_runs:
        lines = command_lines(empty_runs)
        commands = {name: [*hpcds_argv(), *argv] for name, argv in lines.items()}
        if against is not None:
            commands |= {f"{name}  [this, -m]": in_checkout(ROOT, argv) for name, argv in lines.items()}
            commands |= {f"{name}  [{against.name}, -m]": in_checkout(against, argv) for name, argv in lines.items()}
        commands["python -c pass"] = [sys.executable, "-c", "pass"]
        return interleaved_medians(commands, repeats)


# What `hpcds render` imports from outside hpcds. pydantic.plugin._loader is what every pydantic validator imports when
# it is built: it scans the installed packages' entry points for pydantic plugins (importlib.metadata).
_PYDANTIC_MODEL = "from pydantic import BaseModel\nclass M(BaseModel):\n    x: int = 0\nM(x=1)"
# hpcds builds its validators without that scan (hpcds.cli.skip_pydantic_plugin_scan); this is the same stand-in.
_NO_PLUGIN_SCAN = (
    "import sys, types\nstand_in = types.ModuleType('pydantic.plugin._loader')\n"
    "stand_in.get_plugins = lambda: ()\nsys.modules[stand_in.__name__] = stand_in\n"
)
_RICH_TABLE = "from rich.console import Console\nfrom rich.table import Table\nConsole().print(Table('a'))"
FLOOR_IMPORTS = {
    "import click": "import click",
    "import yaml": "import yaml",
    "import jinja2": "import jinja2",
    "import pydantic": "import pydantic",
    "import pydantic_core": "import pydantic_core",
    "from pydantic import BaseModel": "from pydantic import BaseModel",
    "import importlib.metadata": "import importlib.metadata",
    "pydantic model, built and used": _PYDANTIC_MODEL,
    "the same without the plugin scan": _NO_PLUGIN_SCAN + _PYDANTIC_MODEL,
    "rich table printed": _RICH_TABLE,
    "click, yaml, jinja2, model (no scan)": "import click, yaml, jinja2\n" + _NO_PLUGIN_SCAN + _PYDANTIC_MODEL,
    "click, rich table (status)": "import click\n" + _RICH_TABLE,
}


def floor_times(repeats: int) -> dict[str, float]:
    # The interpreter alone: without site (-S: no site-packages, no .pth files such as an editable install's finder).
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -S -c pass": [sys.executable, "-S", "-c", "pass"],
    }
    # Each with the garbage-collector freeze at exit that `hpcds` does too (hpcds.cli.main), so the floor is fair.
    freeze = "import atexit, gc\natexit.register(gc.freeze)\n"
    commands |= {name: [sys.executable, "-c", freeze + code] for name, code in FLOOR_IMPORTS.items()}
    commands[f"hpcds render {SPEC}"] = [*hpcds_argv(), "render", SPEC]
    return interleaved_medians(commands, repeats)


def render_times(repeats: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from hpcds.render import render_ds_config_json, render_hostfile, render_sbatch
    from hpcds.spec import load_spec

    spec = load_spec(None, ["deepspeed.zero_stage=3"], {"nodes": 1024, "gpus_per_node": 8}, preset="7b_mamba")
    hosts = [f"gpu{i:04d}" for i in range(1024)]
    run_dir = "/scratch/runs/7b_mamba-20260101-000000"
    render_sbatch(spec, run_dir)  # compile the template once, as a first call would
    timings: dict[str, list[float]] = {"batch script": [], "hostfile (1,024 hosts)": [], "DeepSpeed config": []}
    for _ in range(repeats):
        for name, call in (
            ("batch script", lambda: render_sbatch(spec, run_dir)),
            ("hostfile (1,024 hosts)", lambda: render_hostfile(hosts, 8)),
            ("DeepSpeed config", lambda: render_ds_config_json(spec)),
        ):
            start = time.perf_counter()
            call()
            timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def slowest_imports(top: int = 12) -> list[tuple[float, str]]:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hpcds", "render", SPEC],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    rows = []
    for line in result.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]) / 1e6, parts[2].rstrip()))
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--importtime", action="store_true", help="also list the slowest imports of hpcds render")
    parser.add_argument("--floor", action="store_true", help="also time the libraries hpcds render needs, alone")
    parser.add_argument("--against", type=Path, help="also run the commands from this other checkout of hpcds")
    args = parser.parse_args()

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    medians = start_times(args.repeats, args.against)
    pass_s = medians["python -c pass"]
    print(f"start-up, median of {args.repeats} interleaved runs")
    print(f"  {'command':<60} {'time':>9}  {'÷ pass':>6}")
    for name, seconds in medians.items():
        print(f"  {name:<60} {seconds * 1e3:>6.1f} ms  {seconds / pass_s:>5.2f} x")
    ratio = medians[f"hpcds render {SPEC}"] / pass_s
    verdict = "meets" if ratio <= RATIO_GOAL else "misses"
    print(f"  render {verdict} the goal of <= {RATIO_GOAL:g} x")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print("render in process, 1,024 nodes x 8 GPUs, median of", args.repeats)
    for name, seconds in render_times(args.repeats).items():
        print(f"  {name:<42} {seconds * 1e3:>6.2f} ms")
    if args.floor:
        print()
        print(f"start-up of what hpcds render imports, median of {args.repeats} interleaved runs")
        medians = floor_times(args.repeats)
        base_s = medians["python -c pass"]
        for name, seconds in medians.items():
            print(f"  {name:<42} {seconds * 1e3:>6.1f} ms  {seconds / base_s:>5.2f} x")
    if args.importtime:
        print()
        print("slowest imports of hpcds render (cumulative)")
        for seconds, module in slowest_imports():
            print(f"  {module:<42} {seconds * 1e3:>6.1f} ms")


if __name__ == "__main__":
    main()
