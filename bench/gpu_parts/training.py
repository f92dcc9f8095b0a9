"""The trainer itself on one GPU, launched as `hpcds run --gpus 0` launches it: exact resume in bf16 under ZeRO-2, and
a small Mamba's loss curve in bf16 and fp32.

Resume: the quickstart model (configs/quickstart.yaml) with bf16 on the GPU, trained straight to RESUME_STEPS, and
again with rank 0 sending itself USR2 (Slurm's warning signal) after step STOP_STEP, which saves and exits 75, then
resumed to the end; the two are compared by the resume test's own comparison. When they differ, a second straight
run tells a resume fault (two straight runs agree) from GPU non-determinism (they do not).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from resume_compare import losses_by_step, resume_differences

RESUME_STEPS = 40
STOP_STEP = 20
LOSS_STEPS = 200
EXIT_REQUEUE = 75


def quickstart_spec(name: str, precision: str, max_steps: int):
    import yaml

    from hpcds.spec import deep_merge, validate_spec
    from hpcds.spec.load import build_tree

    repo = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((repo / "configs" / "quickstart.yaml").read_text())
    gpu = {
        "name": name,
        "training": {"precision": precision, "max_steps": max_steps, "eval_interval_steps": 0},
        "checkpoint": {"every_steps": 10**6},  # saves only at the stop signal and the end
        "slurm": {"gpus_per_node": 1, "ranks_per_node": 1},
        "wandb": {"mode": "disabled"},
    }
    return validate_spec(build_tree(deep_merge(raw, gpu)))


def train(root: Path, spec, cap_s: float, fault: str = "", run_dir: Path | None = None) -> tuple[Path, int | None]:
    """One launch of the trainer on GPU 0 in its own session; (run directory, exit code, None when it ran past
    `cap_s` and was killed)."""
    from hpcds.cli.train_cmd import prepare_run

    if run_dir is None:
        run_dir = prepare_run(spec, root, new=True)[0]
    env = {**os.environ, "HPCDS_TEST_FAULT": fault}
    code = "import sys; from hpcds.launch import launch_local; sys.exit(launch_local(sys.argv[1], 1, [0]))"
    with open(run_dir / "gpu-check-launch.log", "a") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", code, str(run_dir)], env=env, stdout=log, stderr=log, start_new_session=True
        )
        try:
            return run_dir, process.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return run_dir, None


def resume(work: Path, budget_s: float) -> dict:
    root = work / "runs"
    spec = quickstart_spec("gpu-check-resume", "bf16", RESUME_STEPS)
    cap_s = budget_s / 4  # four launches at most
    straight, code = train(root, spec, cap_s)
    if code != 0:
        raise SystemExit(f"straight run ended with {code}: see {straight / 'gpu-check-launch.log'}")
    stopped, code = train(root, spec, cap_s, fault=f"signal_at:{STOP_STEP}:USR2")
    if code != EXIT_REQUEUE:
        raise SystemExit(f"the USR2 run ended with {code}, not {EXIT_REQUEUE}: see {stopped / 'gpu-check-launch.log'}")
    _, code = train(root, spec, cap_s, run_dir=stopped)
    if code != 0:
        raise SystemExit(f"the resumed run ended with {code}: see {stopped / 'gpu-check-launch.log'}")
    starts = [json.loads(line) for line in (stopped / "events.jsonl").read_text().splitlines()]
    differences = resume_differences(straight, stopped, RESUME_STEPS, stage=2)
    result = {
        "steps": RESUME_STEPS,
        "stopped_at": STOP_STEP,
        "train_starts": [e["step"] for e in starts if e["event"] == "train_start"],
        "identical": not differences,
        "differences": differences,
    }
    if differences:
        again, code = train(root, spec, cap_s)
        if code == 0:
            result["straight_runs_identical"] = not resume_differences(straight, again, RESUME_STEPS, stage=2)
    return result


def loss_curve(precision: str, work: Path, budget_s: float) -> dict:
    spec = quickstart_spec(f"gpu-check-loss-{precision}", precision, LOSS_STEPS)
    run_dir, code = train(work / "runs", spec, budget_s * 0.9)
    if code != 0:
        raise SystemExit(f"the {precision} run ended with {code}: see {run_dir / 'gpu-check-launch.log'}")
    losses = losses_by_step(run_dir)
    curve = [losses[step] for step in sorted(losses)]
    return {"precision": precision, "steps": len(curve), "final_loss": sum(curve[-20:]) / 20, "losses": curve}
