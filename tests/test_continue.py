"""Continuing a run with a changed spec: the field rules, the schedule's continuity, the CLI's refusals and records,
and real continues on DeepSpeed gloo ranks (more steps from a finished run, then fewer ranks).

The DeepSpeed part trains a tiny Mamba (as tests/test_resume.py does) with a constant schedule after warmup, so a run
of 8 steps continued to 12 must give exactly the losses of an uninterrupted 12-step run: steps 9-12 depend on the
weights and on Adam's moments, so a continue that started at step 0 or with a fresh optimizer would differ.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpcds import facts, runs
from hpcds.errors import HpcdsError
from hpcds.spec.continuation import compare_specs, refusal
from hpcds.train.schedule import anchored_lr, anchored_training, continuation_anchor, lr_for_spec

REPO = Path(__file__).resolve().parents[1]


def tiny_tree(**training) -> dict:
    return {
        "name": "tiny-cont",
        "model": {"type": "mamba", "d_model": 32, "n_layer": 1, "vocab_size": 256, "max_seq_len": 32},
        "data": {"train": "builtin:stdlib-docs", "tokenizer": "bytes"},
        "training": {
            "precision": "fp32",
            "micro_batch_size": 2,
            "grad_accum_steps": 2,
            "lr": 3e-3,
            "warmup_steps": 2,
            "decay": "constant",
            "max_steps": 8,
            "log_interval_steps": 1,
            "eval_interval_steps": 4,
            "eval_iters": 2,
            **training,
        },
        "deepspeed": {"zero_stage": 2},
        "checkpoint": {"every_steps": 4, "keep_last": 2},
        "slurm": {"gpus_per_node": 0, "ranks_per_node": 2},
        "wandb": {"mode": "disabled"},
    }


def resolved(tree: dict) -> dict:
    from hpcds.spec import validate_spec

    return validate_spec(tree).model_dump(mode="json")


def test_safe_changes_pass_and_every_refused_field_is_named_with_both_values():
    old = resolved(tiny_tree())
    new = resolved(
        tiny_tree(max_steps=20, lr=1e-3, eval_interval_steps=5, micro_batch_size=4)
        | {"slurm": {"gpus_per_node": 0, "ranks_per_node": 1, "nodes": 2, "time": "1:00:00"}}
        | {"model": {"type": "mamba", "d_model": 64, "n_layer": 1, "vocab_size": 256, "max_seq_len": 32}}
    )
    comparison = compare_specs(old, new)
    assert {c.path for c in comparison.safe} == {
        "training.max_steps",
        "training.lr",
        "training.eval_interval_steps",
        "slurm.ranks_per_node",
        "slurm.nodes",
        "slurm.time",
    }
    assert {c.path for c in comparison.refused} == {"training.micro_batch_size", "model.d_model"}
    text = str(refusal(comparison, "tiny-cont-1"))
    assert "model.d_model: 32 -> 64" in text and "training.micro_batch_size: 2 -> 4" in text
    assert "init_from" in text  # the way out for a new model: a new run from these weights
    assert refusal(compare_specs(old, old), "x") is None and not compare_specs(old, old).changed


def test_a_field_not_known_safe_is_refused():
    old = resolved(tiny_tree())
    new = resolved(tiny_tree() | {"deepspeed": {"zero_stage": 3}, "wandb": {"mode": "disabled", "project": "other"}})
    assert {c.path for c in compare_specs(old, new).refused} == {"deepspeed.zero_stage", "wandb.project"}
    # slurm.* is safe but for the snapshot, which only a new run gets; how saves are written and which kernels run
    # leave the checkpoint's meaning alone
    tree = tiny_tree() | {"checkpoint": {"every_steps": 4, "keep_last": 2, "async_save": False}}
    tree["model"] = tree["model"] | {"kernels": "reference"}
    tree["slurm"] = tree["slurm"] | {"snapshot": True}
    comparison = compare_specs(old, resolved(tree))
    assert {c.path for c in comparison.safe} == {"checkpoint.async_save", "model.kernels"}
    assert [c.path for c in comparison.refused] == ["slurm.snapshot"]
    assert "made when the run is created" in str(refusal(comparison, "x"))


def _training(**fields):
    from hpcds.spec import validate_spec

    return validate_spec(tiny_tree(decay="cosine", min_lr=1e-4, **fields)).training


def test_more_steps_keep_the_rate_continuous_and_a_new_peak_applies_as_written():
    old, longer = _training(max_steps=100), _training(max_steps=200)
    anchor = continuation_anchor(old, longer, 60)
    assert anchor == {"step": 60, "lr": lr_for_spec(60, old)}
    assert anchored_lr(60, longer, anchor) == lr_for_spec(60, old)  # no jump at the resume step
    rates = [anchored_lr(step, longer, anchor) for step in range(60, 200)]
    assert all(a >= b for a, b in itertools.pairwise(rates))  # then a decay ...
    assert rates[-1] == pytest.approx(1e-4)  # ... to min_lr at the new end
    # the trainer's own schedule function gives the same rates from the anchored spec
    trained = anchored_training(longer, anchor, resume_step=60)
    assert [lr_for_spec(s, trained) for s in range(60, 200)] == rates
    assert anchored_training(longer, anchor, resume_step=40) is longer  # resumed from before the anchor
    # a new peak (or warmup) is a new schedule: as written, no anchor; inside the warmup no anchor is needed
    assert continuation_anchor(old, _training(max_steps=200, lr=1e-3), 60) is None
    assert continuation_anchor(old, longer, 1) is None
    # an unchanged schedule keeps an earlier continuation's anchor
    assert continuation_anchor(longer, longer, 120, anchor) == anchor
    again = continuation_anchor(longer, _training(max_steps=300), 120, anchor)
    assert again == {"step": 120, "lr": anchored_lr(120, longer, anchor)}


def _local_run(root: Path, tree: dict) -> Path:
    from hpcds.cli.train_cmd import local_spec, prepare_run
    from hpcds.spec import validate_spec

    run_dir, _ = prepare_run(local_spec(validate_spec(tree), 2), root, new=True)
    return run_dir


def test_continue_records_the_change_and_keeps_the_old_spec(tmp_path):
    from hpcds.cli.train_cmd import local_spec, prepare_run
    from hpcds.spec import validate_spec

    run_dir = _local_run(tmp_path, tiny_tree(decay="cosine"))
    wandb_id = runs.read_meta(run_dir)["wandb_id"]
    old_text = (run_dir / facts.SPEC_FILE).read_text()
    # a checkpoint at step 8 as the trainer's pointer names it
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest.json").write_text(json.dumps({"tag": "step_8", "step": 8}))
    bad = local_spec(validate_spec(tiny_tree(decay="cosine", seed=7, max_steps=12)), 2)
    with pytest.raises(HpcdsError, match=r"training.seed: 1234 -> 7") as refused:
        prepare_run(bad, tmp_path, resume=run_dir)
    assert "max_steps" not in str(refused.value)  # only the refused fields are listed
    assert (run_dir / facts.SPEC_FILE).read_text() == old_text and not (run_dir / "spec-1.yaml").exists()

    good = local_spec(validate_spec(tiny_tree(decay="cosine", max_steps=12)), 2)
    assert prepare_run(good, tmp_path, resume=run_dir) == (run_dir, True)
    assert (run_dir / "spec-1.yaml").read_text() == old_text
    assert yaml.safe_load((run_dir / facts.SPEC_FILE).read_text())["training"]["max_steps"] == 12
    changed = [e for e in runs.read_events(run_dir) if e["event"] == "spec_changed"]
    assert changed[-1]["changes"] == [{"field": "training.max_steps", "old": 8, "new": 12}]
    assert changed[-1]["previous"] == "spec-1.yaml" and changed[-1]["resume_step"] == 8
    meta = runs.read_meta(run_dir)
    assert meta["wandb_id"] == wandb_id and meta["lr_anchor"]["step"] == 8

    # hpcds run without --resume names the run, what differs, and both ways on
    other = local_spec(validate_spec(tiny_tree(decay="cosine", max_steps=16)), 2)
    with pytest.raises(HpcdsError, match=r"(?s)training.max_steps: 12 -> 16.*--resume .*--new"):
        prepare_run(other, tmp_path)


@pytest.mark.parametrize("snapshot", [False, True])
def test_a_continue_records_the_environment_it_is_submitted_from(tmp_path, monkeypatch, snapshot):
    """Submitted under torch 0.0.1 with other hpcds code, continued here under hpcds 9.9.9: the job's starts compare
    with this environment from now on (else `on_version_change: fail` would end every start of the continued run),
    and the old values are in an event and on the console. A Slurm run with a snapshot runs its copy: the record
    holds the copy's code and version, so the job's own check (run from the copy) finds nothing changed."""
    from hpcds import snapshot as snapshots
    from hpcds import versions
    from hpcds.cli import continuing

    installed = versions.package_versions()
    tree = tiny_tree() | {"slurm": {"gpus_per_node": 0, "ranks_per_node": 2, "snapshot": snapshot}}
    run_dir = _local_run(tmp_path, tree)
    if snapshot:  # a Slurm run as hpcds submit leaves it, with its copy of hpcds
        runs.update_meta(run_dir, local=False)
        snapshots.write_snapshot(run_dir)
        monkeypatch.setattr("hpcds.slurm.squeue_mine", lambda: [])
    meta = runs.read_meta(run_dir)
    runs.update_meta(run_dir, versions={**meta["versions"], "torch": "0.0.1"}, hpcds_code="0" * 64)
    monkeypatch.setattr(versions, "package_versions", lambda: {**installed, "hpcds": "9.9.9"})  # upgraded since
    text = yaml.safe_dump(resolved(tree | {"training": tree["training"] | {"max_steps": 12}}))
    record = continuing.continue_run(run_dir, {facts.SPEC_FILE: text}, local=not snapshot)

    here = versions.current_record()
    expected = {"hpcds": [installed["hpcds"], "9.9.9"]} if not snapshot else {}
    expected |= {"torch": ["0.0.1", installed["torch"]], "hpcds_code": ["0" * 12, here["hpcds_code"][:12]]}
    assert record["environment"] == expected
    (event,) = [e for e in runs.read_events(run_dir) if e["event"] == "environment_recorded"]
    assert event["changed"] == expected
    assert "environment" not in next(e for e in runs.read_events(run_dir) if e["event"] == "spec_changed")
    assert f"torch 0.0.1 -> {installed['torch']}" in "\n".join(continuing.describe(record))
    meta = runs.read_meta(run_dir)
    if snapshot:  # what hpcds launch finds running from the copy
        copy = snapshots.snapshot_package(run_dir)
        job = {**here, "versions": installed, "hpcds_code": versions.code_digest(copy)}
        assert versions.changes(meta, job) == {}
    else:
        assert versions.changes(meta, here) == {}


def test_a_spec_saying_auto_continues_with_the_runs_pinned_strategy(tmp_path):
    from hpcds.cli.train_cmd import local_spec, prepare_run
    from hpcds.spec import validate_spec

    pinned = tiny_tree() | {"deepspeed": {"zero_stage": 2, "offload_optimizer": "cpu"}}
    run_dir = _local_run(tmp_path, pinned)
    auto = local_spec(validate_spec(tiny_tree(max_steps=12) | {"deepspeed": {"zero_stage": "auto"}}), 2)
    assert prepare_run(auto, tmp_path, resume=run_dir) == (run_dir, True)
    changed = [e for e in runs.read_events(run_dir) if e["event"] == "spec_changed"]
    assert changed[-1]["changes"] == [{"field": "training.max_steps", "old": 8, "new": 12}]
    assert yaml.safe_load((run_dir / facts.SPEC_FILE).read_text())["deepspeed"]["offload_optimizer"] == "cpu"


def test_init_from_a_spec_name_takes_its_newest_run_by_creation_time(tmp_path):
    from hpcds.cli.continuing import find_source_run

    for name, created in (("base-20261201-000000", 2.0), ("base-t9-20261130-000000", 1.0)):
        (tmp_path / name).mkdir()
        runs.write_json_atomic(tmp_path / name / facts.META_FILE, {"spec_name": "base", "created": created})
    assert find_source_run(tmp_path, "base").name == "base-20261201-000000"


def test_a_run_with_a_live_job_is_not_changed(tmp_path, monkeypatch):
    from hpcds.cli import continuing
    from hpcds.slurm.parse import JobState

    run_dir = _local_run(tmp_path, tiny_tree())
    runs.update_meta(run_dir, local=False, job_ids=["4242"])
    job = JobState("4242", "PENDING", "Priority", "", 1, 0, 60, 0, "debug", None, "tiny")
    monkeypatch.setattr("hpcds.slurm.squeue_mine", lambda: [job])
    with pytest.raises(HpcdsError, match="its job 4242 is PENDING"):
        continuing.continue_run(run_dir, {facts.SPEC_FILE: (run_dir / facts.SPEC_FILE).read_text()}, local=False)
    with pytest.raises(HpcdsError, match="is a Slurm run"):
        continuing.continue_run(run_dir, {}, local=True)


def test_resume_says_which_flag_does_not_apply_instead_of_dropping_it(tmp_path):
    run_dir = _local_run(tmp_path, tiny_tree())
    done = subprocess.run(
        [sys.executable, "-m", "hpcds", "resume", run_dir.name, "--after", "other", "--runs-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "--after does not apply to" in done.stderr and "Traceback" not in done.stderr
    assert not [e for e in runs.read_events(run_dir) if e["event"] == "spec_changed"]


# ---------------------------------------------------------------------------------------------------------------------
# Real DeepSpeed ranks


def _hpcds(args: list[str], root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hpcds", *args, "--runs-dir", str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def ds_env(tmp_path_factory):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HPCDS_DATA_CACHE": str(tmp_path_factory.mktemp("data-cache"))}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    return env


@pytest.mark.deepspeed
def test_a_finished_run_continues_with_more_steps_then_on_fewer_ranks(tmp_path, ds_env):
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_tree()))
    root = tmp_path / "runs"
    # The reference: 12 steps straight.
    straight = _hpcds(["run", str(spec_file), "--set", "training.max_steps=12", "--new"], root, ds_env)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    reference = runs.list_runs(root)[0]

    first = _hpcds(["run", str(spec_file), "--new"], root, ds_env)
    assert first.returncode == 0, first.stdout + first.stderr
    run_dir = next(d for d in runs.list_runs(root) if d != reference)
    # The same command again: the run is finished, so it says so instead of starting again from step 0.
    again = _hpcds(["run", str(spec_file)], root, ds_env)
    assert again.returncode == 1 and "--new" in again.stderr and "Traceback" not in again.stderr

    more = _hpcds(["run", str(spec_file), "--set", "training.max_steps=12", "--resume", run_dir.name], root, ds_env)
    assert more.returncode == 0, more.stdout + more.stderr
    assert "training.max_steps: 8 -> 12" in more.stdout and "resuming from step_8" in more.stdout
    starts = [e for e in runs.read_events(run_dir) if e["event"] == "train_start"]
    assert [e["step"] for e in starts] == [0, 8]
    probe = [e for e in runs.read_events(run_dir) if e["event"] == "probe"]
    assert probe and probe[-1]["ok"]
    # Steps 9-12 exactly as the straight run's: the weights, Adam's moments and the data position all carried on.
    assert _losses(run_dir) == _losses(reference)

    # Continue again on one rank instead of two (through the universal checkpoint), with hpcds resume.
    fewer = _hpcds(["resume", run_dir.name, "--set", "training.max_steps=14", "--ranks", "1"], root, ds_env)
    assert fewer.returncode == 0, fewer.stdout + fewer.stderr
    events = runs.read_events(run_dir)
    assert [e["step"] for e in events if e["event"] == "train_start"][-1] == 12
    converted = [e for e in events if e["event"] == "checkpoint_converted"]
    assert converted and converted[-1]["from_world_size"] == 2 and converted[-1]["to_world_size"] == 1
    assert [e for e in events if e["event"] == "probe"][-1]["ok"]
    assert [e["step"] for e in events if e["event"] == "finished"][-1] == 14
    assert sorted(p.name for p in run_dir.glob("spec-*.yaml")) == ["spec-1.yaml", "spec-2.yaml"]
    assert max(_losses(run_dir)) == 14

    # A refused change names the field with both values and changes nothing.
    refused = _hpcds(
        ["resume", run_dir.name, "--set", "model.d_model=64", "--set", "training.max_steps=20"], root, ds_env
    )
    assert refused.returncode == 1 and "model.d_model: 32 -> 64" in refused.stderr
    assert "Traceback" not in refused.stderr and not (run_dir / "spec-3.yaml").exists()


def test_status_shows_spec_changes_and_what_a_pending_job_waits_for():
    from hpcds.slurm.parse import JobState
    from hpcds.slurm.status import run_status, spec_change_lines

    events = [
        {"time": 1.0, "event": "created"},
        {"time": 2.0, "event": "spec_changed", "resume_step": 8, "changes": [
            {"field": "training.max_steps", "old": 8, "new": 12},
            {"field": "slurm.nodes", "old": 1, "new": 2},
        ]},
        {"time": 3.0, "event": "submitted", "job_id": "77", "job_name": "tiny", "dependency": "afterok:76"},
    ]  # fmt: skip
    job = JobState("77", "PENDING", "Dependency", "", 1, 0, 60, 0, "debug", None, "tiny")
    row = run_status("tiny-1", {"job_ids": ["77"]}, events, None, {}, {"77": job}, now=10.0)
    assert (row.state, row.reason) == ("PENDING", "Dependency (afterok:76)")
    assert spec_change_lines(row.spec_changes) == ["from step 8: training.max_steps 8 -> 12, slurm.nodes 1 -> 2"]
