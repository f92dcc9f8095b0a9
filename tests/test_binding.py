"""CPU binding on the project's real two-node Slurm cluster (scripts/local-slurm up, TaskPlugin=task/affinity).

The quickstart, cut to two steps, runs on both nodes with `slurm.cpus_per_task=1`: the batch script passes the count to
srun, and Slurm binds each node's `hpcds launch` to its CPU; DeepSpeed's launcher and the ranks inherit the mask. The
trainer records no affinity, so the test reads it from outside while the job runs: the nodes are network and UTS
namespaces that share this machine's PID namespace, so every process of the job step is visible here, found by the
SLURM_JOB_ID in its environment. Each must run on exactly the CPUs `scontrol show job -d` lists for its node: one CPU
out of the node's two. Under TaskPlugin=task/none every process may use all of the machine's CPUs and the test fails.
It does not tell srun's `--cpus-per-task` from its absence: on these 1-socket nodes Slurm 22.05 binds a step without
it to the socket, which within this job's CPUs is the same one CPU (the flag itself is golden-tested).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hpcds import slurm
from hpcds.cli.jobs_cmd import StatusSource

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
TWO_STEPS = ["--set", "training.max_steps=2", "--set", "training.warmup_steps=1"]
TWO_STEPS += ["--set", "checkpoint.every_steps=2", "--set", "training.eval_interval_steps=0"]
CPUS_PER_TASK = 1
RANKS_PER_NODE = 2


def parse_cpu_list(text: str) -> set[int]:
    """'0-2,5' -> {0, 1, 2, 5}: the list syntax of scontrol's CPU_IDs and of /proc's Cpus_allowed_list."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def allocated_cpus(job_id: str) -> dict[str, set[int]]:
    """Node name -> the CPU ids the job holds there, from `scontrol show job -d` (Nodes=n[1-2] CPU_IDs=0 lines)."""
    text = slurm.run(["scontrol", "show", "job", "-d", job_id])
    cpus: dict[str, set[int]] = {}
    for nodelist, cpu_ids in re.findall(r"^\s*Nodes=(\S+) CPU_IDs=(\S+)", text, re.MULTILINE):
        for node in slurm.show_hostnames(nodelist):
            cpus[node] = parse_cpu_list(cpu_ids)
    return cpus


def job_step_processes(job_id: str) -> dict[int, dict]:
    """PID -> node, rank (None for the launchers), command line and CPU affinity of the job's srun step processes."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            env = proc.environ()
            if env.get("SLURM_JOB_ID") != job_id or env.get("SLURM_STEP_ID") in (None, "batch", "extern"):
                continue
            cmdline = proc.info["cmdline"] or []
            is_rank = any(a == "-m" and b == "hpcds.train" for a, b in itertools.pairwise(cmdline))
            found[proc.pid] = {
                "node": env.get("SLURMD_NODENAME"),
                "rank": int(env["RANK"]) if is_rank and "RANK" in env else None,
                "cmdline": " ".join(cmdline)[:160],
                "cpus": set(proc.cpu_affinity()),
            }
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_every_rank_runs_on_the_cpus_slurm_allocated(slurm_cluster, submitted, tmp_path):
    env = {**os.environ, "HPCDS_RUNS_DIR": str(tmp_path)}
    args = ["--nodes", "2", "--set", f"slurm.ranks_per_node={RANKS_PER_NODE}"]
    args += ["--set", f"slurm.cpus_per_task={CPUS_PER_TASK}", "--json", *TWO_STEPS]
    done = subprocess.run(
        [sys.executable, "-m", "hpcds", "submit", QUICKSTART, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    job_id, run_dir = result["job_id"], Path(result["run_dir"])
    submitted.append(job_id)
    world_size = 2 * RANKS_PER_NODE

    # Sample until every rank has been seen; a process that changed its own mask later would show as a second value.
    seen: dict[int, dict] = {}
    masks: dict[int, list[set[int]]] = {}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for pid, proc in job_step_processes(job_id).items():
            seen.setdefault(pid, proc)
            if not masks.get(pid) or masks[pid][-1] != proc["cpus"]:
                masks.setdefault(pid, []).append(proc["cpus"])
        if len({p["rank"] for p in seen.values() if p["rank"] is not None}) == world_size:
            break
        time.sleep(0.2)
    ranks = {p["rank"]: p for p in seen.values() if p["rank"] is not None}
    assert sorted(ranks) == list(range(world_size)), f"ranks seen: {sorted(ranks)}; processes: {seen}"
    assert {p["node"] for p in ranks.values()} == {"n1", "n2"}

    allocated = allocated_cpus(job_id)
    assert sorted(allocated) == ["n1", "n2"]
    assert all(len(cpus) == CPUS_PER_TASK for cpus in allocated.values()), allocated
    wrong = {
        pid: (p["node"], p["rank"], p["cmdline"], masks[pid], allocated[p["node"]])
        for pid, p in seen.items()
        if masks[pid] != [allocated[p["node"]]]
    }
    assert not wrong, f"processes whose CPU affinity is not the node's allocated CPUs: {wrong}"

    # The binding must not stop the run: it trains its two steps on one CPU per node.
    deadline = time.monotonic() + 240
    while (row := StatusSource().rows([run_dir])[0].to_dict())["state"] not in ("COMPLETED", "FAILED", "CANCELLED"):
        assert time.monotonic() < deadline, f"still {row['state']} after 240 s"
        time.sleep(1)
    assert (row["state"], row["step"]) == ("COMPLETED", 2), (run_dir / f"slurm-{job_id}.out").read_text()[-3000:]
