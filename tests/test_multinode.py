"""One DeepSpeed job across the two nodes of the project's Slurm cluster, a rank dying on one node, and a run that
changes its node count (2 -> 1 -> 2 nodes, ZeRO-2, through DeepSpeed's universal checkpoint).

The cluster tests share one run: leg A trains on n1+n2 (world 4) and stops itself at step 4 (HPCDS_TEST_FAULT, with
slurm.max_requeues=0 so it is not requeued), leg B resubmits the run directory's batch script with `sbatch --nodes=1`
(world 2) and stops at step 6, leg C resubmits it on 2 nodes and finishes at step 8; a reference run does the same 8
steps on 2 nodes without stopping, for the losses. Every job runs with a PATH whose `ssh` and `pdsh` only record that
they were called. The local tests (no Slurm) check the conversion itself: a
checkpoint of 2 ranks loaded on 1 gives back the same fp32 weights and Adam moments.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcds import facts, runs
from hpcds.train import universal

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TINY = ["--set", "training.warmup_steps=1", "--set", "training.eval_interval_steps=0"]
TINY += ["--set", "training.log_interval_steps=1", "--set", "checkpoint.every_steps=2"]
# Loss right after a node-count change vs right before it, relative: the mean training loss over the ranks at step N
# (old world) and N+1 (new world, other batches, the same weights and Adam moments). The quickstart loss falls by
# roughly 5-10 % a step at this point; a restart from scratch would be back at ln(256) = 5.5, 40-80 % above.
LOSS_JUMP_TOLERANCE = 0.15
# After a change, vs the same steps of an uninterrupted 2-node run (other batches on fewer ranks): measured within 3 %.
LOSS_REFERENCE_TOLERANCE = 0.08


def test_needs_conversion_only_for_partitioned_stages():
    manifest = {"zero_stage": 2, "world_size": 4}
    assert universal.needs_conversion(manifest, zero_stage=2, world_size=2)
    assert not universal.needs_conversion(manifest, zero_stage=2, world_size=4)
    assert not universal.needs_conversion({"zero_stage": 0, "world_size": 4}, zero_stage=0, world_size=2)
    assert not universal.needs_conversion({"zero_stage": 2}, zero_stage=2, world_size=2)  # no record: load as is


def test_changed_zero_stage_is_refused_with_the_fix():
    problem = universal.refusal({"zero_stage": 2, "world_size": 4}, zero_stage=3, ckpt_path=Path("c"))
    assert problem and "pinned" in problem and "deepspeed.zero_stage: 2" in problem
    assert universal.refusal({"zero_stage": 2, "world_size": 4}, zero_stage=2, ckpt_path=Path("c")) is None


# ---------------------------------------------------------------------------------------------------------------------
# Local: a 2-rank checkpoint loaded on 1 rank through the universal format

DRIVER = r"""
import json, sys
from pathlib import Path
import deepspeed, torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from hpcds import facts, runs
from hpcds.spec import load_spec
from hpcds.train import checkpoint, models, universal
from hpcds.train.__main__ import make_optimizer

run_dir = Path(sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")
spec = load_spec(run_dir / facts.SPEC_FILE)
config = json.loads((run_dir / facts.DS_CONFIG_FILE).read_text())
config["train_batch_size"] = config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
model = models.build_model(spec.model, seed=spec.training.seed + 1)  # other weights: the load must replace them all
engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, spec, 1e-3), config=config)
ckpt = run_dir / facts.CHECKPOINT_DIR
found = checkpoint.find_resumable(ckpt, rank=0, world=1)
saved, converted = universal.load_for_resume(
    engine, ckpt, found.tag, found.manifest, zero_stage=spec.deepspeed.zero_stage, rank=0, world_size=1
)
expected = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=found.tag)
moments = universal.universal_dir(ckpt, found.tag) / "zero"
diffs = {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
for name, param in engine.module.named_parameters():
    diffs["fp32"] = max(diffs["fp32"], (safe_get_full_fp32_param(param) - expected[name]).abs().max().item())
    for key in ("exp_avg", "exp_avg_sq"):
        want = torch.load(moments / name / f"{key}.pt", weights_only=False)
        want = want["param"] if isinstance(want, dict) else want  # stage 3 files hold the bare tensor
        got = safe_get_full_optimizer_state(param, key)
        diffs[key] = max(diffs[key], (got.reshape(want.shape) - want).abs().max().item())
print("RESULT " + json.dumps({"converted": converted, "step": saved["trainer"]["step"], "diffs": diffs,
                              "params": len(expected)}))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_checkpoint_loads_on_one_rank_exactly(tmp_path, stage):
    env = {**os.environ, "HPCDS_RUNS_DIR": str(tmp_path)}
    sets = [*TINY, "--set", "training.max_steps=2", "--set", f"deepspeed.zero_stage={stage}"]
    done = subprocess.run(
        [sys.executable, "-m", "hpcds", "run", QUICKSTART, "--ranks", "2", *sets],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if (p / facts.SPEC_FILE).is_file()]
    one_rank = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    loaded = subprocess.run(
        [sys.executable, "-c", DRIVER, str(run_dir)],
        capture_output=True,
        text=True,
        env={**env, **one_rank, "MASTER_PORT": str(_free_port()), "DS_ACCELERATOR": "cpu"},
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = json.loads(loaded.stdout.split("RESULT ", 1)[1])
    assert result["step"] == 2 and result["params"] > 0
    assert result["converted"]["from_world_size"] == 2 and result["converted"]["to_world_size"] == 1
    assert result["diffs"] == {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    ckpt = run_dir / facts.CHECKPOINT_DIR
    assert (universal.universal_dir(ckpt, "step_2") / universal.MARKER).is_file()
    assert not (ckpt / universal.STRAY_POINTER).exists()


# ---------------------------------------------------------------------------------------------------------------------
# On the cluster


def _hpcds(runs_root: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hpcds", *args], capture_output=True, text=True, env=env, cwd=runs_root, timeout=300
    )


@pytest.fixture(scope="module")
def cluster_env(slurm_cluster, tmp_path_factory) -> dict:
    """Environment for submissions: a runs root, and `ssh`/`pdsh` first on PATH that only leave a trace."""
    root = tmp_path_factory.mktemp("multinode")
    trap_bin = root / "trap-bin"
    trap_bin.mkdir()
    for name in ("ssh", "pdsh"):
        tool = trap_bin / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >>"{root}/remote-shell-calls"\nexit 255\n')
        tool.chmod(0o755)
    runs_root = root / "runs"
    runs_root.mkdir()
    return {**os.environ, "HPCDS_RUNS_DIR": str(runs_root), "PATH": f"{trap_bin}:{os.environ['PATH']}"}


def _status(env: dict, name: str) -> dict:
    """One status row, in this process (polling through the CLI costs a Python start-up per poll)."""
    from hpcds.cli.jobs_cmd import StatusSource

    return StatusSource().rows([Path(env["HPCDS_RUNS_DIR"]) / name])[0].to_dict()


def _status_cli(env: dict, name: str) -> dict:
    done = _hpcds(Path(env["HPCDS_RUNS_DIR"]), "status", name, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)[0]


def _wait_ended(env: dict, name: str, job_id: str, timeout_s: float) -> tuple[dict, float]:
    """Poll every 0.5 s until the run's job `job_id` has ended; returns the status row and the time it was seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = _status(env, name)
        if row["job_id"] == job_id and row["state"] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"):
            return row, time.monotonic()
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} of {name} still {row['state']} after {timeout_s} s")
        time.sleep(0.5)


def _resubmit(run_dir: Path, nodes: int, env: dict) -> str:
    """`sbatch --nodes=N job.sbatch` in the run directory: the documented way to resume on another node count."""
    done = subprocess.run(
        ["sbatch", "--parsable", f"--nodes={nodes}", facts.SCRIPT_FILE],
        capture_output=True,
        text=True,
        env=env,
        cwd=run_dir,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().split(";")[0]
    meta = runs.read_meta(run_dir)
    runs.update_meta(run_dir, job_ids=[*(meta.get("job_ids") or []), job_id])
    # status tells this job from an older one with the same id by the job name recorded here
    script = (run_dir / facts.SCRIPT_FILE).read_text()
    job_name = re.search(r"^#SBATCH --job-name=(\S+)", script, re.M).group(1)
    runs.append_event(run_dir, "submitted", job_id=job_id, job_name=job_name)
    return job_id


def _step_losses(run_dir: Path) -> dict[int, float]:
    """Mean loss over the ranks per step, from the `step N/M | loss X` lines of every job's output."""
    losses = {}
    for out in sorted(run_dir.glob("slurm-*.out")):
        for match in re.finditer(r"^step (\d+)/\d+ \| loss ([0-9.]+)", out.read_text(), re.M):
            losses[int(match.group(1))] = float(match.group(2))
    return losses


@pytest.fixture(scope="module")
def node_count_run(cluster_env, submitted) -> dict:
    """Legs A (2 nodes, stops at 4), B (1 node, stops at 6) and C (2 nodes, finishes at 8) of one run."""
    env = cluster_env
    args = [QUICKSTART, *TINY, "--set", "training.max_steps=8", "--set", "slurm.max_requeues=0"]
    done = _hpcds(
        Path(env["HPCDS_RUNS_DIR"]),
        "submit",
        *args,
        "--nodes",
        "2",
        "--json",
        env={**env, "HPCDS_TEST_FAULT": "signal_at:4:TERM"},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    name, run_dir = result["name"], Path(result["run_dir"])
    submitted.append(result["job_id"])
    legs = {"A": _wait_ended(env, name, result["job_id"], 600)[0]}
    job_b = _resubmit(run_dir, 1, {**env, "HPCDS_TEST_FAULT": "signal_at:6:TERM"})
    submitted.append(job_b)
    legs["B"] = _wait_ended(env, name, job_b, 600)[0]
    job_c = _resubmit(run_dir, 2, env)
    submitted.append(job_c)
    legs["C"] = _wait_ended(env, name, job_c, 600)[0]
    # The same 8 steps on 2 nodes without a stop: what the losses of steps 5-8 would have been.
    done = _hpcds(
        Path(env["HPCDS_RUNS_DIR"]), "submit", *args, "--nodes", "2", "--name", "reference", "--json", env=env
    )
    assert done.returncode == 0, done.stderr
    reference = json.loads(done.stdout)
    submitted.append(reference["job_id"])
    _wait_ended(env, reference["name"], reference["job_id"], 600)
    return {
        "name": name,
        "run_dir": run_dir,
        "jobs": [result["job_id"], job_b, job_c],
        "legs": legs,
        "env": env,
        "reference_dir": Path(reference["run_dir"]),
    }


@pytest.mark.slurm
def test_one_deepspeed_job_spans_both_nodes_without_ssh(node_count_run):
    run_dir, jobs = node_count_run["run_dir"], node_count_run["jobs"]
    events = runs.read_events(run_dir)
    parse_hostfile = pytest.importorskip("deepspeed.launcher.runner")._parse_hostfile
    hostfile = (run_dir / f"hostfile-{jobs[0]}").read_text()
    assert dict(parse_hostfile(hostfile.splitlines())) == {"n1": 2, "n2": 2}
    launches = [e for e in events if e["event"] == "launch" and e["job_id"] == jobs[0]]
    assert sorted((e["host"], e["node_rank"]) for e in launches) == [("n1", 0), ("n2", 1)]
    for launch in launches:
        argv = launch["argv"]
        assert "--no_ssh" in argv and argv[argv.index("--node_rank") + 1] == str(launch["node_rank"])
        assert argv[argv.index("--master_addr") + 1] == "n1"
        assert argv[argv.index("--hostfile") + 1] == str(run_dir / f"hostfile-{jobs[0]}")
    starts = [e for e in events if e["event"] == "train_start"]
    assert starts[0]["world_size"] == 4
    output = (run_dir / f"slurm-{jobs[0]}.out").read_text()
    assert "dist_world_size=4" in output and "4 (2 nodes x 2 ranks, gloo)" in output
    assert not re.search(r"\bpdsh\b|ssh -o|PDSH_RCMD", output)
    assert not (Path(node_count_run["env"]["HPCDS_RUNS_DIR"]).parent / "remote-shell-calls").exists()

    # Leg C ran on both nodes again and finished; status shows both nodes and world size 4.
    row = _status_cli(node_count_run["env"], node_count_run["name"])
    assert (row["job_id"], row["state"], row["nodes"], row["world_size"]) == (jobs[2], "COMPLETED", "n[1-2]", 4)
    assert (row["step"], row["max_steps"], row["last_checkpoint_step"]) == (8, 8, 8)


@pytest.mark.slurm
def test_resume_on_another_node_count_and_back(node_count_run):
    run_dir, legs = node_count_run["run_dir"], node_count_run["legs"]
    events = runs.read_events(run_dir)
    starts = [e for e in events if e["event"] == "train_start"]
    errors = [e["message"] for e in events if e["event"] == "error"]
    assert not errors, f"leg B ended {legs['B']['state']} with {errors[0]!r}"
    assert [(s["world_size"], s["step"], s["resumed_from"]) for s in starts] == [
        (4, 0, None),
        (2, 4, "step_4"),
        (4, 6, "step_6"),
    ]
    converted = [
        (e["tag"], e["from_world_size"], e["to_world_size"]) for e in events if e["event"] == "checkpoint_converted"
    ]
    assert converted == [("step_4", 4, 2), ("step_6", 2, 4)]
    losses = _step_losses(run_dir)
    reference = _step_losses(node_count_run["reference_dir"])
    print(f"losses by step (2 nodes 1-4, 1 node 5-6, 2 nodes 7-8): {losses}\nuninterrupted on 2 nodes: {reference}")
    assert sorted(losses) == sorted(reference) == list(range(1, 9))
    assert [losses[s] for s in range(1, 5)] == [reference[s] for s in range(1, 5)]  # same job until the change
    for before in (4, 6):
        jump = abs(losses[before + 1] - losses[before]) / losses[before]
        assert jump < LOSS_JUMP_TOLERANCE, f"loss {losses[before]} at step {before} -> {losses[before + 1]}"
    for step in range(5, 9):
        off = abs(losses[step] - reference[step]) / reference[step]
        assert off < LOSS_REFERENCE_TOLERANCE, f"step {step}: {losses[step]} vs {reference[step]} uninterrupted"


@pytest.mark.slurm
def test_a_rank_dying_on_one_node_ends_the_whole_job(cluster_env, submitted):
    """SIGKILL one trainer rank on n2 (found through /proc: the nodes are namespaces of this machine); the job must
    end in seconds, not at its time limit. No checkpoint is committed before the kill, so the batch script's policy
    classifies the ending `failed` and does not requeue it (a failure after new progress would be requeued)."""
    env = cluster_env
    done = _hpcds(
        Path(env["HPCDS_RUNS_DIR"]),
        "submit",
        QUICKSTART,
        *TINY,
        "--set",
        "training.max_steps=100000",
        "--set",
        "checkpoint.every_steps=100000",
        "--nodes",
        "2",
        "--json",
        env=env,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    submitted.append(result["job_id"])
    run_dir = Path(result["run_dir"])
    deadline = time.monotonic() + 600
    while (
        not (run_dir / facts.PROGRESS_FILE).is_file()
        or json.loads((run_dir / facts.PROGRESS_FILE).read_text())["step"] < 2
    ):
        assert time.monotonic() < deadline, "the job never reached step 2"
        time.sleep(0.5)
    victim = _rank_process(run_dir, rank=3)
    killed_at, killed_wall = time.monotonic(), time.time()
    os.kill(victim, signal.SIGKILL)
    row, ended_at = _wait_ended(env, result["name"], result["job_id"], 120)
    end_s = ended_at - killed_at
    print(f"rank 3 killed -> job {row['state']} in {end_s:.1f} s")
    assert row["state"] == "FAILED" and row["exit_code"] not in (0, 75)
    assert end_s < 60
    events = runs.read_events(run_dir)
    exits = [e for e in events if e["event"] == "exited"]
    assert len(exits) == 1 and exits[0]["rc"] not in (0, 75) and exits[0].get("class", "failed") == "failed"
    print(f"exited event {exits[0]['time'] - killed_wall:.1f} s after the kill: {exits[0]}")
    assert not [e for e in events if e["event"] in ("requeue", "failure_requeue", "finished", "stopped")]
    print("error events:", [e["message"][:120] for e in events if e["event"] == "error"])


def _rank_process(run_dir: Path, rank: int) -> int:
    """The pid of the trainer process with RANK=`rank` for this run directory."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"hpcds.train" in cmdline and str(run_dir).encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    pytest.fail(f"no trainer process with RANK={rank} for {run_dir}")
