"""The trainer's edges: `hpcds run` end to end (Ctrl-C saves, the same command resumes, the loss falls), the entry
point started without a launcher, and the pure parts (W&B mode, console line, fault specs, run reuse)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcds import facts, runs
from hpcds.durations import format_short_duration
from hpcds.errors import HpcdsError
from hpcds.train.host import allocator_left_alone
from hpcds.train.logging import NullLogger, choose_mode, redacted_config
from hpcds.train.preempt import Faults, parse_faults
from hpcds.train.progress import format_step_line, render_banner

REPO = Path(__file__).resolve().parents[1]


def test_wandb_mode_auto_follows_the_api_key():
    assert choose_mode("auto", {}) == "offline"
    assert choose_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert choose_mode("auto", {}, "machine api.wandb.ai\n  login user\n  password k") == "online"
    assert choose_mode("auto", {"WANDB_MODE": "disabled", "WANDB_API_KEY": "k"}) == "disabled"
    assert choose_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"
    assert choose_mode("disabled", {}) == "disabled"


def test_wandb_config_never_carries_a_secret_from_slurm_env():
    tree = {"name": "x", "slurm": {"env": {"WANDB_API_KEY": "s3cret", "HF_TOKEN": "t", "OMP_NUM_THREADS": "4"}}}
    config = redacted_config(tree)
    assert config["slurm"]["env"] == {"WANDB_API_KEY": "<redacted>", "HF_TOKEN": "<redacted>", "OMP_NUM_THREADS": "4"}
    assert tree["slurm"]["env"]["WANDB_API_KEY"] == "s3cret"  # the spec itself is left alone


def test_null_logger_takes_everything_and_says_disabled():
    logger = NullLogger()
    logger.log({"train/loss": 1.0}, step=3)
    logger.finish(exit_code=75)
    assert (logger.mode, logger.url, logger.dir) == ("disabled", None, None)


def test_console_line_and_banner():
    line = format_step_line(50, 200, 2.31412, 2.9e-3, 12345.0, 0.21)
    assert line == "step 50/200 | loss 2.3141 | lr 2.90e-03 | 12.3k tok/s | 0.21 s/step | ETA 31s"
    assert format_short_duration(3725) == "1h02m" and format_short_duration(95) == "1m35s"
    assert render_banner({"world size": "2", "ZeRO": "stage 2"}) == "  world size  2\n  ZeRO        stage 2"


def test_process_age_counts_from_the_process_start():
    """`startup_s` in train_start: a process that slept 0.5 s after it started is 0.5 s old, give or take its own
    start-up (with psutil's create_time, whose boot time is cut to whole seconds, it came out up to a second older)."""
    code = "import time; time.sleep(0.5); from hpcds.train.progress import process_age_s; print(process_age_s())"
    started = time.monotonic()
    age_s = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.5 <= age_s <= time.monotonic() - started + 0.02, age_s


PENDING_IN_PARENT = """
import os, signal, subprocess, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # as hpcds launch leaves DeepSpeed's launchers
os.kill(os.getpid(), signal.SIGTERM)  # arrives before the child exists: pending here
code = "from hpcds.train.preempt import StopFlag; print(StopFlag().install().signum)"
print(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip())
"""


def test_a_stop_signal_pending_in_the_launcher_reaches_a_rank_started_after_it():
    out = subprocess.run([sys.executable, "-c", PENDING_IN_PARENT], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(int(signal.SIGTERM)), out.stderr


def test_fault_specs_parse_and_typos_fail():
    assert parse_faults("") == Faults()
    faults = parse_faults("signal_at:4:USR2,kill_in_save:8")
    assert (faults.signal_at_step, faults.signal_num, faults.kill_in_save_step) == (4, signal.SIGUSR2, 8)
    faults = parse_faults("kill_in_async_write:6,async_write_sleep:1.5")
    assert (faults.kill_in_async_write_step, faults.async_write_sleep_s) == (6, 1.5)
    with pytest.raises(ValueError, match="unknown fault"):
        parse_faults("kill_at:3")


def test_trainer_started_as_plain_python_names_the_right_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    result = subprocess.run(
        [sys.executable, "-m", "hpcds.train", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "hpcds run SPEC" in result.stderr and "hpcds submit SPEC" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_reuse_picks_newest_unfinished_run_with_the_same_spec(tmp_path):
    from hpcds.cli.train_cmd import find_resumable_run, is_finished, local_spec, prepare_run
    from hpcds.spec import load_spec

    spec = local_spec(load_spec(REPO / "configs" / "quickstart.yaml"), ranks=2)
    first, reused = prepare_run(spec, tmp_path)
    assert not reused
    again, reused = prepare_run(spec, tmp_path)
    assert (again, reused) == (first, True)
    other = local_spec(load_spec(REPO / "configs" / "quickstart.yaml", ["training.lr=1e-3"]), ranks=2)
    # Another spec under the same name is never a silent new run: the error names the field, --resume and --new.
    with pytest.raises(HpcdsError, match=r"(?s)unfinished.*training.lr: 0.006 -> 0.001.*--resume.*--new"):
        prepare_run(other, tmp_path)
    assert prepare_run(other, tmp_path, new=True)[0] != first
    runs.append_event(first, "train_start", step=0)
    runs.append_event(first, "finished", step=200)
    assert is_finished(first)
    spec_text = (first / facts.SPEC_FILE).read_text()
    assert find_resumable_run(tmp_path, spec_text) is None  # finished runs are not resumed
    fresh, reused = prepare_run(spec, tmp_path, new=True)
    assert fresh != first and not reused
    assert prepare_run(spec, tmp_path, new=True)[0] not in (first, fresh)


def _cli(args: list[str], cwd: Path, env: dict[str, str], **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hpcds", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


@pytest.mark.deepspeed
def test_hpcds_run_ctrl_c_saves_and_the_same_command_resumes(tmp_path):
    """The quickstart path on a smaller budget: Ctrl-C (SIGINT to the whole process group, as a terminal sends it)
    mid-run saves and exits 75; the same command resumes the same run; the loss falls clearly over the run."""
    env = {**os.environ, "HPCDS_RUNS_DIR": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    args = [
        "run",
        str(REPO / "configs" / "quickstart.yaml"),
        "--set",
        "model.max_seq_len=64",
        "--set",
        "training.max_steps=60",
        "--set",
        "training.log_interval_steps=5",
        "--set",
        "checkpoint.every_steps=1000",
        "--set",
        "wandb.mode=disabled",
    ]
    first = _cli(args, tmp_path, env, start_new_session=True)
    run_root = tmp_path / "runs"
    deadline = time.time() + 300
    losses = None
    while time.time() < deadline and first.poll() is None:
        found = list(run_root.glob("quickstart-*/losses.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 3:
            losses = found[0]
            break
        time.sleep(0.5)
    assert losses is not None, "training never started"
    os.killpg(first.pid, signal.SIGINT)
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 75, output
    assert "run the same command to resume" in output
    run_dir = losses.parent
    stopped = [e for e in runs.read_events(run_dir) if e["event"] == "stopped"]
    assert stopped and stopped[-1]["signal"] == "SIGINT"
    stop_step = stopped[-1]["step"]
    assert 3 <= stop_step < 60

    second = _cli(args, tmp_path, env)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output
    assert f"resuming run: {run_dir}" in output and f"resuming from step_{stop_step}" in output
    assert "finished at step 60" in output
    assert "kernels" in output and "ZeRO         stage 2" in output  # the banner
    # Two ranks share this machine's cores: each gets its share of intra-op threads (unless the environment chose).
    host = [e for e in runs.read_events(run_dir) if e["event"] == "host"][-1]
    assert host["local_ranks"] == 2
    assert host["allocator_tuned"] is not allocator_left_alone(os.environ)
    if not os.environ.get("OMP_NUM_THREADS"):
        assert host["threads"] <= max(1, len(os.sched_getaffinity(0)) // 2), host
    assert f"{host['threads']} intra-op thread" in output
    records = [json.loads(line) for line in losses.read_text().splitlines()]
    first_loss = sum(r["loss"] for r in records[:3]) / 3
    last_loss = sum(r["loss"] for r in records[-3:]) / 3
    assert last_loss < 0.7 * first_loss, (first_loss, last_loss)
    progress = json.loads((run_dir / facts.PROGRESS_FILE).read_text())
    assert progress["step"] == 60 and progress["last_checkpoint_step"] == 60 and progress["world_size"] == 2
    assert list((run_dir / facts.HEARTBEAT_DIR).glob("*.json"))


def test_sync_says_when_a_run_has_no_offline_logs(tmp_path):
    from click.testing import CliRunner

    from hpcds.cli import cli

    run_dir = runs.create_run(tmp_path, "r", lambda _: {}, meta={"wandb_id": "abcd1234"})
    result = CliRunner().invoke(cli, ["sync", str(run_dir), "--runs-dir", str(tmp_path)])
    assert "no offline W&B logs" in str(result.exception)


def test_loss_is_the_mean_over_targets_and_zero_without_any():

    import torch
    import torch.nn.functional as F

    from hpcds.spec import ModelSpec
    from hpcds.train.loop import loss_of
    from hpcds.train.models import build_model

    model = build_model(ModelSpec(type="gpt2", d_model=16, n_layer=1, n_head=2, vocab_size=32, max_seq_len=8), seed=0)

    class Engine:  # what loss_of uses of a DeepSpeed engine: its device, and calling it
        device = "cpu"

        def __call__(self, **inputs):
            return model(**inputs)

    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    y = x.roll(-1, dims=1)
    y[0, :5] = -100  # an SFT row: prompt positions are not targets
    logits = model(input_ids=x).logits
    expected = F.cross_entropy(logits.reshape(-1, 32), y.reshape(-1), ignore_index=-100)
    assert torch.allclose(loss_of(Engine(), x, y), expected)
    # A micro-batch whose prompts fill the whole sequence has no target: loss 0 (no gradient), never NaN.
    nothing = loss_of(Engine(), x, torch.full_like(y, -100))
    assert nothing.item() == 0.0 and F.cross_entropy(logits.reshape(-1, 32), torch.full((16,), -100)).isnan()


def _quickstart_process(tmp_path: Path, fault: str) -> subprocess.Popen:
    """`hpcds run` of a small quickstart (200 steps) in its own session, with HPCDS_TEST_FAULT."""
    env = {**os.environ, "HPCDS_RUNS_DIR": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1", "HPCDS_TEST_FAULT": fault}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    args = ["run", str(REPO / "configs" / "quickstart.yaml"), "--set", "model.max_seq_len=64"]
    args += [
        "--set",
        "training.max_steps=200",
        "--set",
        "training.log_interval_steps=1",
        "--set",
        "wandb.mode=disabled",
    ]
    return _cli(args, tmp_path, env, start_new_session=True)


def _start_quickstart(tmp_path: Path, fault: str) -> tuple[subprocess.Popen, Path]:
    """`_quickstart_process`, once it has logged a step."""
    process = _quickstart_process(tmp_path, fault)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        found = list((tmp_path / "runs").glob("quickstart-*/losses.jsonl"))
        if found and found[0].read_text().strip():
            return process, found[0].parent
        time.sleep(0.5)
    process.kill()
    raise AssertionError("training never started: " + (process.communicate()[0] or "")[-3000:])


@pytest.mark.deepspeed
def test_sigterm_to_every_process_waits_for_a_save_slower_than_deepspeeds_30_s(tmp_path):
    """As Slurm's requeue / preemption / scancel sends it: TERM to every process at once. DeepSpeed's per-node launcher
    kills its ranks 30 s after a TERM; here the save takes 35 s more, so only a launcher chain deaf to TERM lets it
    commit. The ranks save at the step boundary and the run exits 75."""
    process, run_dir = _start_quickstart(tmp_path, "stop_save_sleep:35")
    sent = time.time()
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 75, output[-3000:]
    stopped = [e for e in runs.read_events(run_dir) if e["event"] == "stopped"]
    assert [e["signal"] for e in stopped] == ["SIGTERM"]
    saved = [e for e in runs.read_events(run_dir) if e["event"] == "checkpoint" and e["step"] == stopped[0]["step"]]
    assert saved and saved[0]["time"] - sent > 35, (saved, sent)  # committed after the slow save, not killed in it


@pytest.mark.deepspeed
@pytest.mark.parametrize("gap_s", [2, 0.05])  # 0.05: the second arrives while hpcds run still handles the first
def test_a_second_ctrl_c_stops_at_once(tmp_path, gap_s):
    process, run_dir = _start_quickstart(tmp_path, "stop_save_sleep:60")
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(gap_s)
    sent = time.time()
    os.killpg(process.pid, signal.SIGINT)
    process.communicate(timeout=60)
    assert time.time() - sent < 20 and process.returncode != 0
    assert not [e for e in runs.read_events(run_dir) if e["event"] == "stopped"]  # the slow save never finished
    time.sleep(1)
    leftovers = subprocess.run(["pgrep", "-f", f"--run-dir {run_dir}"], capture_output=True, text=True).stdout
    assert not leftovers.strip(), leftovers  # no rank left behind


@pytest.mark.deepspeed
def test_a_term_before_the_ranks_exist_stops_them_once_they_start(tmp_path):
    """TERM to every process (as Slurm's scancel / preemption / requeue) while DeepSpeed's launchers are still starting:
    they keep it pending, no rank exists to get it, and the ranks must find it there and stop at their first step
    boundary (exit 75) instead of training to the end."""
    process = _quickstart_process(tmp_path, "")
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        found = list((tmp_path / "runs").glob("quickstart-*/events.jsonl"))
        if found and '"launch"' in found[0].read_text():  # written just before DeepSpeed's launcher starts
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 75, output[-3000:]
    events = runs.read_events(found[0].parent)
    assert not [e for e in events if e["event"] == "train_start" and e["step"] > 0]
    assert [(e["signal"], e["step"], e["saved"]) for e in events if e["event"] == "stopped"] == [("SIGTERM", 0, False)]
    assert "nothing trained yet, nothing saved" in output
    assert not [e for e in events if e["event"] == "checkpoint"]  # a fresh run's step 0 is not worth a save


@pytest.mark.deepspeed
def test_a_term_to_hpcds_run_alone_reaches_the_ranks(tmp_path):
    # `kill PID` of the command only (not its process group): it passes the TERM on to the ranks, which save.
    process, run_dir = _start_quickstart(tmp_path, "")
    os.kill(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 75, output[-3000:]
    assert [e["signal"] for e in runs.read_events(run_dir) if e["event"] == "stopped"] == ["SIGTERM"]
