"""Asynchronous periodic saves with real DeepSpeed on 2 gloo ranks (the tiny Mamba of tests/test_resume.py).

One run, three starts: (1) saves every 2 steps in the background, each write held back 1 s, so that training
demonstrably goes on before the commit; rank 0 is SIGKILLed from its background writer once step_6's files are
written: step_6 must stay uncommitted and step_4 the newest verified checkpoint. (2) The restart resumes from step_4,
and a SIGTERM arrives while step_6's background write is in flight: the stop waits for it, commits it, then saves
step_7 synchronously. (3) The last start finishes; per-step losses and final weights must equal the straight run's,
bit for bit. The snapshot and the checksum-as-written file are also checked alone.
"""

from __future__ import annotations

import json
import zlib

import pytest
import test_resume
from test_resume import EXIT_REQUEUE, assert_identical, events, launch, new_run, tiny_spec

from hpcds.train import checkpoint as ck
from hpcds.train import shard_write

# test_resume's module fixtures, run once for this module: the shared data cache and the straight run of record.
shared_env, straight_run = test_resume.shared_env, test_resume.straight_run


def test_checksummed_file_matches_what_torch_save_wrote(tmp_path):
    import torch

    state = {"w": torch.arange(300_000, dtype=torch.float32), "step": 3}
    size, crc = shard_write.write_checksummed(state, tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    assert (size, crc) == (len(data), zlib.crc32(data))
    assert torch.equal(torch.load(tmp_path / "a.pt")["w"], state["w"])


def test_snapshot_is_a_copy_that_keeps_ties():
    from collections import OrderedDict

    import torch

    weight = torch.ones(4)
    state = OrderedDict(a=weight, b=weight, nested=[{"m": torch.zeros(2)}], shape=torch.Size([4]), n=1)
    copy = shard_write.snapshot_to_host(state)
    weight.add_(1)  # training goes on: the copy must not see it
    state["nested"][0]["m"].add_(5)
    assert torch.equal(copy["a"], torch.ones(4)) and copy["a"] is copy["b"]  # one tensor stays one
    assert torch.equal(copy["nested"][0]["m"], torch.zeros(2)) and isinstance(copy, OrderedDict)
    assert copy["shape"] == torch.Size([4]) and copy["n"] == 1
    # Host buffers come back for the next copy only once released (after the save is written).
    buffers = shard_write.HostBuffers()
    first = shard_write.snapshot_to_host({"w": weight}, buffers=buffers)["w"]
    second = shard_write.snapshot_to_host({"w": weight}, buffers=buffers)["w"]
    assert second is not first
    buffers.release()
    third = shard_write.snapshot_to_host({"w": weight}, buffers=buffers)["w"]
    assert third is second and torch.equal(third, weight)


AGREE = """
import os, sys
import deepspeed
from hpcds.train.async_save import agreed_by_all_ranks
deepspeed.init_distributed(dist_backend="gloo")
print(agreed_by_all_ranks(sys.argv[1] == "yes"), flush=True)
"""


@pytest.mark.deepspeed
@pytest.mark.parametrize("votes, agreed", [(("yes", "yes"), "True"), (("yes", "no"), "False"), (("no", "no"), "False")])
def test_ranks_take_one_verdict_on_background_saves(votes, agreed):
    """Each rank judges its own node's free memory; two ranks that saved differently would call different collectives
    and hang, so one no makes every rank's verdict no (real gloo ranks, DeepSpeed's comm)."""
    import os
    import subprocess
    import sys

    from hpcds.launch import free_port

    port = str(free_port())
    ranks = []
    try:
        for rank, vote in enumerate(votes):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}
            env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "DS_ACCELERATOR": "cpu"}
            argv = [sys.executable, "-c", AGREE, vote]
            ranks.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [process.communicate(timeout=120) for process in ranks]
    finally:  # a rank that died leaves the other waiting in the collective
        for process in ranks:
            process.kill()
    said = [out.split()[-1] if out.split() else None for out, _ in outputs]
    assert said == [agreed, agreed], [err[-2000:] for _, err in outputs]


@pytest.mark.deepspeed
def test_async_saves_survive_sigkill_and_a_stop_in_flight(tmp_path, shared_env, monkeypatch, straight_run):
    spec = tiny_spec(2, checkpoint={"every_steps": 2, "keep_last": 2})
    run_dir = new_run(tmp_path, spec)
    ckpt_dir = run_dir / "checkpoints"
    code = launch(run_dir, shared_env, monkeypatch, fault="async_write_sleep:1,kill_in_async_write:6")
    assert code not in (0, EXIT_REQUEUE)
    saves = events(run_dir, "checkpoint")
    assert [e["step"] for e in saves] == [2, 4] and all(e["background"] for e in saves)
    # Training went on while each write slept: the commit came at a later step boundary than the save's step.
    assert all(e["committed_at_step"] > e["step"] for e in saves), saves
    losses = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in losses) > 6  # the kill came from the writer, while training was past step 6
    assert (ckpt_dir / "step_6" / "rank_1_state.pt").is_file() and not (ckpt_dir / "step_6" / ck.COMMITTED).exists()
    assert json.loads((ckpt_dir / ck.POINTER).read_text())["step"] == 4

    # A SIGTERM after step 7 while step_6's write sleeps: the stop commits step_6 first, then saves step_7.
    assert launch(run_dir, shared_env, monkeypatch, fault="async_write_sleep:2,signal_at:7:TERM") == EXIT_REQUEUE
    assert events(run_dir, "checkpoint_skipped")[0]["tag"] == "step_6"
    assert events(run_dir, "train_start")[-1]["step"] == 4
    stop_saves = events(run_dir, "checkpoint")[2:]
    assert [(e["step"], e["background"]) for e in stop_saves] == [(6, True), (7, False)]
    assert stop_saves[0]["committed_at_step"] == 7
    assert json.loads((ckpt_dir / ck.POINTER).read_text())["step"] == 7
    assert all((ckpt_dir / tag / ck.COMMITTED).is_file() for tag in ("step_6", "step_7"))

    assert launch(run_dir, shared_env, monkeypatch) == 0
    assert events(run_dir, "train_start")[-1]["step"] == 7
    assert_identical(straight_run(2), run_dir, 2)
