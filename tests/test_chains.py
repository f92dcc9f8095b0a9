"""Chains on the project's real two-node Slurm cluster: `hpcds submit --after` (sbatch --dependency=afterok) with
`model.init_from` of the run it waits for, then a Slurm continue of the first run (`hpcds resume`).

The jobs are the quickstart (tiny Mamba, DeepSpeed on CPU ranks) cut to a few steps. Every job the module submits
is cancelled at the end, finished or not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_cluster import FEW_STEPS, QUICKSTART, hpcds, wait_for
from test_cluster import submit as submit_quickstart

from hpcds import facts, runs, slurm
from hpcds.cli.jobs_cmd import StatusSource

pytestmark = pytest.mark.slurm


def submit(runs_root: Path, submitted: list[str], *args: str) -> dict:
    return submit_quickstart(runs_root, submitted, "--set", "wandb.mode=disabled", *args)


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in runs.read_events(run_dir) if e["event"] == kind]


def test_a_chain_waits_for_its_first_run_and_starts_from_its_weights(tmp_path, submitted):
    root = tmp_path
    first = submit(root, submitted, "--name", "chain1")
    name1, job1 = first["name"], first["job_id"]

    # Its weights are not there yet: init_from of it without --after is refused, nothing created or queued.
    early = hpcds(
        root,
        "submit",
        QUICKSTART,
        *FEW_STEPS,
        "--set",
        "wandb.mode=disabled",
        "--name",
        "chain2",
        "--set",
        f"model.init_from={name1}",
    )
    assert early.returncode == 1 and f"--after {name1}" in early.stderr and "Traceback" not in early.stderr
    assert [d.name for d in runs.list_runs(root)] == [name1]

    second = submit(root, submitted, "--name", "chain2", "--after", name1, "--set", f"model.init_from={name1}:final")
    name2, job2 = second["name"], second["job_id"]
    waiting = StatusSource().rows([root / name2])[0]
    # Slurm's own record of the dependency (squeue %E), and hpcds status's reason.
    dependency = slurm.run(["squeue", "-h", "-j", job2, "-o", "%E"]).strip()
    assert f"afterok:{job1}" in dependency, dependency
    assert waiting.state == "PENDING" and waiting.reason == f"Dependency (afterok:{job1})", waiting
    listed = hpcds(root, "status", name2)
    assert f"Dependency (afterok:{job1})" in listed.stdout, listed.stdout

    done1 = wait_for(root, name1, {"COMPLETED", "FAILED", "CANCELLED"}, timeout_s=180)
    assert done1["state"] == "COMPLETED", hpcds(root, "logs", name1).stdout[-3000:]
    done2 = wait_for(root, name2, {"COMPLETED", "FAILED", "CANCELLED"}, timeout_s=180)
    assert done2["state"] == "COMPLETED", hpcds(root, "logs", name2).stdout[-3000:]
    run1, run2 = root / name1, root / name2
    started1 = max(e["time"] for e in events(run1, "finished"))
    started2 = min(e["time"] for e in events(run2, "started"))
    assert started2 >= started1  # the second job started only after the first one's training had finished
    (loaded,) = events(run2, "init_from")
    assert loaded["source_run"] == name1 and loaded["step"] == 4 and loaded["tag"] == "step_4"
    (probe,) = events(run2, "init_probe")
    assert probe["ok"] and abs(probe["loss"] - probe["saved_loss"]) <= 1e-5 * abs(probe["saved_loss"])
    assert [e["step"] for e in events(run2, "train_start")] == [0]

    # A Slurm continue of the first run: its own run directory submitted again with more steps.
    more = hpcds(root, "resume", name1, "--set", "training.max_steps=6")
    assert more.returncode == 0, more.stderr
    job3 = runs.read_meta(run1)["job_ids"][-1]
    submitted.append(job3)
    assert job3 != job1 and f"continued as job {job3}" in more.stdout
    done3 = wait_for(root, name1, {"COMPLETED", "FAILED", "CANCELLED"}, timeout_s=180)
    assert done3["state"] == "COMPLETED" and done3["job_id"] == job3, hpcds(root, "logs", name1).stdout[-3000:]
    assert [e["step"] for e in events(run1, "train_start")] == [0, 4]
    assert events(run1, "finished")[-1]["step"] == 6
    assert yaml.safe_load((run1 / "spec-1.yaml").read_text())["training"]["max_steps"] == 4
    assert yaml.safe_load((run1 / facts.SPEC_FILE).read_text())["training"]["max_steps"] == 6
    shown = hpcds(root, "status", name1)
    assert "spec changes:" in shown.stdout and "from step 4: training.max_steps 4 -> 6" in shown.stdout, shown.stdout
