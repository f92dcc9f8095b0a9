"""One part of bench/gpu_check.py, in its own process: `part.py NAME --work DIR --result FILE ...` writes the part's
numbers to FILE as JSON and exits 0, or fails with its traceback in the caller's log.

`speed:*-unfused` hides mamba-ssm and causal-conv1d from this process before anything imports them, so transformers
and hpcds take the paths they take on a machine without the kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--wheelhouse", type=Path, required=True)
    parser.add_argument("--budget-s", type=float, required=True)
    args = parser.parse_args()
    kind, _, config = args.name.partition(":")
    if config.endswith("-unfused"):
        for hidden in ("mamba_ssm", "causal_conv1d"):
            sys.modules[hidden] = None  # import fails, importlib.util.find_spec says None
    if kind == "env":
        from kernel_build import versions

        result = versions()
    elif kind == "kernels":
        from kernel_build import kernels

        result = kernels(args.wheelhouse, args.work)
    elif kind == "resume":
        from training import resume

        result = resume(args.work, args.budget_s)
    elif kind == "loss":
        from training import loss_curve

        result = loss_curve(config, args.work, args.budget_s)
    elif kind == "speed":
        from engine import speed

        result = speed(config, args.budget_s)
    elif kind == "memory":
        from engine import memory

        result = memory(config, args.budget_s)
    else:
        raise SystemExit(f"unknown part {args.name}")
    args.result.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
