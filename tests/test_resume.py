"""Exact resume with real DeepSpeed on 2 gloo ranks: the resume test of record, plus the ways a checkpoint goes bad.

For ZeRO 0, 1, 2 and 3: N steps straight vs. stopped by a real SIGTERM mid-run (save at the step boundary, exit 75)
and resumed to N; the per-step losses and the final fp32 weights must be bit-identical. A SIGKILL in the middle of a
save must leave the previous checkpoint in charge, a truncated shard must be detected and skipped with a message, a
rejected newer checkpoint must not make retention delete the good one just saved, and W&B's offline folders must
carry one run id across restarts. Each launch is a tiny Mamba (d_model 32, 1 layer, sequence 32) for 8 steps:
seconds, most of it start-up.

`checkpoint.save` itself runs on 2 bare ranks (this file run as a script, a Linear model in a DeepSpeed engine) for
ZeRO 0-3 in fp32 and bf16, and with a listing that lacks a file or holds a stray one, as a shared file system can give
rank 0; those ranks run on one machine's local file system, which never does it by itself, so they make it happen.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hpcds import facts, runs
from hpcds.train import checkpoint as ck

# The comparison the GPU check's resume part makes too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu_parts.resume_compare import resume_differences

pytestmark = pytest.mark.deepspeed

MAX_STEPS = 8
EXIT_REQUEUE = 75


def tiny_spec(stage: int, wandb_mode: str = "disabled", checkpoint: dict | None = None, **training):
    from hpcds.spec import validate_spec

    return validate_spec(
        {
            "name": f"tiny-z{stage}",
            "model": {"type": "mamba", "d_model": 32, "n_layer": 1, "vocab_size": 256, "max_seq_len": 32},
            "data": {"train": "builtin:stdlib-docs", "tokenizer": "bytes"},
            "training": {
                "precision": "fp32",
                "micro_batch_size": 2,
                "grad_accum_steps": 2,
                "lr": 3e-3,
                "warmup_steps": 2,
                "max_steps": MAX_STEPS,
                "log_interval_steps": 2,
                "eval_interval_steps": 4,
                "eval_iters": 2,
                **training,
            },
            "deepspeed": {"zero_stage": stage},
            "checkpoint": {"every_steps": 4, "keep_last": 2, **(checkpoint or {})},
            "slurm": {"gpus_per_node": 0, "ranks_per_node": 2},
            "wandb": {"mode": wandb_mode},
        }
    )


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory):
    """One prepared corpus for every launch; a kept TORCH_EXTENSIONS_DIR so DeepSpeed's comm op compiles once."""
    cache = tmp_path_factory.mktemp("data-cache")
    env = {"HPCDS_DATA_CACHE": str(cache)}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", ""))
    if not env["TORCH_EXTENSIONS_DIR"]:
        env["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "torch_extensions")
    return env


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, shared_env):
    """`straight_run(stage)`: the uninterrupted run of `tiny_spec(stage)`, trained once per module and read by every
    test that compares a resumed run with it (W&B off: it logs nothing the comparison reads)."""
    done: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in done:
            run_dir = new_run(tmp_path_factory.mktemp(f"straight-z{stage}"), tiny_spec(stage))
            with pytest.MonkeyPatch.context() as patch:
                assert launch(run_dir, shared_env, patch) == 0
            done[stage] = run_dir
        return done[stage]

    return get


def new_run(root: Path, spec) -> Path:
    from hpcds.cli.train_cmd import prepare_run

    run_dir, reused = prepare_run(spec, root, new=True)
    assert not reused
    return run_dir


def launch(run_dir: Path, env: dict[str, str], monkeypatch, fault: str = "") -> int:
    from hpcds.launch import launch_local

    for key, value in {**env, "HPCDS_TEST_FAULT": fault}.items():
        monkeypatch.setenv(key, value)
    return launch_local(run_dir, 2)


def assert_identical(reference: Path, resumed: Path, stage: int) -> None:
    differences = resume_differences(reference, resumed, MAX_STEPS, stage)
    assert not differences, "\n".join(differences)


def events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in runs.read_events(run_dir) if e["event"] == kind]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sigterm_save_and_resume_is_bit_identical(stage, tmp_path, shared_env, monkeypatch, straight_run):
    wandb_mode = "offline" if stage == 2 else "disabled"
    straight = straight_run(stage)

    # A real SIGTERM to rank 0 only after step 5 (not a checkpoint step): every rank must still agree to stop,
    # save step_5 and exit 75; the restart trains steps 6-8.
    interrupted = new_run(tmp_path, tiny_spec(stage, wandb_mode))
    assert launch(interrupted, shared_env, monkeypatch, fault="signal_at:5:TERM") == EXIT_REQUEUE
    stopped = events(interrupted, "stopped")
    assert stopped and stopped[-1]["step"] == 5 and stopped[-1]["signal"] == "SIGTERM"
    assert json.loads((interrupted / "checkpoints" / ck.POINTER).read_text())["step"] == 5
    assert launch(interrupted, shared_env, monkeypatch) == 0
    assert [e["step"] for e in events(interrupted, "train_start")] == [0, 5]
    assert events(interrupted, "finished")[-1]["step"] == MAX_STEPS

    assert_identical(straight, interrupted, stage)
    # ZeRO-3 builds the model inside zero.Init: rank 0 never held a whole parameter; other stages build it whole.
    built = events(straight, "model")[0]
    assert built["params"] == built["trainable"] > 0
    assert built["materialized"] == (0 if stage == 3 else built["params"])

    if wandb_mode == "offline":
        wandb_id = runs.read_meta(interrupted)["wandb_id"]
        folders = sorted((interrupted / "wandb").glob("offline-run-*"))
        assert len(folders) == 2, folders  # one per trainer start...
        assert all(f.name.endswith(f"-{wandb_id}") for f in folders)  # ...all in the run directory's W&B run
        assert json.loads((interrupted / facts.PROGRESS_FILE).read_text())["wandb_id"] == wandb_id
        # `hpcds sync` finds them, and without a W&B key says what to do instead of failing inside wandb.
        from click.testing import CliRunner

        from hpcds.cli import cli

        for name in ("WANDB_API_KEY", "WANDB_MODE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
        result = CliRunner().invoke(cli, ["sync", str(interrupted)])
        assert "wandb login" in str(result.exception)


def test_sigkill_during_save_resumes_from_previous_checkpoint(tmp_path, shared_env, monkeypatch, straight_run):
    run_dir = new_run(tmp_path, tiny_spec(2))
    # Rank 0 dies after step_8's shards are on disk but before the commit; the launcher then ends rank 1.
    assert launch(run_dir, shared_env, monkeypatch, fault=f"kill_in_save:{MAX_STEPS}") not in (0, EXIT_REQUEUE)
    ckpt_dir = run_dir / "checkpoints"
    assert (ckpt_dir / "step_8").is_dir() and not (ckpt_dir / "step_8" / ck.COMMITTED).exists()
    assert json.loads((ckpt_dir / ck.POINTER).read_text())["step"] == 4

    assert launch(run_dir, shared_env, monkeypatch) == 0
    skipped = events(run_dir, "checkpoint_skipped")
    assert skipped and skipped[0]["tag"] == "step_8" and "COMMITTED" in skipped[0]["problems"][0]
    assert events(run_dir, "train_start")[-1]["step"] == 4
    assert (ckpt_dir / "step_8" / ck.COMMITTED).is_file()

    # The same steps after the crash as without one: compare with a straight run of the same spec.
    straight = straight_run(2)
    assert_identical(straight, run_dir, 2)

    # A truncated shard in the newest checkpoint: detected by size, skipped with a message, previous one used.
    shard = ckpt_dir / "step_8" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size // 2)
    # Also a flipped byte (same size) in the one before: only the checksum can see it.
    victim = ckpt_dir / "step_4" / "mp_rank_00_model_states.pt"
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    found_before = ck.list_tags(ckpt_dir)
    assert found_before[:2] == ["step_8", "step_4"]
    assert launch(run_dir, shared_env, monkeypatch) == 0
    skipped = events(run_dir, "checkpoint_skipped")[-2:]
    assert (
        skipped[0]["tag"] == "step_8"
        and f"has {size // 2} bytes, the manifest says {size}" in skipped[0]["problems"][0]
    )
    assert skipped[1]["tag"] == "step_4" and "fails its checksum" in skipped[1]["problems"][0]
    assert events(run_dir, "train_start")[-1]["step"] == 0  # no good checkpoint left: from scratch, and said so
    assert_identical(straight, run_dir, 2)


def test_rejected_newer_checkpoint_never_counts_for_retention(tmp_path, shared_env, monkeypatch):
    # keep_last 1, a save every 2 steps, no eval (a best checkpoint would be kept whatever the newest is).
    spec = tiny_spec(0, checkpoint={"every_steps": 2, "keep_last": 1}, eval_interval_steps=0)
    run_dir = new_run(tmp_path, spec)
    ckpt_dir = run_dir / "checkpoints"
    assert launch(run_dir, shared_env, monkeypatch, fault="signal_at:2:TERM") == EXIT_REQUEUE
    assert ck.list_tags(ckpt_dir) == ["step_2"]
    # A committed step_6 that fails its checksum (the copy of step_2 with a flipped byte): newer than anything the
    # restart will save before it stops at step 4.
    shutil.copytree(ckpt_dir / "step_2", ckpt_dir / "step_6")
    victim = ckpt_dir / "step_6" / "mp_rank_00_model_states.pt"
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))

    assert launch(run_dir, shared_env, monkeypatch, fault="signal_at:4:TERM") == EXIT_REQUEUE
    assert events(run_dir, "train_start")[-1]["step"] == 2
    # step_4 is the newest commit: keep_last 1 keeps it and removes step_2; the rejected folder is kept, renamed.
    assert sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) == ["step_4", "step_6.bad"]
    assert (ckpt_dir / "step_4" / ck.COMMITTED).is_file()
    assert json.loads((ckpt_dir / ck.POINTER).read_text())["step"] == 4
    skipped = events(run_dir, "checkpoint_skipped")
    assert [(e["tag"], e["renamed_to"]) for e in skipped] == [("step_6", "step_6.bad")]
    assert "fails its checksum" in skipped[0]["problems"][0]


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint.save on 2 bare DeepSpeed ranks

SAVE_CONFIGS = [(stage, precision) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]


@pytest.fixture(scope="module")
def bare_saves(tmp_path_factory, shared_env):
    """Run this file as a script on 2 ranks (see `save_on_ranks`); returns {(rank, case): what that rank saw}."""
    out = tmp_path_factory.mktemp("bare-saves")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, **shared_env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2")
        log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below, after the process ends)
        procs.append((subprocess.Popen([sys.executable, __file__, str(out)], env=env, stdout=log, stderr=log), log))
    for proc, log in procs:
        try:
            proc.wait(timeout=240)
        finally:
            proc.kill()
            log.close()
    logs = "\n".join((out / f"rank{r}.log").read_text()[-3000:] for r in range(2))
    assert [proc.returncode for proc, _ in procs] == [0, 0], logs
    return {tuple(json.loads(key)): value for key, value in json.loads((out / "results.json").read_text()).items()}


@pytest.mark.parametrize(("stage", "precision"), SAVE_CONFIGS)
def test_real_save_writes_exactly_the_expected_files(bare_saves, stage, precision):
    # The save commits only when rank 0's listing is exactly `expected_files`: its success is the check of the names
    # against DeepSpeed's; the literal names below pin them.
    saved = bare_saves[(0, f"z{stage}-{precision}")]
    assert saved["error"] is None
    model = (
        [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]
        if stage == 3
        else ["mp_rank_00_model_states.pt"]
    )
    prefix = "bf16_" if precision == "bf16" else ""
    optim = [f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)] if stage else []
    assert sorted(saved["files"]) == sorted([*model, *optim, "rank_0_state.pt", "rank_1_state.pt"])
    assert saved["committed"] and saved["pointer_step"] == 1


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("unseen", "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
        ("stray", "zero_pp_rank_2_mp_rank_00_optim_states.pt was not written by this save"),
    ],
)
def test_save_with_a_wrong_listing_fails_on_every_rank_and_commits_nothing(bare_saves, case, problem):
    for rank in (0, 1):
        seen = bare_saves[(rank, case)]
        assert seen["error"] and problem in seen["error"] and "is not committed" in seen["error"], seen
    seen = bare_saves[(0, case)]
    assert not seen["committed"] and not seen["manifest"]
    assert seen["pointer_step"] == 1  # latest.json still names the good save before it


class _ListingFault:
    """A real engine whose save then does to rank 0's listing what a shared file system can: on rank 1, `unseen`
    removes its own optimizer file (a write rank 0 does not see yet), `stray` adds one a 3-rank save would have
    written (a stale entry)."""

    def __init__(self, engine, case: str, rank: int):
        self.engine, self.case, self.rank = engine, case, rank

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def save_checkpoint(self, save_dir, tag, **kwargs):
        self.engine.save_checkpoint(save_dir, tag=tag, **kwargs)
        if self.rank == 1:
            folder = Path(save_dir) / tag
            if self.case == "unseen":
                (folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
            else:
                (folder / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"from an earlier save")


def save_on_ranks(out: Path) -> None:
    """One rank of `bare_saves`: a good save (step 1) per stage and precision, then the two faults (step 2)."""
    import deepspeed
    import torch

    from hpcds.errors import HpcdsError
    from hpcds.train.__main__ import unlink_shm_buffer

    deepspeed.init_distributed(dist_backend="gloo")
    rank = int(os.environ["RANK"])
    torch.distributed.barrier()
    unlink_shm_buffer(rank)  # as the trainer does: DeepSpeed leaves its 69 MB buffer in /dev/shm otherwise
    cases = [(f"z{stage}-{precision}", stage, precision, None) for stage, precision in SAVE_CONFIGS]
    cases += [(fault, 2, "fp32", fault) for fault in ("unseen", "stray")]
    results = {}
    for name, stage, precision, fault in cases:
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        config = {"train_micro_batch_size_per_gpu": 2, "train_batch_size": 4, "zero_optimization": {"stage": stage}}
        config["bf16"] = {"enabled": precision == "bf16"}
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)
        x = torch.randn(2, 8, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        engine.backward(engine(x).float().square().mean())
        engine.step()
        ckpt_dir = out / name
        step, error = 1, None
        try:
            ck.save(engine, ckpt_dir, 1, {}, {"rank": rank}, rank=rank, world=2, info={})
            if fault:
                step = 2
                ck.save(
                    _ListingFault(engine, fault, rank), ckpt_dir, 2, {}, {"rank": rank}, rank=rank, world=2, info={}
                )
        except HpcdsError as exc:
            error = str(exc)
        folder = ckpt_dir / ck.tag_for(step)
        manifest = json.loads((folder / ck.MANIFEST).read_text()) if (folder / ck.MANIFEST).is_file() else {}
        results[json.dumps([rank, name])] = {
            "error": error,
            "files": sorted(manifest.get("files", {})),
            "manifest": bool(manifest),
            "committed": (folder / ck.COMMITTED).is_file(),
            "pointer_step": json.loads(pointer.read_text())["step"]
            if (pointer := ckpt_dir / ck.POINTER).is_file()
            else None,
        }
        torch.distributed.barrier()  # rank 0 reads the folders only after both ranks are done with them
    gathered: list = [None, None]
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        (out / "results.json").write_text(json.dumps({k: v for part in gathered for k, v in part.items()}))


if __name__ == "__main__":
    save_on_ranks(Path(sys.argv[1]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as the trainer does: interpreter teardown with gloo's threads alive can abort a finished rank
