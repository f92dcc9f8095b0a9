"""Preemption and auto-resume end to end on the project's real two-node Slurm cluster (scripts/local-slurm up).

Every case is a real job: the quickstart Mamba cut to a few short steps, DeepSpeed on 2 CPU ranks, W&B offline. The
interrupted runs must end exactly like an uninterrupted job of the same spec (per-step losses and final fp32 weights
bit-identical), keep one W&B run id with no step logged twice, and leave no process behind on any node.

The cases run concurrently, each driven by its own thread that watches the run directory and sends Slurm's signals at
the right moment; the tests then check what each driver saw. Group 1 (reference, two warning signals, scontrol
requeue, a failing run) shares the cluster; group 2 (preemption by the urgent partition on n1, the time
limit and a hung run on n2) starts when group 1 is done, so the preemptor evicts only the run it is meant for.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hpcds import facts, runs, slurm
from hpcds.cli.jobs_cmd import StatusSource

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
MAX_STEPS = 24
# Short sequences and small batches: a step takes about a second on a busy 2-core machine, so a signal sent after
# step N lands mid-run. Log (and so heartbeat and W&B) every step; checkpoint every 4.
SMALL = ["--set", "model.max_seq_len=64", "--set", "training.micro_batch_size=4", "--set", "training.warmup_steps=2"]
SMALL += ["--set", "training.eval_interval_steps=0", "--set", "training.log_interval_steps=1"]
SMALL += ["--set", "checkpoint.keep_last=2", "--partition", "debug"]
SPEC = [*SMALL, "--set", f"training.max_steps={MAX_STEPS}", "--set", "checkpoint.every_steps=4"]
CASE_TIMEOUT_S = 900
EXIT_REQUEUE = 75


# -- helpers: the hpcds CLI, the run directory, Slurm -----------------------------------------------------------------
def hpcds(runs_root: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HPCDS_RUNS_DIR": str(runs_root), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "hpcds", *args], capture_output=True, text=True, env=env, cwd=runs_root, timeout=120
    )


def events(run_dir: Path, kind: str | None = None) -> list[dict]:
    try:
        found = runs.read_events(run_dir)
    except FileNotFoundError:
        return []
    return [e for e in found if kind is None or e["event"] == kind]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """Per-step losses rank 0 recorded; a step trained twice (after a rewind) keeps its last record."""
    found = {}
    path = run_dir / "losses.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        found[record["step"]] = record["loss"]
    return found


def last_step(run_dir: Path) -> int:
    return max(losses_by_step(run_dir), default=0)


def slurm_state(job_id: str) -> str | None:
    done = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return done.stdout.strip() or None


def wait_until(what: str, check: Callable[[], object], timeout_s: float, poll_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


def job_ended(run_dir: Path, job_id: str) -> dict | None:
    """The last `exited` event once it ended the job: finished, or failed / hung and not requeued."""
    exits = [e for e in events(run_dir, "exited") if str(e.get("job_id")) == job_id]
    if not exits or exits[-1].get("class") not in ("finished", "failed", "hung"):
        return None
    if slurm_state(job_id) in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
        return None
    last_time = exits[-1]["time"]
    later = [e for e in events(run_dir) if e["time"] >= last_time and e["event"] in ("requeue", "failure_requeue")]
    return None if later else exits[-1]


def leftover_processes(job_id: str, run_dir: Path) -> list[str]:
    """Processes on this machine (both nodes share its process table) that belong to the job or its run directory."""
    found = []
    marker_env = f"SLURM_JOB_ID={job_id}\0".encode()
    marker_dir = str(run_dir).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if marker_env in environ or environ.startswith(marker_env[:-1]) or marker_dir in cmdline:
            words = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{proc.name}: {words[:200]}")
    return found


def leftover_shm(job_id: str, run_dir: Path) -> list[str]:
    """DeepSpeed's shared-memory all-reduce buffers of the job (named after its master port) still in /dev/shm."""
    ports = {e["master_port"] for e in events(run_dir, "started") if str(e.get("job_id")) == job_id}
    assert ports, f"job {job_id} logged no start with its rendezvous port"
    return [p.name for port in ports for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]


def no_leftovers(job_id: str, run_dir: Path, timeout_s: float = 30) -> list[str]:
    """Waits for the job's processes to go (Slurm kills after KillWait); returns what is still there after that:
    processes, and shared memory left in /dev/shm."""
    deadline = time.monotonic() + timeout_s
    while (left := leftover_processes(job_id, run_dir)) and time.monotonic() < deadline:
        time.sleep(1)
    return left + leftover_shm(job_id, run_dir)


def wandb_records(path: Path) -> list:
    """The protobuf records of one offline `.wandb` file (W&B's LevelDB-style log: 7-byte file header, 32 KiB blocks,
    records with a 7-byte header: CRC32, length, type full/first/middle/last). wandb 0.31 reads it in Go only."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B data file"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # trailer too small for a header: skip to the next block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += block - pos % block
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            pending = chunk
        else:
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir: Path) -> tuple[set[str], list[int]]:
    """(run ids, history steps in logging order) over every offline folder of the run."""
    ids, steps = set(), []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        for path in folder.glob("run-*.wandb"):
            for record in wandb_records(path):
                kind = record.WhichOneof("record_type")
                if kind == "run":
                    ids.add(record.run.run_id)
                elif kind == "history":
                    steps.append(record.history.step.num)
    return ids, steps


def final_weights(run_dir: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from hpcds.train import checkpoint as ck

    return get_fp32_state_dict_from_zero_checkpoint(str(run_dir / facts.CHECKPOINT_DIR), tag=ck.tag_for(MAX_STEPS))


def assert_same_training(reference: Path, resumed: Path) -> None:
    import torch

    want, got = losses_by_step(reference), losses_by_step(resumed)
    assert sorted(want) == list(range(1, MAX_STEPS + 1))
    assert got == want, "per-step losses differ from the uninterrupted run"
    ref_weights, new_weights = final_weights(reference), final_weights(resumed)
    assert ref_weights.keys() == new_weights.keys()
    for name, tensor in ref_weights.items():
        assert torch.equal(tensor, new_weights[name]), f"{name} differs from the uninterrupted run"


def assert_wandb_one_run_no_repeats(run_dir: Path) -> None:
    ids, steps = wandb_history(run_dir)
    assert ids == {runs.read_meta(run_dir)["wandb_id"]}, ids
    assert steps == sorted(set(steps)), f"W&B steps repeated or out of order: {steps}"
    assert steps and steps[-1] == MAX_STEPS


# -- pure parts: no cluster needed -------------------------------------------------------------------------------------
def test_history_follows_each_allocation_of_the_job():
    from hpcds.slurm.status import history_lines, job_history

    log = [
        {"time": 0, "event": "started", "job_id": "7", "restart": 0},
        {"time": 5, "event": "train_start", "step": 0},
        {"time": 50, "event": "stopped", "signal": "SIGUSR2", "step": 12},
        {"time": 51, "event": "exited", "job_id": "7", "restart": 0, "rc": 75, "class": "requeued"},
        {"time": 51, "event": "requeue", "job_id": "7", "restart": 0},
        {"time": 60, "event": "started", "job_id": "7", "restart": 1},
        {"time": 65, "event": "train_start", "step": 12},
        {"time": 80, "event": "error", "message": "RuntimeError: boom", "rank": "0"},
        {"time": 80, "event": "error", "message": "RuntimeError: connection closed", "rank": "1"},
        {"time": 81, "event": "exited", "job_id": "7", "restart": 1, "rc": 1, "class": "failed"},
        {"time": 90, "event": "started", "job_id": "8", "restart": 0},  # another job of the run
        {"time": 95, "event": "train_start", "step": 12},
    ]
    history = job_history("7", log)
    assert [(h["restart"], h["resumed_from_step"], h["ending"], h["rc"]) for h in history] == [
        (0, 0, "requeued", 75),
        (1, 12, "failed", 1),
    ]
    assert history[1]["error"] == "RuntimeError: boom"  # the cause, not the other rank's consequence
    assert history_lines(history) == [
        "restart 0: from scratch, SIGUSR2 at step 12, ran 0:51, requeued (exit 75)",
        "restart 1: resumed at 12, ran 0:21, failed (exit 1); RuntimeError: boom",
    ]


def test_an_allocation_killed_before_logging_its_exit_is_not_running_once_the_next_one_started():
    from hpcds.slurm.status import history_lines, job_history

    log = [  # scontrol requeue: the batch shell was killed after KillWait before it wrote `exited`
        {"time": 0, "event": "started", "job_id": "7", "restart": 0},
        {"time": 5, "event": "train_start", "step": 0},
        {"time": 30, "event": "stopped", "signal": "SIGTERM", "step": 6},
        {"time": 40, "event": "started", "job_id": "7", "restart": 1},
        {"time": 45, "event": "train_start", "step": 6},
    ]
    history = job_history("7", log)
    assert [(h["ending"], h["end"]) for h in history] == [("killed", 30.0), (None, None)]
    other = [*log[:3], {"time": 40, "event": "started", "job_id": "8", "restart": 0}]  # the run's next job
    assert [h["ending"] for h in job_history("7", other)] == ["killed"]
    assert history_lines(history) == [
        "restart 0: from scratch, SIGTERM at step 6, ran 0:30, killed",
        "restart 1: resumed at 6, running",
    ]


def test_versions_changed_lists_only_differences():
    from hpcds.versions import changes

    then = {"versions": {"hpcds": "0.1.0", "torch": "2.5.0", "deepspeed": "0.16.0", "mamba-ssm": None}}
    now = {"versions": {**then["versions"], "mamba-ssm": "2.2.4"}}  # missing on the login node: not compared
    assert changes(then, now) == {}
    now["versions"]["torch"] = "2.6.0"
    assert changes(then, now) == {"torch": ["2.5.0", "2.6.0"]}


def test_test_faults_parse():
    from hpcds.train.preempt import parse_faults

    faults = parse_faults("raise_after:3,hang_after:5,signal_at:2:USR2")
    assert (faults.raise_after, faults.hang_after, faults.signal_at_step) == (3, 5, 2)


# -- the cases ------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    args: list[str]
    drive: Callable[[Case], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    run_dir: Path | None = None
    job_id: str | None = None
    notes: dict = field(default_factory=dict)
    ended: dict | None = None
    leftovers: list[str] = field(default_factory=list)
    error: BaseException | None = None
    wall_s: float = 0.0
    thread: threading.Thread | None = None

    def step_at_least(self, step: int, restart: int) -> bool:
        starts = [e for e in events(self.run_dir, "started") if e.get("restart") == restart]
        return bool(starts) and last_step(self.run_dir) >= step and slurm_state(self.job_id) == "RUNNING"

    def trained_since_start(self, steps: int, restart: int) -> int | None:
        """The step once the trainer started in allocation `restart` has trained `steps` more steps."""
        begun = [e for e in events(self.run_dir, "started") if e.get("restart") == restart]
        if not begun:
            return None
        trains = [e for e in events(self.run_dir, "train_start") if e["time"] >= begun[-1]["time"]]
        if not trains or slurm_state(self.job_id) != "RUNNING":
            return None
        target = trains[-1]["step"] + steps
        return target if last_step(self.run_dir) >= target else None

    def signal_and_time_save(self, restart: int) -> None:
        """scancel --signal=USR2 after 3 steps of allocation `restart`; notes the time to the committed checkpoint."""
        wait_until(f"{self.name}: 3 steps in allocation {restart}", lambda: self.trained_since_start(3, restart), 600)
        sent = time.time()
        slurm.run(["scancel", "--signal=USR2", self.job_id])
        stop = wait_until(
            f"{self.name}: stop after USR2",
            lambda: [e for e in events(self.run_dir, "stopped") if e["time"] >= sent],
            120,
        )[0]
        saved = [e for e in events(self.run_dir, "checkpoint") if e["step"] == stop["step"]]
        self.notes.setdefault("signal_to_checkpoint_s", []).append(round(saved[-1]["time"] - sent, 2))


def run_case(case: Case, runs_root: Path) -> None:
    started = time.monotonic()
    try:
        done = hpcds(runs_root, "submit", QUICKSTART, *case.args, "--name", case.name, "--json", env=case.env)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        case.run_dir, case.job_id = Path(result["run_dir"]), result["job_id"]
        if case.drive:
            case.drive(case)
        case.ended = wait_until(
            f"{case.name}: job {case.job_id} to end", lambda: job_ended(case.run_dir, case.job_id), CASE_TIMEOUT_S, 1
        )
        case.leftovers = no_leftovers(case.job_id, case.run_dir)
    except BaseException as exc:  # reported by the test that owns the case
        case.error = exc
    finally:
        case.wall_s = time.monotonic() - started


def two_warnings(case: Case) -> None:
    case.signal_and_time_save(restart=0)
    # As if torch had been upgraded between submit and resume: the next start must warn.
    meta = runs.read_meta(case.run_dir)
    runs.write_json_atomic(case.run_dir / facts.META_FILE, {**meta, "versions": {**meta["versions"], "torch": "0.0"}})
    case.signal_and_time_save(restart=1)


def requeue_by_scontrol(case: Case) -> None:
    """scontrol requeue after 5 steps: TERM to every process of the job; notes the step and the time to the commit."""
    wait_until(f"{case.name}: 5 steps", lambda: case.trained_since_start(5, 0), 600)
    case.notes["requeued_at_step"] = last_step(case.run_dir)
    sent = time.time()
    slurm.run(["scontrol", "requeue", case.job_id])
    stop = wait_until(f"{case.name}: stop after TERM", lambda: events(case.run_dir, "stopped"), 120)[0]
    saved = [e for e in events(case.run_dir, "checkpoint") if e["step"] == stop["step"] and e["time"] >= sent]
    case.notes["signal_to_checkpoint_s"] = round(saved[-1]["time"] - sent, 2) if saved else None


def preempt_on_n1(case: Case) -> None:
    wait_until("preempt case: 3 steps", lambda: case.trained_since_start(3, 0), 600)
    urgent = ["sbatch", "--parsable", "-p", "urgent", "-w", "n1", "--exclusive", "-J", "hpcds-test-urgent"]
    urgent += ["-o", "/dev/null", "--wrap=sleep 5"]
    case.notes["preemptor"] = slurm.parse_sbatch_parsable(slurm.run(urgent))
    case.notes["preempted_at"] = time.time()


# A floor under the step time (rank 0 sleeps at each step boundary): on an idle machine a step takes 0.2 s and the
# run would end before the driver's signal lands; on a busy one it takes seconds anyway.
PACE = {"HPCDS_TEST_FAULT": "step_sleep:0.3"}
# The save a TERM asks for takes 35 s longer, as a big checkpoint's would: within the cluster's KillWait (60 s), beyond
# the 30 s DeepSpeed's per-node launcher gives its ranks after a TERM before it SIGKILLs them.
SLOW_SAVE_S = 35
SLOW_SAVE = {"HPCDS_TEST_FAULT": f"step_sleep:0.3,stop_save_sleep:{SLOW_SAVE_S}"}
SLOW_PACE = {"HPCDS_TEST_FAULT": "step_sleep:1"}  # preemption takes a scheduler cycle or two
# The watchdog's clock starts with the batch script, so the limit must hold the start-up before the first heartbeat
# too: 17 s for this case beside the rest of group 2 on a busy 2-core machine, 24 s at most for any case (4 at once in
# group 1). 60 s keeps 2.5 times that; the hung case is group 2's last to end, so every second cut here is one less.
HANG_LIMIT_S = 60
TIMELIMIT_SPEC = [*SMALL, "--set", "training.max_steps=80", "--set", "checkpoint.every_steps=10", "--time", "00:03:00"]
TIMELIMIT_SPEC += ["--set", "slurm.signal_lead_s=90", "--set", 'slurm.extra_sbatch=["--nodelist=n2"]']
CASES = {
    "reference": Case("reference", SPEC),
    "warnings": Case("warnings", SPEC, two_warnings, env=PACE),
    "scontrol": Case("scontrol", SPEC, requeue_by_scontrol, env=SLOW_SAVE),
    # Raises after 3 steps of every start, with a checkpoint every 2 steps: progress each time, so it is requeued up
    # to the failure cap and then ends FAILED.
    # The failure cap alone: without exclusion, which would leave the 2-node partition short after two failures
    # (tests/test_bad_nodes.py covers that).
    "failing": Case(
        "failing",
        [
            *SMALL,
            "--set",
            "training.max_steps=100",
            "--set",
            "checkpoint.every_steps=2",
            "--set",
            "slurm.exclude_bad_nodes=false",
        ],
        env={"HPCDS_TEST_FAULT": "raise_after:3"},
    ),
    # Rank 0 stops dead after 3 steps of the first allocation; the batch script's watchdog sees no heartbeat for
    # HANG_LIMIT_S, kills the step and requeues the job.
    "hung": Case(
        "hung",
        [*SPEC, "--set", f"slurm.hang_limit_s={HANG_LIMIT_S}", "--set", 'slurm.extra_sbatch=["--nodelist=n2"]'],
        env={"HPCDS_TEST_FAULT": "hang_after:3,step_sleep:0.3"},
    ),
    "preempted": Case(
        "preempted", [*SPEC, "--set", 'slurm.extra_sbatch=["--nodelist=n1"]'], preempt_on_n1, env=SLOW_PACE
    ),
    # 3-minute allocations warned 90 s before their end: the trainer saves and requeues when Slurm says so. At 1.5 s a
    # step in the first allocation only, the 80 steps outlast its warning (75-105 s after its start) whatever the
    # start-up, and the second allocation finishes them at full speed.
    "timelimit": Case("timelimit", TIMELIMIT_SPEC, env={"HPCDS_TEST_FAULT": "step_sleep:1.5:1"}),
}
# Across nodes: one warning to a 2-node run (world size 4); it must resume on both nodes and match a 2-node reference.
# The interrupted runs go through a real container (bubblewrap: own mount, PID and IPC namespaces, own /dev/shm), so
# the warning and the TERM must reach the ranks through the wrapper, and training must match the plain reference.
BWRAP = ROOT / "tests" / "fixtures" / "bwrap-container"
CONTAINED = ["--set", f"slurm.container={{kind: wrapper, wrapper: [{BWRAP}]}}"]
TWO_NODES = [*SPEC, "--nodes", "2"]
CASES["reference2"] = Case("reference2", TWO_NODES)
CASES["warning2"] = Case("warning2", [*TWO_NODES, *CONTAINED], lambda case: case.signal_and_time_save(0), env=PACE)
CASES["scontrol2"] = Case("scontrol2", [*TWO_NODES, *CONTAINED], requeue_by_scontrol, env=SLOW_SAVE)
GROUPS = [
    ["reference", "warnings", "scontrol", "failing"],
    ["preempted", "timelimit", "hung"],
    ["reference2", "warning2", "scontrol2"],
]


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("preempt-runs")


@pytest.fixture(scope="module")
def cases(slurm_cluster, runs_root):
    """Starts a group's drivers when one of its cases is first asked for (after any other group has ended); cancels
    every job at the end. Run alone (`-k`), a test starts only the groups it needs."""
    started: set[int] = set()

    def get(name: str) -> Case:
        group = next(i for i, names in enumerate(GROUPS) if name in names)
        if group not in started:  # groups never overlap: wait for whatever ran before, then start this one
            for other in CASES.values():
                if other.thread is not None:
                    other.thread.join()
            for member in GROUPS[group]:
                case = CASES[member]
                case.thread = threading.Thread(target=run_case, args=(case, runs_root), daemon=True)
                case.thread.start()
            started.add(group)
        case = CASES[name]
        case.thread.join()
        if case.error is not None:
            log = case.run_dir and next(case.run_dir.glob("slurm-*.out"), None)
            tail = log.read_text()[-3000:] if log else ""
            raise AssertionError(f"case {name} (job {case.job_id}): {case.error}\n{tail}") from case.error
        return case

    yield get
    for case in CASES.values():
        if case.job_id:
            subprocess.run(["scancel", case.job_id], capture_output=True, check=False)
        if "preemptor" in case.notes:
            subprocess.run(["scancel", case.notes["preemptor"]], capture_output=True, check=False)


def status_row(runs_root: Path, case: Case) -> dict:
    return StatusSource().rows([case.run_dir])[0].to_dict()


@pytest.mark.slurm
def test_reference_run_finishes_in_one_allocation(cases):
    ref = cases("reference")
    assert ref.ended["rc"] == 0 and ref.ended["class"] == "finished"
    assert [e["step"] for e in events(ref.run_dir, "train_start")] == [0]
    assert not ref.leftovers, ref.leftovers
    assert_wandb_one_run_no_repeats(ref.run_dir)


@pytest.mark.slurm
def test_two_warning_signals_requeue_twice_and_match_the_uninterrupted_run(cases, runs_root):
    case, ref = cases("warnings"), cases("reference")
    assert case.ended["rc"] == 0 and case.ended["class"] == "finished"
    stops = events(case.run_dir, "stopped")
    assert [e["signal"] for e in stops] == ["SIGUSR2", "SIGUSR2"]
    # Each stop saved at the step it stopped at, and the next allocation resumed exactly there: no step lost.
    assert [e["step"] for e in events(case.run_dir, "train_start")] == [0, stops[0]["step"], stops[1]["step"]]
    assert [e["class"] for e in events(case.run_dir, "exited")] == ["requeued", "requeued", "finished"]
    assert [e["restart"] for e in events(case.run_dir, "requeue")] == [0, 1]
    assert all(seconds < 30 for seconds in case.notes["signal_to_checkpoint_s"]), case.notes
    changed = events(case.run_dir, "versions_changed")
    assert len(changed) == 2 and changed[0]["changed"]["torch"][0] == "0.0"  # both resumes after the edit warned
    row = status_row(runs_root, case)
    assert (row["restarts"], row["step"], row["last_checkpoint_step"]) == (2, MAX_STEPS, MAX_STEPS)
    assert not case.leftovers, case.leftovers
    assert_same_training(ref.run_dir, case.run_dir)
    assert_wandb_one_run_no_repeats(case.run_dir)
    assert_report_matches_the_logs(runs_root, case.run_dir)
    print(f"warnings: signal to committed checkpoint {case.notes['signal_to_checkpoint_s']} s, {case.wall_s:.0f} s")


def assert_report_matches_the_logs(runs_root: Path, run_dir: Path) -> None:
    """`hpcds report --json` of a live run preempted twice: interruptions, recomputed steps and downtime as the event
    log and losses.jsonl give them, worked out here; the PNG drawn and not empty."""
    png = run_dir / "report-test.png"
    done = hpcds(runs_root, "report", run_dir.name, "--runs-dir", str(runs_root), "--json", "--png", str(png))
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    starts, exits = events(run_dir, "started"), events(run_dir, "exited")
    records = [json.loads(line) for line in (run_dir / facts.LOSSES_FILE).read_text().splitlines() if line.strip()]
    assert [i["ending"] for i in found["interruptions"]] == [e["class"] for e in exits[:-1]] == ["requeued"] * 2
    assert found["steps_recomputed"] == len(records) - len({r["step"] for r in records}) == 0  # saved at each signal
    downtime_s = sum(start["time"] - end["time"] for end, start in zip(exits, starts[1:], strict=False))
    assert found["downtime_s"] == pytest.approx(downtime_s) and downtime_s > 0
    assert found["png"] == str(png) and png.stat().st_size > 10_000


@pytest.mark.slurm
def test_scontrol_requeue_resumes_and_matches(cases, runs_root):
    """SIGTERM path (requeue, preemption without a warning, scancel): the ranks save at the next step boundary, with
    a save 35 s slower than it is, inside the cluster's KillWait; the job resumes at exactly that step."""
    case, ref = cases("scontrol"), cases("reference")
    assert case.ended["rc"] == 0 and case.ended["class"] == "finished"
    assert_resumed_where_term_stopped(case)
    assert status_row(runs_root, case)["restarts"] == 1
    assert not case.leftovers, case.leftovers
    assert_same_training(ref.run_dir, case.run_dir)
    assert_wandb_one_run_no_repeats(case.run_dir)
    print(
        f"scontrol: TERM at step {case.notes['requeued_at_step']}, committed {case.notes['signal_to_checkpoint_s']} s"
    )


def assert_resumed_where_term_stopped(case: Case) -> None:
    assert next(e["class"] for e in events(case.run_dir, "exited")) == "terminated"
    (stopped,) = events(case.run_dir, "stopped")
    assert stopped["signal"] == "SIGTERM" and stopped["step"] >= case.notes["requeued_at_step"], stopped
    assert [e["step"] for e in events(case.run_dir, "train_start")] == [0, stopped["step"]]
    assert case.notes["signal_to_checkpoint_s"] > SLOW_SAVE_S  # the slow save did run to its commit


@pytest.mark.slurm
def test_failing_run_is_requeued_at_most_the_cap_and_ends_failed(cases, runs_root):
    case = cases("failing")
    assert case.ended["rc"] != 0 and case.ended["class"] == "failed"
    requeues = events(case.run_dir, "failure_requeue")
    assert [e["failures"] for e in requeues] == [1, 2]  # the cap rendered into the script
    assert events(case.run_dir, "not_requeued")[-1]["reason"] == "failure_limit"
    assert len(events(case.run_dir, "started")) == 3
    injected = [e for e in events(case.run_dir, "error") if "injected failure" in e["message"]]
    assert len(injected) == 3  # once per allocation (the other rank then reports its broken connection)
    row = status_row(runs_root, case)
    assert row["state"] == "FAILED", row
    assert "injected failure" in json.dumps(row), row
    assert not case.leftovers, case.leftovers


@pytest.mark.slurm
def test_preemption_by_the_urgent_partition_resumes_and_matches(cases, runs_root):
    case, ref = cases("preempted"), cases("reference")
    assert case.ended["rc"] == 0 and case.ended["class"] == "finished"
    stops = events(case.run_dir, "stopped")
    # preempt_send_user_signal: Slurm sends the warning (USR2) at preemption, GraceTime before the TERM.
    assert stops and stops[0]["signal"] == "SIGUSR2", stops  # the warning comes GraceTime (10 s) before the TERM
    starts = events(case.run_dir, "train_start")
    assert len(starts) >= 2 and starts[1]["step"] == stops[0]["step"]
    assert status_row(runs_root, case)["restarts"] >= 1
    assert not case.leftovers, case.leftovers
    assert_same_training(ref.run_dir, case.run_dir)
    assert_wandb_one_run_no_repeats(case.run_dir)


@pytest.mark.slurm
def test_time_limit_warning_saves_requeues_and_finishes(cases, runs_root):
    case = cases("timelimit")
    assert case.ended["rc"] == 0 and case.ended["class"] == "finished"
    stops = events(case.run_dir, "stopped")
    assert stops and all(e["signal"] == "SIGUSR2" for e in stops), stops  # the test sent none: Slurm's timer did
    # The warning comes signal_lead_s before the 3-minute limit; Slurm's timers are coarse (about +-30 s).
    first_start = events(case.run_dir, "started")[0]["time"]
    warned_after_s = stops[0]["time"] - first_start
    assert 180 - 90 - 30 <= warned_after_s <= 180 - 90 + 30 + 15, warned_after_s  # + the step the stop waits for
    assert [e["step"] for e in events(case.run_dir, "train_start")][1:] == [e["step"] for e in stops]
    assert [e["class"] for e in events(case.run_dir, "exited")] == ["requeued"] * len(stops) + ["finished"]
    assert not case.leftovers, case.leftovers
    ids, steps = wandb_history(case.run_dir)
    assert ids == {runs.read_meta(case.run_dir)["wandb_id"]} and steps == sorted(set(steps))
    print(f"timelimit: warned {warned_after_s:.0f} s after start; {len(stops)} requeues, {case.wall_s:.0f} s")


@pytest.mark.slurm
def test_hung_run_is_killed_requeued_and_matches(cases, runs_root):
    case, ref = cases("hung"), cases("reference")
    assert case.ended["rc"] == 0 and case.ended["class"] == "finished"
    hung = events(case.run_dir, "hung")
    assert len(hung) == 1 and hung[0]["heartbeat_age_s"] > HANG_LIMIT_S, hung
    assert [e["class"] for e in events(case.run_dir, "exited")] == ["hung", "finished"]
    assert [e["failures"] for e in events(case.run_dir, "failure_requeue")] == [1]
    history = status_row(runs_root, case)["history"]
    assert [h["ending"] for h in history] == ["hung", "finished"] and "hung" in history[0]["error"]
    assert not case.leftovers, case.leftovers
    assert_same_training(ref.run_dir, case.run_dir)
    assert_wandb_one_run_no_repeats(case.run_dir)


@pytest.mark.slurm
def test_two_node_run_warned_once_resumes_on_both_nodes_and_matches(cases):
    case, ref = cases("warning2"), cases("reference2")
    assert ref.ended["class"] == "finished" and case.ended["class"] == "finished", (ref.ended, case.ended)
    stops = events(case.run_dir, "stopped")
    assert [e["step"] for e in events(case.run_dir, "train_start")] == [0, stops[0]["step"]]
    assert [e["world_size"] for e in events(case.run_dir, "train_start")] == [4, 4]
    assert [e["class"] for e in events(case.run_dir, "exited")] == ["requeued", "finished"]
    for restart in (0, 1):  # both allocations launched on both nodes
        hosts = {e["host"] for e in events(case.run_dir, "launch") if e["restart"] == restart}
        assert {"n1", "n2"} <= hosts, hosts
    assert_ran_in_the_container(case)
    assert not case.leftovers, case.leftovers
    assert_same_training(ref.run_dir, case.run_dir)


def assert_ran_in_the_container(case: Case) -> None:
    """Every node's launcher (and so its ranks) ran in another mount namespace than the batch script, which logged
    the job's events and requeued it from outside."""
    shell = {e["mnt_ns"] for e in events(case.run_dir, "started")}
    launched = [e["mnt_ns"] for e in events(case.run_dir, "launch")]
    assert len(shell) == 1 and None not in shell and len(launched) == 4, (shell, launched)
    assert not shell & set(launched) and None not in launched, (shell, launched)


@pytest.mark.slurm
def test_two_node_run_requeued_by_scontrol_saves_on_term_and_resumes_at_that_step(cases):
    case, ref = cases("scontrol2"), cases("reference2")
    assert case.ended["class"] == "finished", case.ended
    assert_resumed_where_term_stopped(case)
    assert [e["world_size"] for e in events(case.run_dir, "train_start")] == [4, 4]
    assert_ran_in_the_container(case)
    assert not case.leftovers, case.leftovers
    assert_same_training(ref.run_dir, case.run_dir)
    print(
        f"scontrol2: TERM at step {case.notes['requeued_at_step']}, committed {case.notes['signal_to_checkpoint_s']} s"
    )


# -- a warning while a background save is in flight ------------------------------------------------------------------
def warn_during_background_write(case: Case) -> None:
    """USR2 once 6 steps are trained: step 4's background write, held back 8 s, is still in flight."""
    wait_until(f"{case.name}: 6 steps", lambda: case.trained_since_start(6, 0), 600)
    slurm.run(["scancel", "--signal=USR2", case.job_id])


CASES["async_inflight"] = Case(
    "async_inflight",
    SPEC,
    warn_during_background_write,
    env={"HPCDS_TEST_FAULT": "step_sleep:0.3,async_write_sleep:8"},
)
GROUPS[0].append("async_inflight")


@pytest.mark.slurm
def test_a_warning_during_a_background_write_commits_it_then_saves_and_matches(cases):
    case, ref = cases("async_inflight"), cases("reference")
    assert case.ended["class"] == "finished", case.ended
    (stop,) = events(case.run_dir, "stopped")
    before = [e for e in events(case.run_dir, "checkpoint") if e["time"] <= stop["time"]]
    # Step 4's save was still being written when the warning came: the stop committed it, then saved its own step.
    assert [(e["step"], e["background"]) for e in before] == [(4, True), (stop["step"], False)], before
    assert before[0]["committed_at_step"] == stop["step"] > 4
    assert [e["step"] for e in events(case.run_dir, "train_start")] == [0, stop["step"]]
    assert not case.leftovers, case.leftovers
    assert_same_training(ref.run_dir, case.run_dir)
