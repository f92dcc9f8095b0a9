"""Reads what `hpcds report` needs from a run directory and hands it to the pure core (hpcds.report.core).

The event log, rank 0's step records (losses.jsonl), meta.json, the resolved spec (batch, sequence length, nodes,
GPUs, precision, and the planner's FLOPs per token), and the newest heartbeat or progress write, which ends an
allocation that is still running.
"""

from __future__ import annotations

from pathlib import Path

from hpcds import runs
from hpcds.errors import HpcdsError
from hpcds.facts import HEARTBEAT_DIR, LOSSES_FILE, PROGRESS_FILE, SPEC_FILE
from hpcds.plan import count_params, flops_per_token
from hpcds.plan.gpus import gpu_entry, known_gpu_names
from hpcds.report.core import RunFacts, RunReport, build_report


def run_facts(run_dir: Path, gpu_name: str | None) -> RunFacts:
    from hpcds.spec import load_spec

    if gpu_name is not None and gpu_entry(gpu_name) is None:
        raise HpcdsError(f"--gpu {gpu_name!r} is not in the peak table; known: {', '.join(known_gpu_names())}")
    spec = load_spec(run_dir / SPEC_FILE)
    try:
        flops = flops_per_token(spec.model, count_params(spec.model), spec.model.max_seq_len)
    except (HpcdsError, ValueError, TypeError):
        flops = None  # a model the planner cannot count: the report goes on without MFU
    return RunFacts(
        nodes=spec.slurm.nodes,
        gpus_per_node=spec.slurm.gpus_per_node,
        precision=spec.training.precision,
        tokens_per_step=spec.global_batch_size * spec.model.max_seq_len,
        flops_per_token=flops,
        gpu_name=gpu_name,
    )


def last_seen_time(run_dir: Path) -> float | None:
    """The newest heartbeat or progress write: how long a still-running allocation has run so far."""
    times = []
    for path in [run_dir / PROGRESS_FILE, *sorted((run_dir / HEARTBEAT_DIR).glob("*.json"))]:
        value = runs.read_json(path, {})
        if isinstance(value, dict) and isinstance(value.get("time"), (int, float)):
            times.append(float(value["time"]))
    return max(times, default=None)


def read_report(run_dir: Path, gpu_name: str | None = None) -> RunReport:
    run_dir = Path(run_dir)
    facts = run_facts(run_dir, gpu_name)
    return build_report(
        run_dir.name,
        runs.read_meta(run_dir),
        runs.read_events(run_dir),
        runs.read_json_lines(run_dir / LOSSES_FILE),  # a torn last line (rank 0 killed mid-write) is skipped
        facts,
        last_seen_time(run_dir),
    )
