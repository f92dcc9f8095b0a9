"""Universal-checkpoint conversion when a run resumes on another number of ranks: real DeepSpeed on CPU ranks.

A tiny Mamba (d_model 32, 1 layer) saves step_2 on 1 rank and resumes on 2: rank 0 converts in its child process,
slowed down by `HPCDS_TEST_FAULT=convert_sleep:S`, while the training process group's timeout is cut to seconds
(`HPCDS_TEST_PG_TIMEOUT_S`, a hook read only by the conversion phase): rank 1 must wait out the conversion in its own
group, and the node's heartbeat must keep being rewritten meanwhile. A converter SIGKILLed after its extraction must
leave slices the next try reuses (and the result must equal a fresh conversion); slices that no longer match their
marker, or that came from another checkpoint, must be converted again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hpcds import facts, runs
from hpcds.train import universal
from hpcds.train.preempt import parse_faults

EXIT_REQUEUE = 75
CONVERT_SLEEP_S = 6.0
SHORT_PG_TIMEOUT_S = 2  # the training group's timeout during the phase: far below the conversion's time


def test_worker_counts_follow_cpus_items_and_memory():
    gib = 1 << 30
    sizes = {"params": 300, "shard_bytes": 2 * gib, "param_bytes": gib // 2}
    # Plenty of memory: the CPUs, but never more extraction workers than source ranks.
    assert universal.worker_counts(cpus=16, source_ranks=8, available_bytes=512 * gib, **sizes) == (8, 16)
    assert universal.worker_counts(cpus=4, source_ranks=8, available_bytes=512 * gib, **sizes) == (4, 4)
    # 12 GiB: (0.5 + 2 x 2) GiB per extraction worker, (0.5 + 2 x 0.5) per merge worker.
    assert universal.worker_counts(cpus=16, source_ranks=8, available_bytes=12 * gib, **sizes) == (2, 8)
    # Too little memory for even one: still one (DeepSpeed runs the work in-process then).
    assert universal.worker_counts(cpus=16, source_ranks=8, available_bytes=gib, **sizes) == (1, 1)
    assert universal.worker_counts(cpus=16, source_ranks=1, available_bytes=512 * gib, **{**sizes, "params": 3}) == (
        1,
        3,
    )


def test_convert_sleep_fault_is_parsed():
    assert parse_faults("convert_sleep:2.5").convert_sleep_s == 2.5
    assert parse_faults("").convert_sleep_s == 0.0


def test_source_digest_changes_with_any_file():
    manifest = {"step": 2, "files": {"a.pt": {"size_bytes": 3, "crc32": 7}}}
    changed = {"step": 2, "files": {"a.pt": {"size_bytes": 3, "crc32": 8}}}
    assert universal.source_digest(manifest) == universal.source_digest(json.loads(json.dumps(manifest)))
    assert universal.source_digest(manifest) != universal.source_digest(changed)


# ---------------------------------------------------------------------------------------------------------------------
# Real DeepSpeed


def tiny_spec():
    from hpcds.spec import validate_spec

    return validate_spec(
        {
            "name": "tiny-universal",
            "model": {"type": "mamba", "d_model": 32, "n_layer": 1, "vocab_size": 256, "max_seq_len": 32},
            "data": {"train": "builtin:stdlib-docs", "tokenizer": "bytes"},
            "training": {
                "precision": "fp32",
                "micro_batch_size": 2,
                "grad_accum_steps": 1,
                "lr": 3e-3,
                "warmup_steps": 1,
                "max_steps": 3,
                "log_interval_steps": 1,
                "eval_interval_steps": 0,
            },
            "deepspeed": {"zero_stage": 2},
            "checkpoint": {"every_steps": 2, "keep_last": 2},
            "slurm": {"gpus_per_node": 0, "ranks_per_node": 2},
            "wandb": {"mode": "disabled"},
        }
    )


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory):
    """A run that saved step_2 on 1 rank (stopped there by a SIGTERM: exit 75), and a copy of that checkpoint."""
    from hpcds.cli.train_cmd import prepare_run
    from hpcds.launch import launch_local

    root = tmp_path_factory.mktemp("runs")
    env = {"HPCDS_DATA_CACHE": str(root / "data-cache"), "HPCDS_TEST_FAULT": "signal_at:2:TERM"}
    env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache/torch_extensions")
    run_dir, _ = prepare_run(tiny_spec(), root, new=True)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        assert launch_local(run_dir, 1) == EXIT_REQUEUE
    source = run_dir / facts.CHECKPOINT_DIR / "step_2"
    assert json.loads((source / "manifest.json").read_text())["data_parallel_size"] == 1
    copy = root / "source" / "step_2"
    shutil.copytree(source, copy)
    return run_dir, env, copy


def _heartbeat_times(run_dir: Path, stop: threading.Event, seen: set[float]) -> None:
    folder = run_dir / facts.HEARTBEAT_DIR
    while not stop.wait(0.2):
        for beat in folder.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):  # replaced while read: the next look gets it
                seen.add(json.loads(beat.read_text())["time"])


@pytest.mark.deepspeed
def test_other_ranks_wait_out_a_slow_conversion_with_heartbeats(one_rank_run, monkeypatch):
    from hpcds.launch import launch_local

    run_dir, env, _ = one_rank_run
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HPCDS_TEST_FAULT", f"convert_sleep:{CONVERT_SLEEP_S}")
    monkeypatch.setenv(universal.TEST_PG_TIMEOUT_ENV, str(SHORT_PG_TIMEOUT_S))
    beats: set[float] = set()
    stop = threading.Event()
    watcher = threading.Thread(target=_heartbeat_times, args=(run_dir, stop, beats))
    watcher.start()
    try:
        rc = launch_local(run_dir, 2)
    finally:
        stop.set()
        watcher.join()
    errors = [e for e in runs.read_events(run_dir) if e["event"] == "error"]
    assert rc == 0, errors
    (converted,) = [e for e in runs.read_events(run_dir) if e["event"] == "checkpoint_converted"]
    assert converted["from_world_size"] == 1 and converted["to_world_size"] == 2
    assert converted["convert_s"] >= CONVERT_SLEEP_S and not converted["reused_slices"]
    assert converted["extract_workers"] == 1  # one source rank
    assert 1 <= converted["merge_workers"] <= len(os.sched_getaffinity(0))
    finished = [e for e in runs.read_events(run_dir) if e["event"] == "finished"]
    assert finished and finished[-1]["step"] == 3
    # The phase ends when the event is written; it began load_s before. Beats every HEARTBEAT_INTERVAL_S inside it.
    end = converted["time"]
    during = sorted(t for t in beats if end - converted["load_s"] <= t <= end)
    assert len(during) >= 2, (sorted(beats), end - converted["load_s"], end)
    assert during[-1] - during[0] >= universal.HEARTBEAT_INTERVAL_S * 0.8


def _one_cpu() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def _convert(src: Path, dest: Path, fault: str = "") -> subprocess.Popen:
    """The converter rank 0 starts, on one CPU: one worker of each kind, DeepSpeed's in-process path (the pools'
    start-up would double these tests' time; the other test runs them)."""
    env = {**os.environ, "HPCDS_TEST_FAULT": fault}
    argv = [sys.executable, "-m", "hpcds.train.universal_convert", str(src), str(dest)]
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_one_cpu
    )


def _result(child: subprocess.Popen) -> dict:
    output, _ = child.communicate(timeout=120)
    assert child.returncode == 0, output[-3000:]
    return json.loads(output.splitlines()[-1].removeprefix("RESULT "))


def _killed_after_extraction(src: Path, dest: Path) -> None:
    child = _convert(src, dest, fault="convert_sleep:60")
    deadline = time.monotonic() + 90
    while not (dest / universal.EXTRACTED).is_file():
        assert child.poll() is None and time.monotonic() < deadline, "the extraction never finished"
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert (dest / universal.SLICES).is_dir() and not (dest / universal.MARKER).exists()


def _tensors(folder: Path) -> dict:
    import torch

    return {str(p.relative_to(folder)): torch.load(p, weights_only=False) for p in sorted(folder.rglob("*.pt"))}


def _same(a, b) -> bool:
    import torch

    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "__dict__") and not isinstance(a, type):  # e.g. DeepSpeed's LossScaler: no __eq__ of its own
        return type(a) is type(b) and _same(vars(a), vars(b))
    return a == b


@pytest.mark.deepspeed
def test_a_conversion_killed_after_extraction_reuses_its_slices(one_rank_run, tmp_path):
    _, _, source = one_rank_run
    fresh = tmp_path / "fresh" / "step_2.universal"
    assert not _result(_convert(source, fresh))["reused_slices"]

    retried = tmp_path / "retried" / "step_2.universal"
    _killed_after_extraction(source, retried)
    (retried / "zero").mkdir(exist_ok=True)
    (retried / "zero" / "half-written.pt").write_bytes(b"PK")  # what a merge cut short can leave
    reused = _result(_convert(source, retried, fault="convert_sleep:0.5"))
    assert reused["reused_slices"]
    assert (retried / universal.MARKER).read_text().strip() == universal.source_digest(
        json.loads((source / "manifest.json").read_text())
    )
    assert not (retried / universal.SLICES).exists() and not (retried / universal.EXTRACTED).exists()
    want, got = _tensors(fresh), _tensors(retried)
    assert want.keys() == got.keys()
    for name, value in want.items():
        assert _same(value, got[name]), f"{name} differs from a fresh conversion"

    # Slices whose files no longer add up to their marker, or that another checkpoint left: converted from scratch.
    truncated = tmp_path / "truncated" / "step_2.universal"
    _killed_after_extraction(source, truncated)
    stale = tmp_path / "stale" / "step_2.universal"
    shutil.copytree(truncated, stale)
    victim = next(p for p in sorted((truncated / universal.SLICES).rglob("*")) if p.is_file())
    victim.write_bytes(victim.read_bytes()[:-1])
    assert not _result(_convert(source, truncated))["reused_slices"]

    other_source = tmp_path / "other" / "step_2"
    shutil.copytree(source, other_source)
    manifest = json.loads((other_source / "manifest.json").read_text())
    (other_source / "manifest.json").write_text(json.dumps({**manifest, "saved_by": "another run"}))
    assert not _result(_convert(other_source, stale))["reused_slices"]
