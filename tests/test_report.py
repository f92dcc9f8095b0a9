"""`hpcds report`: the pure report on literal event logs (a killed allocation, a hung one, a run that never started, a
running one, CPU and GPU runs), the report of a real run captured on the test cluster (tests/fixtures/report_run,
interrupted twice) checked against numbers derived here from its files, the PNG, and the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcds.report.core import RunFacts, build_report

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "report_run"
CPU = RunFacts(nodes=1, gpus_per_node=0, precision="fp32", tokens_per_step=100, flops_per_token=1e6)


def started(time, restart, job="7"):
    return {"time": time, "event": "started", "job_id": job, "restart": restart}


def exited(time, restart, cls, rc, job="7"):
    return {"time": time, "event": "exited", "job_id": job, "restart": restart, "rc": rc, "class": cls}


def steps(first, last, at, every_s=1.0):
    """Step records `first`..`last`, the first at time `at`, then every `every_s`."""
    return [{"step": s, "loss": 1.0 / s, "time": at + (s - first) * every_s} for s in range(first, last + 1)]


# -- the pure report ---------------------------------------------------------------------------------------------------
def test_a_killed_allocation_is_an_interruption_and_its_steps_after_the_checkpoint_are_recomputed():
    events = [
        started(0, 0),
        {"time": 5, "event": "train_start", "step": 0},
        {"time": 9.5, "event": "checkpoint", "step": 4, "seconds": 0.5},
        # killed after step 6 (at 11.0): no exit logged; the next allocation resumes from step 4
        started(30, 1),
        {"time": 35, "event": "train_start", "step": 4},
        {"time": 39.5, "event": "checkpoint", "step": 8, "seconds": 0.5},
        {"time": 39.6, "event": "finished", "step": 8},
        exited(40, 1, "finished", 0),
    ]
    losses = steps(1, 4, at=6) + steps(5, 6, at=10) + steps(5, 8, at=36)
    report = build_report("r", {}, events, losses, CPU)
    first, second = report.allocations
    assert (first.ending, first.end_time, first.allocated_s) == ("killed", 11.0, 11.0)  # its last step record
    assert (second.ending, second.allocated_s) == ("finished", 10.0)
    # Kept: steps 1-4 (1 s each from the trainer's start) and 5-8 (1 s each); step 5's first try began at the commit.
    assert (first.effective_s, second.effective_s) == (4.0, 4.0)
    assert (first.steps_trained, first.steps_recomputed, second.steps_recomputed) == (6, 2, 0)
    assert report.goodput == pytest.approx(8 / 21)
    assert (report.steps_kept, report.steps_recomputed, report.downtime_s) == (8, 2, 19.0)
    (interruption,) = report.interruptions
    assert (interruption.ending, interruption.stopped_at_step, interruption.signal_to_commit_max_s) == (
        "killed",
        None,
        None,
    )
    assert (interruption.queue_wait_s, interruption.next_start_to_first_step_s) == (19.0, 6.0)
    assert (interruption.resumed_from_step, interruption.steps_recomputed) == (4, 2)
    assert (report.saves, report.save_blocking_s, report.save_background_s) == (2, 1.0, 0.0)
    assert (report.tokens, report.tokens_per_s) == (800, 100.0)


def test_a_stop_signal_saves_where_it_stopped_and_costs_the_time_from_that_step_to_the_commit():
    events = [
        started(0, 0),
        {"time": 2, "event": "train_start", "step": 0},
        {"time": 6.5, "event": "checkpoint", "step": 3, "seconds": 1.2},  # the signal came during step 3
        {"time": 6.6, "event": "stopped", "signal": "SIGUSR2", "step": 3},
        exited(7, 0, "requeued", 75),
        {"time": 7, "event": "requeue", "job_id": "7", "restart": 0},
        started(20, 1),
        {"time": 24, "event": "train_start", "step": 3},
        exited(30, 1, "finished", 0),
    ]
    losses = steps(1, 3, at=3) + steps(4, 5, at=25)
    report = build_report("r", {}, events, losses, CPU)
    (interruption,) = report.interruptions
    assert (interruption.ending, interruption.cause) == ("requeued", "SIGUSR2 at step 3")
    assert interruption.stopped_at_step == 3
    assert interruption.signal_to_commit_max_s == pytest.approx(6.5 - 4)  # from step 2's record to the commit
    assert (interruption.queue_wait_s, interruption.resumed_from_step, interruption.steps_recomputed) == (13.0, 3, 0)
    # Step 4's interval starts at the trainer's start in allocation 1; the save is not training time.
    assert report.effective_s == pytest.approx(3 * 1.0 + 1.0 + 1.0)


def test_a_stop_before_the_first_step_of_a_fresh_run_saved_nothing():
    events = [
        started(0, 0),
        {"time": 9, "event": "train_start", "step": 0},
        {"time": 9.1, "event": "stopped", "signal": "SIGTERM", "step": 0, "saved": False},
        exited(10, 0, "requeued", 75),
        started(20, 1),
        {"time": 24, "event": "train_start", "step": 0},
        exited(30, 1, "finished", 0),
    ]
    report = build_report("r", {}, events, steps(1, 5, at=25), CPU)
    (interruption,) = report.interruptions
    assert (interruption.stopped_at_step, interruption.signal_to_commit_max_s) == (None, None)


def test_a_periodic_save_between_two_steps_is_not_training_time():
    events = [
        started(0, 0),
        {"time": 1, "event": "train_start", "step": 0},
        {"time": 3.8, "event": "checkpoint", "step": 2, "seconds": 0.8},
        exited(5, 0, "finished", 0),
    ]
    losses = [*steps(1, 2, at=2), {"step": 3, "loss": 0.3, "time": 4.8}]
    report = build_report("r", {}, events, losses, CPU)
    assert report.effective_s == pytest.approx(3.0)  # 1-2, 2-3, and 3.8-4.8: not the save's 0.8 s
    assert [p.tokens_per_s for p in report.points] == pytest.approx([100.0, 100.0, 100.0])


def test_a_hung_allocation_ends_at_its_exit_and_names_the_hang():
    events = [
        started(0, 0),
        {"time": 3, "event": "train_start", "step": 0},
        {"time": 400, "event": "hung", "job_id": "7", "restart": 0, "heartbeat_age_s": 390},
        exited(401, 0, "hung", 137),
        started(410, 1),
        {"time": 412, "event": "train_start", "step": 0},
        exited(420, 1, "finished", 0),
    ]
    losses = steps(1, 2, at=4) + steps(1, 5, at=413)
    report = build_report("r", {}, events, losses, CPU)
    (interruption,) = report.interruptions
    assert (interruption.ending, interruption.cause) == ("hung", "hung: no heartbeat for 390 s")
    assert report.allocations[0].allocated_s == 401.0
    assert (interruption.steps_recomputed, interruption.queue_wait_s) == (2, 9.0)
    assert report.allocations[0].goodput == 0.0  # both of its steps were trained again


def test_a_run_that_never_started_has_no_allocation_and_says_so():
    events = [{"time": 0, "event": "created"}, {"time": 1, "event": "submitted", "job_id": "7", "job_name": "r"}]
    report = build_report("r", {"job_ids": ["7"]}, events, [], CPU)
    assert (report.allocations, report.interruptions, report.goodput, report.allocated_s) == ([], [], None, 0)
    assert "never started" in report.notes["allocations"]


def test_a_running_allocation_counts_until_its_newest_heartbeat_and_is_no_interruption():
    events = [started(0, 0), {"time": 2, "event": "train_start", "step": 0}]
    report = build_report("r", {}, events, steps(1, 3, at=3), CPU, last_seen_time=50.0)
    (allocation,) = report.allocations
    assert (allocation.ending, allocation.allocated_s, report.interruptions) == ("running", 50.0, [])


def test_a_cpu_run_has_no_gpu_hours_and_no_mfu_and_says_why():
    events = [started(0, 0), {"time": 1, "event": "train_start", "step": 0}, exited(10, 0, "finished", 0)]
    report = build_report("r", {}, events, steps(1, 4, at=2), CPU)
    assert (report.gpu_hours, report.mfu) == (None, None)
    assert report.notes["mfu"].startswith("CPU run") and report.notes["gpu_hours"].startswith("CPU run")


def test_a_gpu_run_gets_gpu_hours_and_mfu_from_the_dense_peak():
    events = [started(0, 0), {"time": 1, "event": "train_start", "step": 0}, exited(3600, 0, "finished", 0)]
    h100 = RunFacts(nodes=2, gpus_per_node=8, precision="bf16", tokens_per_step=1_000_000, flops_per_token=1e9)
    losses = steps(1, 3599, at=2)  # 1 s per step, 1M tokens per step over 16 GPUs
    report = build_report("r", {}, events, losses, RunFacts(**{**h100.__dict__, "gpu_name": "H100 SXM"}))
    assert report.gpu_hours == pytest.approx(16.0)
    assert report.peak_tflops == 989.0  # dense, not the sparse 1979
    assert report.mfu == pytest.approx(1e6 / 16 * 1e9 / 989e12)
    unnamed = build_report("r", {}, events, losses, h100)
    assert unnamed.mfu is None and "--gpu" in unnamed.notes["mfu"]


# -- a real run, interrupted twice on the test cluster ----------------------------------------------------------------
def fixture_logs() -> tuple[list[dict], list[dict]]:
    events = [json.loads(line) for line in (FIXTURE / "events.jsonl").read_text().splitlines() if line.strip()]
    losses = [json.loads(line) for line in (FIXTURE / "losses.jsonl").read_text().splitlines() if line.strip()]
    return events, losses


def test_the_captured_run_reports_what_its_logs_say():
    from hpcds.report.read import read_report

    events, losses = fixture_logs()
    starts = [e for e in events if e["event"] == "started"]
    exits = [e for e in events if e["event"] == "exited"]
    # By hand from the files: three allocations, each ending logged; the last finished, so two interruptions.
    assert len(starts) == 3 and len(exits) == 3 and exits[-1]["class"] == "finished"
    recomputed = len(losses) - len({r["step"] for r in losses})  # steps logged twice: trained again
    downtime_s = sum(s["time"] - e["time"] for e, s in zip(exits, starts[1:], strict=False))
    allocated_s = sum(e["time"] - s["time"] for s, e in zip(starts, exits, strict=True))
    saves_s = sum(e["seconds"] for e in events if e["event"] == "checkpoint")

    report = read_report(FIXTURE)
    assert len(report.interruptions) == 2
    assert [i.ending for i in report.interruptions] == [e["class"] for e in exits[:2]]
    assert recomputed > 0 and report.steps_recomputed == recomputed
    assert [i.steps_recomputed for i in report.interruptions] == [0, recomputed]  # USR2 saved; the kill lost steps
    assert report.downtime_s == pytest.approx(downtime_s)
    assert report.allocated_s == pytest.approx(allocated_s)
    assert report.save_blocking_s == pytest.approx(saves_s)
    assert report.steps_kept == max(r["step"] for r in losses)
    resumed = [e["step"] for e in events if e["event"] == "train_start"][1:]
    assert [i.resumed_from_step for i in report.interruptions] == resumed
    assert 0 < report.effective_s < report.allocated_s
    assert report.goodput == pytest.approx(report.effective_s / report.allocated_s)
    assert report.mfu is None and report.notes["mfu"].startswith("CPU run")


def test_the_png_is_drawn_and_reads_back_at_its_size(tmp_path):
    import matplotlib.image

    from hpcds.report.png import FIGURE_DPI, FIGURE_SIZE_IN, draw_report_png
    from hpcds.report.read import read_report

    path = draw_report_png(read_report(FIXTURE), tmp_path / "report.png")
    assert path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (FIGURE_SIZE_IN[1] * FIGURE_DPI, FIGURE_SIZE_IN[0] * FIGURE_DPI)
    red, blue = pixels[..., 0], pixels[..., 2]
    assert ((blue - red) > 0.3).sum() > 200  # the loss and tokens/s lines (matplotlib's blue)
    assert ((red - blue) > 0.08).sum() > 10_000  # the downtime shading and the restart lines (red)


def test_the_table_shows_error_text_as_written():
    from rich.console import Console

    from hpcds.cli.report_cmd import render_tables

    message = "RuntimeError: [/x/pair.cc:553] closed"  # rich would read the brackets as a closing tag
    events = [started(0, 0), {"time": 1, "event": "error", "message": message}, exited(2, 0, "failed", 1)]
    console = Console(record=True, width=200)
    for table in render_tables(build_report("r", {}, events, [], CPU), None):
        console.print(table)
    assert message in console.export_text()


# -- the command line --------------------------------------------------------------------------------------------------
def hpcds(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcds", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture
def runs_root(tmp_path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "runs" / "report-run")
    return tmp_path / "runs"


def test_cli_prints_the_table_and_draws_the_png_in_the_run_directory(runs_root):
    done = hpcds("report", "report-run", "--runs-dir", str(runs_root), cwd=runs_root)
    assert done.returncode == 0, done.stderr
    assert "goodput" in done.stdout and "interruptions" in done.stdout
    assert (runs_root / "report-run" / "report.png").stat().st_size > 0


def test_cli_json_has_the_numbers_and_the_plot_points(runs_root, tmp_path):
    done = hpcds(
        "report", "report-run", "--runs-dir", str(runs_root), "--json", "--png", str(tmp_path / "x.png"), cwd=runs_root
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert len(found["interruptions"]) == 2 and found["png"] == str(tmp_path / "x.png")
    assert len(found["points"]) == len(fixture_logs()[1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-run"], "no run 'no-such-run'"),
        (["report-run", "--gpu", "X9000"], "--gpu 'X9000' is not in the peak table"),
    ],
)
def test_cli_mistakes_get_a_clear_error_without_a_traceback(runs_root, args, message):
    done = hpcds("report", *args, "--runs-dir", str(runs_root), "--no-png", cwd=runs_root)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_background_save_counts_its_copy_as_blocking_and_its_writing_as_background():
    # Step 4 at 9.0; its save copies for 0.3 s (probe 0.1 + copy 0.2) and commits at 11.5, after steps 5 and 6.
    background = {"step": 4, "seconds": 2.5, "blocking_s": 0.4, "background": True}
    background["phases_s"] = {"probe": 0.1, "snapshot": 0.2, "write": 2.0, "commit": 0.1}
    events = [
        started(0, 0),
        {"time": 5, "event": "train_start", "step": 0},
        {"time": 11.5, "event": "checkpoint", **background},
        {"time": 13.0, "event": "finished", "step": 7},
        exited(13.5, 0, "finished", 0),
    ]
    later = [{"step": 5, "loss": 0.2, "time": 10.3}, {"step": 6, "loss": 0.2, "time": 11.3}]
    losses = [*steps(1, 4, at=6), *later, {"step": 7, "loss": 0.1, "time": 12.5}]
    report = build_report("r", {}, events, losses, CPU)
    assert (report.saves, report.save_blocking_s, report.save_background_s) == (1, 0.4, pytest.approx(2.1))
    # Step 5 began when the copy was done (9.3), step 7 at the commit (11.5): the save's blocking parts are not
    # training time, its background writing is.
    (allocation,) = report.allocations
    assert allocation.effective_s == pytest.approx(4 * 1.0 + 1.0 + 1.0 + 1.0)
