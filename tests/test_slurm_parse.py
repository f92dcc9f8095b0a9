"""Parsers of Slurm's output, on text captured from the project's real test cluster (tests/captured/capture.sh)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hpcds import slurm
from hpcds.durations import parse_slurm_time_s

CAPTURED = Path(__file__).parent / "captured"


def captured(name: str) -> str:
    return (CAPTURED / name).read_text()


def test_squeue_all_states_from_real_cluster():
    jobs = slurm.parse_squeue(captured("squeue_all.txt"))
    by_state = {}
    for job in jobs:
        by_state.setdefault(job.state, []).append(job)
    assert {"RUNNING", "PENDING", "COMPLETED", "FAILED", "CANCELLED"} <= set(by_state)
    running = by_state["RUNNING"][0]
    assert running.name == "quickstart-20261123-113512-a name with spaces"  # long names with spaces come back whole
    assert running.time_limit_s == 24 * 3600
    assert running.elapsed_s is not None and running.nodelist == "n2" and running.num_nodes == 1
    assert running.reason == "" and running.restarts == 0 and running.partition == "debug"
    failed = by_state["FAILED"][0]
    assert failed.reason == "NonZeroExitCode" and failed.name == "exit-three"
    requeued = [job for job in by_state["PENDING"] if job.restarts == 1]
    assert requeued and requeued[0].reason == "BeginTime" and requeued[0].num_nodes == 2
    waiting = [job for job in by_state["PENDING"] if job.reason == "Resources"]
    assert waiting and waiting[0].nodelist == "" and waiting[0].time_limit_s == 120
    assert all(job.job_id.isdigit() for job in jobs)


def test_squeue_rejects_a_foreign_format():
    with pytest.raises(ValueError, match="unexpected squeue line"):
        slurm.parse_squeue("  JOBID PARTITION NAME\n  12 debug wrap\n")
    assert slurm.parse_squeue("") == []


def test_sbatch_parsable():
    assert slurm.parse_sbatch_parsable(captured("sbatch_parsable.txt")).isdigit()
    assert slurm.parse_sbatch_parsable("17;cluster-a\n") == "17"
    with pytest.raises(ValueError):
        slurm.parse_sbatch_parsable("sbatch: error: Batch job submission failed\n")


def test_exit_code_of_sacct_and_scontrol():
    assert slurm.parse_exit_code("3:0") == (3, 0)
    assert slurm.parse_exit_code("0:15") == (0, 15)
    assert slurm.parse_exit_code("") == (None, None)


def test_show_config_says_no_accounting():
    config = slurm.parse_scontrol_show_config(captured("scontrol_show_config.txt"))
    assert config["AccountingStorageType"] == "accounting_storage/none"
    assert config["AuthInfo"] == "cred_expire=10" and config["ClusterName"] == "hpcds-local"
    assert not slurm.accounting_enabled(config)
    assert slurm.accounting_enabled({"AccountingStorageType": "accounting_storage/slurmdbd"})


def test_hostnames_and_sacct_text():
    assert captured("scontrol_show_hostnames.txt").split() == ["n1", "n2"]
    rows = slurm.parse_sacct("13|REQUEUED|0:0|2026-11-23T07:42:58|2026-11-23T07:42:59|n1|00:00:01\n13|FAILED|3:0\n")
    assert rows[0]["State"] == "REQUEUED" and rows[1]["ExitCode"] == "3:0" and rows[1]["NodeList"] == ""
    assert "accounting storage is disabled" in captured("sacct_disabled.txt")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0:04", 4),
        ("5:00", 300),
        ("1:02:03", 3723),
        ("1-00:00:00", 86400),
        ("2-03", 2 * 86400 + 3 * 3600),
        ("30", 1800),
        ("UNLIMITED", None),
        ("N/A", None),
        ("INVALID", None),
    ],
)
def test_durations(text, seconds):
    assert parse_slurm_time_s(text) == seconds


# Status rows: squeue (captured) + the run's event log + progress, merged by the pure hpcds.slurm.status.

from hpcds.slurm.status import needs_accounting, run_status, state_from_events, table_cells  # noqa: E402

NOW = 1_795_434_000.0


def squeue_jobs() -> dict[str, slurm.JobState]:
    return {job.job_id: job for job in slurm.parse_squeue(captured("squeue_all.txt"))}


def job_with(state: str, restarts: int = 0) -> slurm.JobState:
    return next(j for j in squeue_jobs().values() if j.state == state and j.restarts == restarts)


def test_squeue_wins_while_slurm_knows_the_job():
    job = job_with("RUNNING")
    events = [{"event": "submitted", "job_id": job.job_id}, {"event": "started", "job_id": job.job_id, "restart": 0}]
    progress = {"step": 40, "max_steps": 200, "loss": 2.5, "tokens_per_s": 2800.0, "last_checkpoint_step": 25}
    progress |= {"last_checkpoint_time": NOW - 90, "world_size": 4, "wandb_id": "abc12345", "time": NOW - 5}
    row = run_status("r", {"job_ids": [job.job_id]}, events, progress, {"n2": {"time": NOW - 3, "step": 40}}, None, NOW)
    assert row.source == "events" and row.state == "RUNNING"  # Slurm unreachable: the log still knows
    row = run_status("r", {"job_ids": [job.job_id]}, events, progress, {"n2": {"time": NOW - 3}}, squeue_jobs(), NOW)
    assert (row.source, row.state, row.nodes, row.time_limit_s) == ("squeue", "RUNNING", "n2", 86400)
    assert (row.step, row.max_steps, row.last_checkpoint_step, row.last_checkpoint_age_s) == (40, 200, 25, 90)
    assert (row.world_size, row.wandb_id, row.heartbeat_age_s, row.stale_nodes) == (4, "abc12345", 3, [])
    cells = table_cells(row)
    assert (
        cells["step"] == "40/200" and cells["checkpoint"] == "25 (1:30 ago)" and cells["time"].endswith("/ 1-00:00:00")
    )


def test_requeued_job_waiting_to_restart():
    job = job_with("PENDING", restarts=1)
    row = run_status("r", {"job_ids": [job.job_id]}, [], None, {}, squeue_jobs(), NOW)
    assert (row.state, row.reason, row.restarts) == ("REQUEUED", "BeginTime", 1)


def test_failed_job_gets_its_exit_code_from_the_log():
    job = job_with("FAILED")
    events = [{"event": "started", "job_id": job.job_id}, {"event": "exited", "job_id": job.job_id, "rc": 3}]
    row = run_status("r", {"job_ids": [job.job_id]}, events, None, {}, squeue_jobs(), NOW)
    assert (row.state, row.reason, row.exit_code) == ("FAILED", "NonZeroExitCode", 3)
    assert table_cells(row)["state"] == "FAILED (3)"


@pytest.mark.parametrize(
    ("events", "state", "exit_code"),
    [
        ([{"event": "submitted"}], "UNKNOWN", None),
        ([{"event": "started", "restart": 0}], "UNKNOWN", None),
        ([{"event": "started"}, {"event": "exited", "rc": 0}], "COMPLETED", 0),
        ([{"event": "started"}, {"event": "exited", "rc": 3}], "FAILED", 3),
        ([{"event": "exited", "rc": 75}, {"event": "requeue"}], "REQUEUED", 75),
        ([{"event": "exited", "rc": 75}, {"event": "requeue_limit", "max_requeues": 2}], "FAILED", 75),
        ([{"event": "started"}, {"event": "cancelled"}, {"event": "exited", "rc": 143}], "CANCELLED", None),
    ],
)
def test_purged_jobs_from_the_event_log(events, state, exit_code):
    events = [{**e, "job_id": "41", "time": NOW - 10 + i} for i, e in enumerate(events)]
    row = run_status("r", {"job_ids": ["41"]}, events, None, {}, squeue_jobs(), NOW)
    assert (row.state, row.exit_code, row.source) == (state, exit_code, "events")
    assert needs_accounting(row) == (state == "UNKNOWN")
    if state != "UNKNOWN":
        assert state_from_events("41", events)[::2] == (state, exit_code)


def test_without_slurm_the_log_alone_decides():
    events = [{"event": "submitted", "job_id": "41"}, {"event": "started", "job_id": "41"}]
    assert run_status("r", {}, events[:1], None, {}, None, NOW).state == "PENDING"
    row = run_status("r", {}, events, None, {}, None, NOW)
    assert (row.state, row.source, needs_accounting(row)) == ("RUNNING", "events", False)


def test_events_of_an_older_job_do_not_leak_into_the_newest():
    events = [{"event": "exited", "job_id": "7", "rc": 3}, {"event": "submitted", "job_id": "9"}]
    row = run_status("r", {"job_ids": ["7", "9"]}, events, None, {}, None, NOW)
    assert (row.job_id, row.state, row.exit_code) == ("9", "PENDING", None)


def test_restarts_and_run_time_from_the_log():
    events = [
        {"event": "started", "job_id": "5", "restart": 0, "time": NOW - 100, "nodes": "n1"},
        {"event": "exited", "job_id": "5", "rc": 75, "time": NOW - 90},
        {"event": "requeue", "job_id": "5", "time": NOW - 90},
        {"event": "started", "job_id": "5", "restart": 1, "time": NOW - 60, "nodes": "n[1-2]"},
        {"event": "exited", "job_id": "5", "rc": 0, "time": NOW - 20},
    ]
    row = run_status("r", {"job_ids": ["5"]}, events, None, {}, {}, NOW)
    assert (row.state, row.restarts, row.nodes, row.elapsed_s) == ("COMPLETED", 1, "n[1-2]", 40)


def test_accounting_settles_a_job_the_log_cannot():
    events = [{"event": "started", "job_id": "8"}]
    assert needs_accounting(run_status("r", {"job_ids": ["8"]}, events, None, {}, {}, NOW))
    record = {"8": {"JobID": "8", "State": "CANCELLED by 0", "ExitCode": "0:15", "NodeList": "n1"}}
    row = run_status("r", {"job_ids": ["8"]}, events, None, {}, {}, NOW, accounting=record)
    assert (row.state, row.exit_code, row.nodes, row.source) == ("CANCELLED", 0, "n1", "sacct")


def test_local_and_unsubmitted_runs():
    row = run_status("r", {"local": True}, [{"event": "launch"}], {"time": NOW - 5, "step": 3}, {}, {}, NOW)
    assert row.state == "RUNNING" and row.job_id is None
    row = run_status("r", {"local": True}, [{"event": "launch"}], {"time": NOW - 3600}, {}, {}, NOW)
    assert row.state == "UNKNOWN"
    row = run_status("r", {"local": True}, [{"event": "launch"}, {"event": "finished", "step": 9}], None, {}, {}, NOW)
    assert row.state == "COMPLETED"
    assert run_status("r", {}, [{"event": "created"}], None, {}, {}, NOW).state == "NOT_SUBMITTED"


def test_stale_heartbeat_flags_the_node():
    job = job_with("RUNNING")
    beats = {"n1": {"time": NOW - 2}, "n2": {"time": NOW - 900}}
    row = run_status("r", {"job_ids": [job.job_id]}, [], None, beats, squeue_jobs(), NOW)
    assert row.stale_nodes == ["n2"] and row.heartbeat_age_s == 900
    assert "stale: n2" in table_cells(row)["reason"]


def test_a_reused_job_id_is_not_taken_for_the_run():
    job = job_with("RUNNING")  # named quickstart-...-a name with spaces
    events = [
        {"event": "submitted", "job_id": job.job_id, "job_name": "other-run"},
        {"event": "started", "job_id": job.job_id},
        {"event": "exited", "job_id": job.job_id, "rc": 0},
    ]
    row = run_status("r", {"job_ids": [job.job_id]}, events, None, {}, squeue_jobs(), NOW)
    assert (row.state, row.source) == ("COMPLETED", "events")
    events[0]["job_name"] = job.name
    assert run_status("r", {}, events, None, {}, squeue_jobs(), NOW).source == "squeue"


# The cluster script itself (its bring-up is exercised by every cluster test).

SCRIPTS = [Path(__file__).parents[1] / "scripts" / "local-slurm", CAPTURED / "capture.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_cluster_scripts_pass_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_local_slurm_env_and_usage(tmp_path):
    env = {**os.environ, "HPCDS_SLURM_DIR": str(tmp_path)}
    script = str(SCRIPTS[0])
    done = subprocess.run([script, "env"], capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "run scripts/local-slurm up" in done.stderr and done.stdout == ""
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "slurm.conf").write_text("ClusterName=x\n")
    done = subprocess.run([script, "env"], capture_output=True, text=True, env=env)
    assert done.stdout == f"export SLURM_CONF={tmp_path}/etc/slurm.conf\n"
    done = subprocess.run([script, "bogus"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "local-slurm up" in done.stderr


def test_heartbeats_of_an_earlier_allocation_do_not_count():
    # Requeued from n[1-2] onto n[3-4]: n1's and n2's files stay behind with restart 0 and must not show as stale.
    job = job_with("RUNNING")
    events = [{"event": "started", "job_id": job.job_id, "restart": r} for r in (0, 1)]
    beats = {
        "n1": {"time": NOW - 900, "job_id": job.job_id, "restart": 0},
        "n2": {"time": NOW - 900, "job_id": job.job_id, "restart": 0},
        "n3": {"time": NOW - 2, "job_id": job.job_id, "restart": 1},
        "n4": {"time": NOW - 4, "job_id": job.job_id, "restart": 1},
        "old": {"time": NOW - 9, "job_id": "1", "restart": 1},  # another job of the same run
    }
    row = run_status("r", {"job_ids": [job.job_id]}, events, None, beats, squeue_jobs(), NOW)
    assert (row.stale_nodes, row.heartbeat_age_s) == ([], 4)
    del beats["n4"]
    beats["n3"]["time"] = NOW - 900
    row = run_status("r", {"job_ids": [job.job_id]}, events, None, beats, squeue_jobs(), NOW)
    assert (row.stale_nodes, row.heartbeat_age_s) == (["n3"], 900)


def test_the_trainer_names_its_allocation_in_the_heartbeat(tmp_path, monkeypatch):
    from hpcds.train.progress import write_heartbeat

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    write_heartbeat(tmp_path, 5)
    (beat,) = (tmp_path / "heartbeats").iterdir()
    assert {k: v for k, v in json.loads(beat.read_text()).items() if k != "time"} == {
        "step": 5,
        "job_id": "77",
        "restart": 2,
    }
