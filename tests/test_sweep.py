"""Sweeps as Slurm job arrays (`hpcds sweep`): the grid, the array's batch script, squeue's array rows, status and
cancel of a sweep, and on the real test cluster a 4-task sweep at most 2 at a time whose last task is preempted
through the urgent partition mid-array, resumes exactly where it stopped, and requeues only itself.

Slurm facts the script relies on (seen on the test cluster, Slurm 22.05): every task of an array gets its own job id
(SLURM_JOB_ID) when it starts and keeps it across requeues, and the array's last task gets the array job id itself,
so `scontrol requeue $SLURM_JOB_ID` in that task requeues the whole array; `<array job>_<task>` names one task for
requeue, requeuehold, update and release.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_bad_nodes import STAND_IN, line
from test_preemption import (
    QUICKSTART,
    SMALL,
    events,
    hpcds,
    losses_by_step,
    no_leftovers,
    wait_until,
    wandb_records,
)

from hpcds import facts, runs, slurm
from hpcds.cli.jobs_cmd import StatusSource
from hpcds.errors import SpecError
from hpcds.render import render_sbatch
from hpcds.slurm.status import run_status
from hpcds.spec import load_spec
from hpcds.spec.grid import expand, parse_grid, point_specs

ROOT = Path(__file__).resolve().parents[1]


# -- pure parts ------------------------------------------------------------------------------------------------------
def test_grid_points_are_every_combination_first_axis_slowest():
    axes = parse_grid(["training.lr=1e-4,3e-4", "model.n_layer=2,4"])
    points = expand(axes)
    assert points == [
        {"training.lr": "1e-4", "model.n_layer": 2},
        {"training.lr": "1e-4", "model.n_layer": 4},
        {"training.lr": "3e-4", "model.n_layer": 2},
        {"training.lr": "3e-4", "model.n_layer": 4},
    ]
    base = load_spec(QUICKSTART, [], {}).model_dump(mode="json")
    specs = point_specs(base, points)
    assert [(s.training.lr, s.model.n_layer) for s in specs] == [(1e-4, 2), (1e-4, 4), (3e-4, 2), (3e-4, 4)]


def test_every_problem_of_every_point_at_once_naming_the_points():
    with pytest.raises(SpecError) as caught:
        parse_grid(["slurm.nodes=1,2", "training.lr", "training.lr=1,1", "name=a,b"])
    text = str(caught.value)
    assert "4 problems" in text and "--grid slurm.nodes" in text and "--grid name" in text and "repeats" in text
    base = load_spec(QUICKSTART, [], {}).model_dump(mode="json")
    with pytest.raises(SpecError) as caught:
        point_specs(base, expand(parse_grid(["training.lr=-1,1e-3", "model.n_layer=0,2", "training.lrr=1"])))
    problems = {(p.path, p.message.split(" [")[1]) for p in caught.value.problems}
    assert ("training.lr", "task 0 (training.lr=-1 model.n_layer=0 training.lrr=1); "
            "task 1 (training.lr=-1 model.n_layer=2 training.lrr=1)]") in problems  # fmt: skip
    assert ("model.n_layer", "task 0 (training.lr=-1 model.n_layer=0 training.lrr=1); "
            "task 2 (training.lr=1e-3 model.n_layer=0 training.lrr=1)]") in problems  # fmt: skip
    assert ("training.lrr", "every task]") in problems  # said once, not once per task


def test_squeue_array_rows_from_the_test_cluster():
    jobs = {job.job_id: job for job in slurm.parse_squeue((ROOT / "tests/captured/squeue_array.txt").read_text())}
    array = next(iter(jobs)).split("_")[0]
    assert sorted(jobs) == [f"{array}_{task}" for task in range(5)]  # the 3 pending together: one row each
    assert [jobs[f"{array}_{t}"].state for t in range(5)] == ["RUNNING"] * 2 + ["PENDING"] * 3
    assert jobs[f"{array}_3"].reason == "JobArrayTaskLimit" and jobs[f"{array}_0"].nodelist == "n1"
    assert slurm.parse.array_task_ids("7_[1-3,8,10-14:2%2]") == ["7_1", "7_2", "7_3", "7_8", "7_10", "7_12", "7_14"]
    assert slurm.parse.array_task_ids("7_4") == ["7_4"] and slurm.parse.array_task_ids("7") == ["7"]


def test_an_array_tasks_status_follows_its_own_job_id():
    log = [  # the run knows its task as 9_3; Slurm gave the task job id 12 when it started (and keeps it)
        {"time": 0, "event": "submitted", "job_id": "9_3", "job_name": "q", "sweep": "q-sweep-1", "task": 3},
        {"time": 1, "event": "started", "job_id": "12", "restart": 0, "array_task": "9_3"},
        {"time": 5, "event": "train_start", "step": 0},
        {"time": 9, "event": "exited", "job_id": "12", "restart": 0, "rc": 75, "class": "requeued"},
        {"time": 20, "event": "started", "job_id": "12", "restart": 1, "array_task": "9_3"},
        {"time": 25, "event": "train_start", "step": 4},
        {"time": 30, "event": "exited", "job_id": "12", "restart": 1, "rc": 0, "class": "finished"},
    ]
    row = run_status("q-t3", {"job_ids": ["9_3"]}, log, None, {}, {}, 40.0)  # Slurm answered and forgot it
    assert (row.job_id, row.sweep, row.state, row.restarts, row.ending) == (
        "9_3",
        "q-sweep-1",
        "COMPLETED",
        1,
        "finished",
    )
    assert [h["resumed_from_step"] for h in row.history] == [0, 4]
    running = slurm.parse_squeue("9_3|RUNNING|None|n2|1|0:05|UNLIMITED|1|debug|2026-12-06T12:00:00|q|\n")
    row = run_status("q-t3", {"job_ids": ["9_3"]}, log[:5], None, {}, {j.job_id: j for j in running}, 40.0)
    assert (row.source, row.state, row.nodes) == ("squeue", "RUNNING", "n2")


def array_script(tmp_path: Path, tasks: int = 2, max_parallel: int | None = 2) -> tuple[str, list[Path]]:
    spec = load_spec(QUICKSTART, ["slurm.max_requeues=5"], {})
    dirs = [tmp_path / f"q-t{i}" for i in range(tasks)]
    return render_sbatch(spec, str(tmp_path / "q-sweep"), ["hpcds"], array_tasks=[str(d) for d in dirs],
                         max_parallel=max_parallel), dirs  # fmt: skip


def test_the_array_script_passes_bash_and_shellcheck(tmp_path):
    script, dirs = array_script(tmp_path, 4, 2)
    assert "#SBATCH --array=0-3%2\n" in script and f"#SBATCH --output={tmp_path}/q-sweep/t%a/slurm-%j.out" in script
    assert f"  3) RUN_DIR={dirs[3]} ;;" in script
    assert "--array=0-3\n" in array_script(tmp_path, 4, None)[0]
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(["shellcheck", "-s", "bash", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def run_array_task(tmp_path: Path, task: int, srun_events: list[str], srun_rc: int) -> tuple[list[str], Path]:
    """The array script run by bash as task `task` of array 9 whose own job id is 9 (the array's last task, which
    holds the array's id), with stand-ins for Slurm's tools: the calls they got, and the task's run directory."""
    script, dirs = array_script(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("srun", "scontrol", "sinfo", "squeue", "scancel"):
        (bin_dir / name).write_text(STAND_IN)
        (bin_dir / name).chmod(0o755)
    for run_dir in dirs:
        run_dir.mkdir()
        (run_dir / "events.jsonl").touch()
    (tmp_path / "job.sbatch").write_text(script)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "CALLS": str(tmp_path / "calls"),
        "RUN_DIR": str(dirs[task]),  # where the srun stand-in writes the trainer's events
        "SRUN_EVENTS": "\n".join(srun_events),
        "SRUN_RC": str(srun_rc),
        "PARTITION_NODES": "n1 n2 n3",
        "SLURM_JOB_ID": "9",
        "SLURM_ARRAY_JOB_ID": "9",
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_JOB_NODELIST": "n2",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_PARTITION": "debug",
        "HPCDS_HANG_LIMIT_S": "0",
    }
    subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, capture_output=True, text=True, timeout=60)
    return (tmp_path / "calls").read_text().splitlines(), dirs[task]


def test_an_array_task_requeues_and_excludes_nodes_for_itself_only(tmp_path):
    stopped = [line("checkpoint", step=4), line("stopped", signal="SIGUSR2", step=4)]
    calls, run_dir = run_array_task(tmp_path / "a", 1, stopped, facts.EXIT_REQUEUE)
    assert [c for c in calls if c.startswith("scontrol requeue")] == ["scontrol requeue 9_1"]  # never `requeue 9`
    (started,) = events(run_dir, "started")
    assert (started["job_id"], started["array_task"]) == ("9", "9_1")
    assert not events(tmp_path / "a" / "q-t0")  # the other task's log is untouched
    failed = [line("checkpoint", step=4), line("error", message="RuntimeError: boom", rank="0", host="n2")]
    calls, _ = run_array_task(tmp_path / "b", 1, failed, 1)
    changes = [c for c in calls if (c.startswith("scontrol") and c.split()[1] != "show") or "show job" in c]
    assert changes == [
        "scontrol show job 9_1",
        "scontrol requeuehold 9_1",
        "scontrol update JobId=9_1 ExcNodeList=n2",
        "scontrol release 9_1",
    ]


def test_sweep_dry_run_refuses_bad_points_and_creates_one_run_per_task(tmp_path):
    bad = hpcds(tmp_path, "sweep", QUICKSTART, "--grid", "training.lr=-1,1e-3", "--grid", "slurm.time=1,2", "--dry-run")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert "--grid slurm.time" in bad.stderr and not list(tmp_path.iterdir())
    bad = hpcds(
        tmp_path, "sweep", QUICKSTART, "--grid", "training.lr=-1,1e-3", "--grid", "model.n_layer=0,2", "--dry-run"
    )
    assert bad.returncode == 1 and "task 0 (training.lr=-1 model.n_layer=0)" in bad.stderr, bad.stderr
    assert "task 2 (training.lr=1e-3 model.n_layer=0)" in bad.stderr and not list(tmp_path.iterdir())
    done = hpcds(tmp_path, "sweep", QUICKSTART, "--grid", "training.lr=1e-3,3e-3", "--max-parallel", "1",
                 "--dry-run", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    sweep_dir = Path(record["sweep_dir"])
    assert "#SBATCH --array=0-1%1" in (sweep_dir / "job.sbatch").read_text()
    for task in record["tasks"]:
        run_dir = tmp_path / task["run"]
        assert os.path.samefile(sweep_dir / f"t{task['index']}", run_dir)
        pinned = load_spec(run_dir / facts.SPEC_FILE, [], {})
        assert pinned.training.lr == [1e-3, 3e-3][task["index"]]
        assert pinned.slurm.env["WANDB_RUN_GROUP"] == record["name"]
        assert runs.read_meta(run_dir)["sweep"] == record["name"]
    assert len({runs.read_meta(tmp_path / t["run"])["wandb_id"] for t in record["tasks"]}) == 2
    table = hpcds(tmp_path, "status", record["name"])
    assert f"sweep {record['name']}" in table.stdout and "2 tasks: 2 NOT_SUBMITTED" in table.stdout, table.stdout


# -- on the test cluster --------------------------------------------------------------------------------------------
MAX_STEPS = 16
# Tasks 0 and 1 (and 2 and 3) train the same: they differ only in how many checkpoints they keep, so each task's twin
# is its uninterrupted reference. Each task takes a whole node (2 CPUs), so preempting one node evicts one task.
GRID = ["--grid", "training.lr=6e-3,2e-3", "--grid", "checkpoint.keep_last=2,3", "--max-parallel", "2"]
SWEEP_SPEC = [*SMALL, "--set", f"training.max_steps={MAX_STEPS}", "--set", "checkpoint.every_steps=4"]
SWEEP_SPEC += ["--set", "slurm.cpus_per_task=2"]
# A step takes at least 1 s in each task's first allocation, so the preemption lands mid-run.
PACE = {"HPCDS_TEST_FAULT": "step_sleep:1:1"}


def array_states(array_job: str) -> dict[str, str]:
    """Slurm's state of each task of a job array, one line per task (`-r`), ended ones too (`-t all`)."""
    done = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", array_job, "-o", "%i %T"], capture_output=True,
                          text=True)  # fmt: skip
    return dict(line.split() for line in done.stdout.splitlines() if line.strip())


def task_ended(run_dir: Path) -> bool:
    exits = events(run_dir, "exited")
    return bool(exits) and exits[-1].get("class") == "finished"


@pytest.fixture(scope="module")
def sweep_result(slurm_cluster, tmp_path_factory):
    """The sweep, driven to its end: its record, the preempted task, and what the driver saw and timed."""
    runs_root = tmp_path_factory.mktemp("sweep-runs")
    seen: dict = {"preemptor": None, "parked": None}
    started = time.monotonic()
    try:
        done = hpcds(runs_root, "sweep", QUICKSTART, *SWEEP_SPEC, *GRID, "--json", env=PACE)
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        seen["submitted_s"] = time.monotonic() - started
        dirs = [runs_root / task["run"] for task in record["tasks"]]
        # A second sweep that must wait an hour: status and cancel of a pending array.
        parked = hpcds(runs_root, "sweep", QUICKSTART, *SMALL, "--grid", "training.lr=1e-3,2e-3,3e-3", "--name",
                       "parked", "--set", 'slurm.extra_sbatch=["--begin=now+3600"]', "--json")  # fmt: skip
        assert parked.returncode == 0, parked.stderr
        seen["parked"] = json.loads(parked.stdout)
        seen["parked_status"] = hpcds(runs_root, "status", seen["parked"]["name"], "--json").stdout
        seen["task_cancel"] = hpcds(runs_root, "cancel", seen["parked"]["tasks"][0]["run"])  # one task alone
        seen["after_task_cancel"] = array_states(seen["parked"]["job_id"])
        seen["parked_cancel"] = hpcds(runs_root, "cancel", seen["parked"]["name"])  # the rest of the array
        seen["parked_after"] = array_states(seen["parked"]["job_id"])
        # The last task holds the array's own job id: preempt it 3 steps into its first allocation.
        last = dirs[-1]

        def three_steps():
            begun = events(last, "train_start")
            return bool(begun) and max(losses_by_step(last), default=0) >= 3

        wait_until("task 3: 3 steps", three_steps, 600)
        node = events(last, "started")[-1]["nodes"]
        urgent = ["sbatch", "--parsable", "-p", "urgent", "-w", node, "--exclusive", "-J", "hpcds-test-urgent"]
        seen["preemptor"] = slurm.parse_sbatch_parsable(slurm.run([*urgent, "-o", "/dev/null", "--wrap=sleep 5"]))
        seen["preempted_at_s"] = time.monotonic() - started
        seen["others_at_preemption"] = {d.name: len(events(d, "started")) for d in dirs[:-1]}
        wait_until("every task to finish", lambda: all(task_ended(d) for d in dirs), 900, 1)
        seen["wall_s"] = time.monotonic() - started
        seen["leftovers"] = [left for d in dirs for left in no_leftovers(str(events(d, "started")[-1]["job_id"]), d)]
        seen["status"] = json.loads(hpcds(runs_root, "status", record["name"], "--json").stdout)
        seen["table"] = hpcds(runs_root, "status", record["name"]).stdout
        seen["cancel_done"] = hpcds(runs_root, "cancel", record["name"])
        yield record, dirs, seen
    finally:
        for job in [seen.get("preemptor"), *(s["job_id"] for s in [seen.get("parked")] if s)]:
            if job:
                subprocess.run(["scancel", job], capture_output=True, check=False)
        for path in runs_root.glob("*-sweep-*/sweep.json"):
            subprocess.run(["scancel", str(json.loads(path.read_text())["job_id"])], capture_output=True, check=False)


def final_weights(run_dir: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from hpcds.train import checkpoint as ck

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / facts.CHECKPOINT_DIR), tag=ck.tag_for(MAX_STEPS))


def assert_same_training(reference: Path, other: Path) -> None:
    import torch

    want, got = losses_by_step(reference), losses_by_step(other)
    assert sorted(want) == list(range(1, MAX_STEPS + 1)) and got == want, f"{other.name} differs from {reference.name}"
    ref, new = final_weights(reference), final_weights(other)
    assert ref.keys() == new.keys() and all(torch.equal(t, new[name]) for name, t in ref.items())


@pytest.mark.slurm
@pytest.mark.deepspeed
def test_a_task_preempted_mid_array_resumes_exactly_and_alone(sweep_result):
    record, dirs, seen = sweep_result
    array = str(record["job_id"])
    last = dirs[-1]
    # The preempted task: Slurm's warning at preemption, a save at that step, a requeue of this task alone, and a
    # second allocation (same job id, the array's own) that resumes exactly there.
    stops = events(last, "stopped")
    assert [e["signal"] for e in stops] == ["SIGUSR2"], stops
    assert [e["step"] for e in events(last, "train_start")] == [0, stops[0]["step"]]
    assert [e["class"] for e in events(last, "exited")] == ["requeued", "finished"]
    starts = events(last, "started")
    assert {(e["job_id"], e["array_task"]) for e in starts} == {(array, f"{array}_3")}  # the array's id: see above
    assert [e["restart"] for e in starts] == [0, 1]
    # The other tasks: one allocation each, from step 0 to the end, never requeued with it.
    for run_dir in dirs[:-1]:
        assert [e["restart"] for e in events(run_dir, "started")] == [0], run_dir.name
        assert [e["class"] for e in events(run_dir, "exited")] == ["finished"], run_dir.name
        assert [e["step"] for e in events(run_dir, "train_start")] == [0] and not events(run_dir, "stopped")
    assert_same_training(dirs[2], last)  # its twin, uninterrupted
    assert_same_training(dirs[0], dirs[1])  # twins train the same, so the comparison above means something
    assert losses_by_step(dirs[0]) != losses_by_step(dirs[2])  # and each task got its own learning rate
    # At most 2 tasks at once (--max-parallel 2), from the batch scripts' own start and exit times.
    spans = [(e["time"], +1) for d in dirs for e in events(d, "started")]
    spans += [(e["time"], -1) for d in dirs for e in events(d, "exited")]
    running = peak = 0
    for _, change in sorted(spans, key=lambda s: (s[0], s[1])):
        running += change
        peak = max(peak, running)
    assert peak == 2, spans
    assert not seen["leftovers"], seen["leftovers"]
    first = min(e["time"] for d in dirs for e in events(d, "started"))
    for index, run_dir in enumerate(dirs):  # the timeline, for people reading the test's output
        steps = [(e["event"], round(e["time"] - first), e.get("nodes") or e.get("class") or e.get("step"))
                 for e in events(run_dir) if e["event"] in ("started", "train_start", "stopped", "exited")]  # fmt: skip
        print(f"task {index}: {steps}")
    print(
        f"sweep: submitted in {seen['submitted_s']:.1f} s, task 3 preempted {seen['preempted_at_s']:.0f} s in at step "
        f"{stops[0]['step']}, all 4 tasks finished at {seen['wall_s']:.0f} s; starts of the other tasks then: "
        f"{seen['others_at_preemption']}"
    )


@pytest.mark.slurm
@pytest.mark.deepspeed
def test_each_task_is_its_own_wandb_run_in_the_sweeps_group(sweep_result):
    record, dirs, _ = sweep_result
    for run_dir in dirs:
        found = {
            (r.run.run_id, r.run.run_group)
            for folder in (run_dir / "wandb").glob("offline-run-*")
            for path in folder.glob("run-*.wandb")
            for r in wandb_records(path)
            if r.WhichOneof("record_type") == "run"
        }
        assert found == {(runs.read_meta(run_dir)["wandb_id"], record["name"])}, (run_dir.name, found)


@pytest.mark.slurm
@pytest.mark.deepspeed
def test_status_shows_the_sweep_as_one_group_and_cancel_takes_the_whole_array(sweep_result):
    record, dirs, seen = sweep_result
    rows = seen["status"]
    assert [row["name"] for row in rows] == [d.name for d in dirs]
    assert {row["sweep"] for row in rows} == {record["name"]}
    assert [row["job_id"] for row in rows] == [f"{record['job_id']}_{i}" for i in range(4)]
    assert [row["restarts"] for row in rows] == [0, 0, 0, 1] and {row["step"] for row in rows} == {MAX_STEPS}
    assert f"sweep {record['name']}" in seen["table"] and "4 tasks: 4 COMPLETED" in seen["table"], seen["table"]
    assert seen["cancel_done"].returncode == 1 and "no task" in seen["cancel_done"].stderr  # a finished sweep
    parked = seen["parked"]
    pending = json.loads(seen["parked_status"])
    tasks = [f"{parked['job_id']}_{i}" for i in range(3)]
    assert [(row["job_id"], row["state"]) for row in pending] == [(task, "PENDING") for task in tasks]
    assert seen["task_cancel"].returncode == 0, seen["task_cancel"].stderr
    # A task cancelled before it ever started leaves the array at once: Slurm lists it no more.
    assert seen["after_task_cancel"] == dict.fromkeys(tasks[1:], "PENDING")
    assert seen["parked_cancel"].returncode == 0 and "(2 tasks)" in seen["parked_cancel"].stdout, seen["parked_cancel"]
    assert seen["parked_after"] == dict.fromkeys(tasks[1:], "CANCELLED")
    rows = StatusSource().rows([Path(parked["sweep_dir"]).parent / task["run"] for task in parked["tasks"]])
    assert [row.state for row in rows] == ["CANCELLED"] * 3  # from squeue, or the event logs once Slurm forgot
    for task in parked["tasks"]:
        cancelled = events(Path(parked["sweep_dir"]).parent / task["run"], "cancelled")
        assert [e["job_id"] for e in cancelled] == [f"{parked['job_id']}_{task['index']}"]


def test_sweep_does_not_import_the_training_stack(tmp_path):
    from test_light_imports import HEAVY, PROBE

    argv = ["sweep", QUICKSTART, "--grid", "training.lr=1e-3,2e-3", "--dry-run", "--runs-dir", str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", PROBE.format(heavy=set(HEAVY)), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    code, heavy = json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("HEAVY=")][-1][len("HEAVY=") :])
    assert (code, heavy) == (0, []), done.stderr[-2000:]
