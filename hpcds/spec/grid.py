"""A sweep's grid: `--grid training.lr=1e-4,3e-4 --grid model.n_layer=2,4` as points (one spec per point), each
point validated as a whole spec, with every problem of every point reported at once and named by its point. No I/O.

The points are the cartesian product of the axes, the first `--grid` varying slowest, so task 0 takes every axis's
first value. Values are read as YAML, as `--set` reads them. All points share one job array and so one batch
script: fields under `slurm.` and the run's `name` are not grid axes.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

from hpcds.errors import Problem, SpecError
from hpcds.spec.job import JobSpec
from hpcds.spec.load import parse_set, validate_spec
from hpcds.spec.tree import set_path

# Slurm's default MaxArraySize is 1001 (task ids 0-1000); a grid this big is a mistake more often than a plan.
MAX_POINTS = 1000
# Whole-array fields: one batch script (resources, time, partition, setup) and one name for every task.
NOT_AXES = ("slurm.", "name")


def parse_grid(axes: list[str] | tuple[str, ...]) -> list[tuple[str, list[Any]]]:
    """`KEY=V1,V2,...` items as (dotted key, values); every malformed item at once as a SpecError."""
    parsed: list[tuple[str, list[Any]]] = []
    problems = []
    for item in axes:
        key, sep, raw = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in raw.split(",")]
        try:
            if not sep:
                raise SpecError([])
            parse_set(f"{key}=0")
        except SpecError:
            problems.append(Problem("--grid", f"{item!r} is not KEY=V1,V2,... with a dotted key", GRID_HINT))
            continue
        if not values or any(not v for v in values):
            problems.append(Problem(f"--grid {key}", f"{item!r} has an empty value", GRID_HINT))
        elif key == "name" or key.startswith(NOT_AXES[0]):
            problems.append(
                Problem(
                    f"--grid {key}",
                    "every task of a sweep shares one batch script and one name, so it cannot vary",
                    "set it once with --set (or --nodes, --time, ...) for the whole sweep",
                )
            )
        elif any(key == other for other, _ in parsed):
            problems.append(Problem(f"--grid {key}", "is given twice", "list all its values in one --grid"))
        elif len(set(values)) != len(values):
            problems.append(Problem(f"--grid {key}", f"{item!r} repeats a value", "each value once"))
        else:
            parsed.append((key, [parse_set(f"{key}={v}")[1] for v in values]))
    if not axes:
        problems.append(Problem("--grid", "a sweep needs at least one axis", GRID_HINT))
    count = 1
    for _, values in parsed:
        count *= len(values)
    if count > MAX_POINTS:
        problems.append(Problem("--grid", f"{count} points, more than {MAX_POINTS}", "split the sweep"))
    if problems:
        raise SpecError(problems, "--grid")
    return parsed


GRID_HINT = "e.g. --grid training.lr=1e-4,3e-4,1e-3 (values split at commas, read as YAML)"


def expand(axes: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    """The grid's points, `{key: value}` each, the first axis varying slowest."""
    keys = [key for key, _ in axes]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(values for _, values in axes))]


def point_label(point: dict[str, Any]) -> str:
    """`training.lr=0.0001 model.n_layer=2`: how messages and `hpcds status` name a point."""
    return " ".join(f"{key}={value}" for key, value in point.items())


def point_specs(base: dict[str, Any], points: list[dict[str, Any]], source: str = "") -> list[JobSpec]:
    """One validated spec per point: `base` (a spec tree) with the point's values set. Every problem of every point
    is raised at once, naming the tasks and points it holds for (once, however many points share it)."""
    specs: list[JobSpec] = []
    found: dict[Problem, list[str]] = {}
    for index, point in enumerate(points):
        tree = copy.deepcopy(base)
        for key, value in point.items():
            set_path(tree, key, value)
        try:
            specs.append(validate_spec(tree, source))
        except SpecError as exc:
            for problem in exc.problems:
                found.setdefault(problem, []).append(f"task {index} ({point_label(point)})")
    problems = [
        Problem(p.path, f"{p.message} [{'every task' if len(where) == len(points) > 1 else '; '.join(where)}]", p.hint)
        for p, where in found.items()
    ]
    if problems:
        raise SpecError(problems, source)
    return specs
