"""Trainer overheads, each as a ratio measured side by side in one run (absolute numbers on a shared disk and CPU are
noise; ratios taken minutes apart on the same machine are not):

1. step time of the hpcds trainer ÷ a bare DeepSpeed loop (same model, data, optimizer, ranks, and hpcds's host
   settings: threads per rank, allocator thresholds)                                             goal <= 1.02
   and ÷ the same bare loop on torch's and glibc's defaults (what a person gets writing it alone)
2. checkpoint write bytes/s (DeepSpeed save + per-rank state + CRC-32 + fsync + commit) ÷ `dd conv=fsync`
   of as many bytes to the same disk                                                              goal >= 0.7
3. resume time (process start to first step: imports, process group, model, engine, verify, load, probe)
   ÷ (import time of torch + deepspeed + transformers' model + checkpoint bytes / `dd` read bandwidth)   goal <= 1.5
   and ÷ a bare DeepSpeed script's restart (process group, model, engine, load_checkpoint of the same checkpoint)
4. training blocked per periodic save with checkpoint.async_save on ÷ a synchronous save's time     goal <= 0.1
5. steps/s with a save every N steps (asynchronous, and synchronous) ÷ steps/s without saves

    python bench/bench_train.py                 # 2 ranks; --help for sizes
    python bench/bench_train.py --rounds 3 --steps 40

The bare loop runs this file under DeepSpeed's launcher (`--bare RUN_DIR [--host-settings]`); everything else is
driven from here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def spec_for(name: str, d_model: int, layers: int, seq: int, micro: int, steps: int, every: int, async_save=False):
    from hpcds.spec import validate_spec

    return validate_spec(
        {
            "name": name,
            "model": {"type": "mamba", "d_model": d_model, "n_layer": layers, "vocab_size": 256, "max_seq_len": seq},
            "data": {"train": "builtin:stdlib-docs", "tokenizer": "bytes"},
            "training": {
                "precision": "fp32",
                "micro_batch_size": micro,
                "warmup_steps": 0,
                "max_steps": steps,
                "log_interval_steps": 1000,
                "eval_interval_steps": 0,
            },
            "deepspeed": {"zero_stage": 2},
            "checkpoint": {"every_steps": every, "keep_last": 3, "async_save": async_save},
            "slurm": {"gpus_per_node": 0, "ranks_per_node": 2},
            "wandb": {"mode": "disabled"},
        }
    )


def new_run(root: Path, spec) -> Path:
    from hpcds.cli.train_cmd import prepare_run

    return prepare_run(spec, root, new=True)[0]


def quiet_launch(run_dir: Path, ranks: int, fault: str = "") -> int:
    from hpcds.launch import launch_local

    os.environ["HPCDS_TEST_FAULT"] = fault
    log = run_dir / "bench-launch.log"
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            return launch_local(run_dir, ranks)
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)


def step_times(records: list[dict], warmup: int) -> float:
    """Median seconds per step after `warmup` steps, from per-step wall-clock stamps."""
    stamps = [r["time"] for r in sorted(records, key=lambda r: r["step"])][warmup:]
    return statistics.median(b - a for a, b in itertools.pairwise(stamps))


def trainer_step_s(root: Path, spec, ranks: int, warmup: int) -> float:
    run_dir = new_run(root, spec)
    code = quiet_launch(run_dir, ranks)
    if code != 0:
        raise SystemExit(f"trainer run failed ({code}): see {run_dir / 'bench-launch.log'}")
    records = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    return step_times(records, warmup)


def bare_launch(run_dir: Path, ranks: int, *mode: str) -> None:
    """This file under DeepSpeed's launcher on `ranks` CPU ranks, in one of its bare modes (`--bare RUN_DIR ...`)."""
    from hpcds.launch import _deepspeed_executable, free_port

    argv = [_deepspeed_executable(), "--num_accelerators", str(ranks), "--master_addr", "127.0.0.1"]
    argv += ["--master_port", str(free_port()), "--no_local_rank", __file__, *mode]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    with open(run_dir / "bench-launch.log", "a") as log:
        code = subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"bare DeepSpeed ({' '.join(mode)}) failed ({code}): see {run_dir / 'bench-launch.log'}")


def bare_step_s(root: Path, spec, ranks: int, warmup: int, host_settings: bool) -> float:
    run_dir = new_run(root, spec)
    bare_launch(run_dir, ranks, "--bare", str(run_dir), *(["--host-settings"] if host_settings else []))
    records = [json.loads(line) for line in (run_dir / "bare.jsonl").read_text().splitlines()]
    return step_times(records, warmup)


def bare_resume(run_dir: Path, tag: str) -> None:
    """What a person's own DeepSpeed script does to restart: process group, model (randomly initialised), engine,
    `load_checkpoint`. Rank 0 writes its process age once every rank has loaded."""
    import deepspeed
    import torch.distributed as dist

    from hpcds.spec import load_spec
    from hpcds.train.__main__ import make_optimizer
    from hpcds.train.models import build_model
    from hpcds.train.progress import process_age_s

    deepspeed.init_distributed(dist_backend="gloo")
    spec = load_spec(run_dir / "spec.yaml")
    config = json.loads((run_dir / "ds_config.json").read_text())
    model = build_model(spec.model, seed=spec.training.seed)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, spec, 1e-3), config=config)
    engine.load_checkpoint(str(run_dir / "checkpoints"), tag=tag)
    dist.barrier()
    if dist.get_rank() == 0:
        (run_dir / "bare-resume.json").write_text(json.dumps({"startup_s": process_age_s()}))
    sys.stdout.flush()
    os._exit(0)


def bare_loop(run_dir: Path, host_settings: bool) -> None:
    """The reference: what a person writes with DeepSpeed alone. Same model, data, optimizer, lr, config; with
    `host_settings`, the trainer's threads and allocator thresholds too."""
    if host_settings:
        from hpcds.train.host import apply_host_settings

        apply_host_settings(int(os.environ["LOCAL_SIZE"]))
    import deepspeed
    import torch.distributed as dist
    import torch.nn.functional as F

    from hpcds.spec import load_spec
    from hpcds.train.__main__ import data_cache_dir, make_optimizer
    from hpcds.train.data import open_data, prepare_data
    from hpcds.train.models import build_model

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    spec = load_spec(run_dir / "spec.yaml")
    config = json.loads((run_dir / "ds_config.json").read_text())
    cache = data_cache_dir(run_dir)
    if rank == 0:
        prepare_data(spec.data, cache)
    dist.barrier()
    data = open_data(spec.data, spec.model.max_seq_len, spec.training.seed, cache)
    model = build_model(spec.model, seed=spec.training.seed)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, spec, 1e-3), config=config)
    micro, accum = config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]
    out = open(run_dir / "bare.jsonl", "a") if rank == 0 else None  # noqa: SIM115
    for step in range(spec.training.max_steps):
        for m in range(accum):
            x, y = data.train_batch(step, m, rank, world, micro)
            logits = engine(input_ids=x).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)
            engine.backward(loss)
            engine.step()
        if out:
            out.write(json.dumps({"step": step + 1, "loss": loss.item(), "time": time.time()}) + "\n")
            out.flush()
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def dd_write_bytes_per_s(folder: Path, nbytes: int) -> float:
    target = folder / "dd-bench.bin"
    count = max(1, nbytes // (8 << 20))
    seconds = timed(["dd", "if=/dev/zero", f"of={target}", "bs=8M", f"count={count}", "conv=fsync"])
    target.unlink()
    return count * (8 << 20) / seconds


def dd_read_bytes_per_s(files: list[Path]) -> float:
    total = sum(f.stat().st_size for f in files)
    seconds = sum(timed(["dd", f"if={f}", "of=/dev/null", "bs=8M"]) for f in files)
    return total / seconds


def import_s() -> float:
    # What the trainer must import whatever it does: torch, DeepSpeed, transformers and the model class.
    return timed([sys.executable, "-c", "import torch, deepspeed, transformers; transformers.MambaForCausalLM"])


def checkpoint_bench(root: Path, args) -> dict:
    """One run: SIGTERM after step 1 (save step_1, exit 75), restart (resume), finish at step 2 (save step_2)."""
    from hpcds import runs

    spec = spec_for("bench-ckpt", args.ckpt_d_model, args.ckpt_layers, 64, 1, 2, 1000)
    run_dir = new_run(root, spec)
    if quiet_launch(run_dir, args.ranks, fault="signal_at:1:TERM") != 75:
        raise SystemExit(f"checkpoint run did not stop with 75: see {run_dir / 'bench-launch.log'}")
    bare_launch(run_dir, args.ranks, "--bare", str(run_dir), "--resume-tag", "step_1")
    if quiet_launch(run_dir, args.ranks) != 0:
        raise SystemExit(f"checkpoint resume failed: see {run_dir / 'bench-launch.log'}")
    events = runs.read_events(run_dir)
    saves = [e for e in events if e["event"] == "checkpoint"]
    resumed = [e for e in events if e["event"] == "train_start" and e.get("resumed_from")][-1]
    ckpt = run_dir / "checkpoints" / "step_2"
    files = [p for p in ckpt.iterdir() if p.is_file()]
    nbytes = saves[-1]["bytes"]
    return {
        "bytes": nbytes,
        # The writing alone: a save's `seconds` also count the resume probe's forward pass (phases_s.probe).
        "save_bytes_per_s": statistics.median(
            e["bytes"] / (e["seconds"] - e.get("phases_s", {}).get("probe", 0.0)) for e in saves
        ),
        # The disk is noisy: the median of three dd runs right after the saves.
        "dd_write_bytes_per_s": statistics.median(dd_write_bytes_per_s(ckpt.parent, nbytes) for _ in range(3)),
        "save_phases": [e.get("phases_s") for e in saves],
        "startup_phases": resumed.get("phases_s"),
        "resume_s": resumed["startup_s"],
        "load_s": resumed["resume_s"],
        "bare_resume_s": json.loads((run_dir / "bare-resume.json").read_text())["startup_s"],
        "import_s": statistics.median(import_s() for _ in range(3)),
        "dd_read_bytes_per_s": dd_read_bytes_per_s(files),
    }


def save_bench(root: Path, args) -> dict:
    """The checkpoint model trained `--save-steps` steps three ways, `--rounds` times alternated: no periodic save, a
    save every `--save-every` steps in the background, the same synchronously. Blocking and save times from the
    `checkpoint` events (the final save, synchronous in every run, left out); steps/s from the step records between
    the first and the last step, the median of the rounds."""
    from hpcds import runs

    out: dict[str, dict] = {}
    modes = (("none", 10**6), ("async", args.save_every), ("sync", args.save_every))
    for mode, every in [m for _ in range(args.rounds) for m in modes]:
        spec = spec_for(
            f"bench-save-{mode}", args.ckpt_d_model, args.ckpt_layers, 64, 1, args.save_steps, every, mode == "async"
        )
        run_dir = new_run(root, spec)
        if quiet_launch(run_dir, args.ranks) != 0:
            raise SystemExit(f"save bench run ({mode}) failed: see {run_dir / 'bench-launch.log'}")
        saves = [e for e in runs.read_events(run_dir) if e["event"] == "checkpoint" and e["step"] < args.save_steps]
        records = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
        times = {r["step"]: r["time"] for r in records}
        got = out.setdefault(mode, {"steps_per_s": [], "seconds": [], "blocking_s": [], "probe_s": []})
        got["steps_per_s"].append(round((args.save_steps - 1) / (times[args.save_steps] - times[1]), 4))
        got["seconds"] += [e["seconds"] for e in saves]
        got["blocking_s"] += [e.get("blocking_s", e["seconds"]) for e in saves]
        got["probe_s"] += [e["phases_s"]["probe"] for e in saves]
        got.setdefault("phases", []).extend(e["phases_s"] for e in saves)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bare", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--host-settings", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--resume-tag", help=argparse.SUPPRESS)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per step-time run")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the step-time median")
    parser.add_argument("--rounds", type=int, default=3, help="bare/tuned bare/trainer rounds, alternated")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--ckpt-d-model", type=int, default=1024, help="model for the checkpoint numbers")
    parser.add_argument("--ckpt-layers", type=int, default=8)
    parser.add_argument("--save-steps", type=int, default=24, help="steps of each save-bench run")
    parser.add_argument("--save-every", type=int, default=6, help="periodic save interval of the save bench")
    parser.add_argument("--only", choices=["step", "checkpoint", "save"], help="run one part (for iterating on it)")
    parser.add_argument("--dir", type=Path, help="runs root for the bench (default: a temp folder under ./runs)")
    args = parser.parse_args()
    if args.bare:
        if args.resume_tag:
            bare_resume(args.bare, args.resume_tag)
        bare_loop(args.bare, args.host_settings)
        return
    Path("runs").mkdir(exist_ok=True)
    root = args.dir or Path(tempfile.mkdtemp(prefix=".bench-", dir="runs"))
    os.environ.setdefault("HPCDS_DATA_CACHE", str(root / ".cache" / "data"))
    rows = []
    if args.only in (None, "step"):
        spec = spec_for("bench-step", args.d_model, args.layers, args.seq, 4, args.steps, 10**6)
        bare, tuned, trainer = [], [], []
        for _ in range(args.rounds):  # alternated, so a drift in machine load hits every side alike
            bare.append(bare_step_s(root, spec, args.ranks, args.warmup, host_settings=False))
            tuned.append(bare_step_s(root, spec, args.ranks, args.warmup, host_settings=True))
            trainer.append(trainer_step_s(root, spec, args.ranks, args.warmup))
        bare_s, tuned_s, trainer_s = (statistics.median(sides) for sides in (bare, tuned, trainer))
        print(
            f"step model mamba d{args.d_model}x{args.layers} seq {args.seq}, {args.ranks} ranks; s/step per round: "
            f"bare {[round(b, 4) for b in bare]}, bare with hpcds's host settings {[round(b, 4) for b in tuned]}, "
            f"trainer {[round(t, 4) for t in trainer]}"
        )
        rows += [
            (
                "trainer step / bare, same host settings",
                f"{trainer_s:.4f} s / {tuned_s:.4f} s",
                trainer_s / tuned_s,
                "<= 1.02",
            ),
            ("trainer step / bare, torch's defaults", f"{trainer_s:.4f} s / {bare_s:.4f} s", trainer_s / bare_s, ""),
        ]
    if args.only in (None, "checkpoint"):
        ck = checkpoint_bench(root, args)
        ideal_resume_s = ck["import_s"] + ck["bytes"] / ck["dd_read_bytes_per_s"]
        print(
            f"checkpoint {ck['bytes'] / 1e6:.0f} MB (mamba d{args.ckpt_d_model}x{args.ckpt_layers}); "
            f"save phases {ck['save_phases']}; start-up phases {ck['startup_phases']}"
        )
        rows += [
            (
                "checkpoint write / dd conv=fsync",
                f"{ck['save_bytes_per_s'] / 1e6:.0f} / {ck['dd_write_bytes_per_s'] / 1e6:.0f} MB/s",
                ck["save_bytes_per_s"] / ck["dd_write_bytes_per_s"],
                ">= 0.7",
            ),
            (
                "resume / (import + bytes / read bw)",
                f"{ck['resume_s']:.1f} s / ({ck['import_s']:.1f} + {ck['bytes'] / ck['dd_read_bytes_per_s']:.2f}) s",
                ck["resume_s"] / ideal_resume_s,
                "<= 1.5",
            ),
            (
                "  resume / bare DeepSpeed restart + load",
                f"{ck['resume_s']:.1f} s / {ck['bare_resume_s']:.1f} s",
                ck["resume_s"] / ck["bare_resume_s"],
                "",
            ),
            (
                "  bare DeepSpeed restart / (import + bw)",
                f"{ck['bare_resume_s']:.1f} s / {ideal_resume_s:.1f} s",
                ck["bare_resume_s"] / ideal_resume_s,
                "(floor)",
            ),
        ]
    if args.only in (None, "save"):
        sv = save_bench(root, args)
        print(f"save bench: a save every {args.save_every} of {args.save_steps} steps; " + json.dumps(sv))
        blocking, sync_s = statistics.median(sv["async"]["blocking_s"]), statistics.median(sv["sync"]["seconds"])
        rows.append(
            ("blocked per save (async) / sync save", f"{blocking:.3f} s / {sync_s:.3f} s", blocking / sync_s, "<= 0.1")
        )
        # The resume probe (a forward pass on one micro-batch, in every save) blocks either way: the rest alone.
        probe_s = statistics.median(sv["async"]["probe_s"] + sv["sync"]["probe_s"])
        less = f"{blocking - probe_s:.3f} s / {sync_s - probe_s:.3f} s"
        rows.append(("  the same less the probe's forward pass", less, (blocking - probe_s) / (sync_s - probe_s), ""))
        for mode in ("async", "sync"):
            rate, bare = statistics.median(sv[mode]["steps_per_s"]), statistics.median(sv["none"]["steps_per_s"])
            rows.append(
                (
                    f"steps/s, {mode} save every {args.save_every} / no saves",
                    f"{rate:.3f} / {bare:.3f}",
                    rate / bare,
                    "",
                )
            )
    print(f"{'measure':40} {'values':36} {'ratio':>7}  goal")
    for name, values, ratio, goal in rows:
        print(f"{name:40} {values:36} {ratio:7.3f}  {goal}")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
