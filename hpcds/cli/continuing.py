"""Runs that build on runs, on the login node: continue a run with a changed spec, check `--after` and `init_from`.

`continue_run` rewrites a run directory for a continue (`hpcds run|submit SPEC --resume RUN`, `hpcds resume RUN`): it
refuses a run that still has a queued or running job and changes the run's checkpoints do not survive
(hpcds.spec.continuation), keeps the previous spec as `spec-<n>.yaml`, writes the new files, logs a `spec_changed`
event with each field's old and new value, and keeps the learning rate continuous through an anchor in meta.json
(hpcds.train.schedule). Light on purpose: no torch, no deepspeed.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import yaml

from hpcds import facts, runs
from hpcds.errors import HpcdsError
from hpcds.train.init_from import is_export_folder, split_source

LR_ANCHOR_KEY = "lr_anchor"
_HISTORY = re.compile(r"spec-(\d+)\.yaml")


def checkpoint_dir(run_dir: Path, spec) -> Path:
    return Path(spec.checkpoint.dir) if spec.checkpoint.dir else Path(run_dir) / facts.CHECKPOINT_DIR


def committed_step(run_dir: Path, spec) -> int | None:
    """The step of the run's newest committed checkpoint (its pointer), None without one."""
    pointer = runs.read_json(checkpoint_dir(run_dir, spec) / "latest.json", {}) or {}
    step = pointer.get("step")
    return step if isinstance(step, int) else None


def is_finished(run_dir: Path) -> bool:
    """A run is finished once the trainer said so after its last start."""
    ending = None
    for event in runs.read_events(run_dir):
        if event["event"] == "train_start":
            ending = None
        elif event["event"] == "finished":
            ending = event
    return ending is not None


def busy_reason(run_dir: Path) -> str | None:
    """Why the run cannot be changed now (a Slurm job queued or running, a local run alive), else None."""
    from hpcds.slurm.status import ACTIVE_STATES, LOCAL_ALIVE_S, latest_job_id, local_state

    meta, events = runs.read_meta(run_dir), runs.read_events(run_dir)
    job_id = latest_job_id(meta, events)
    if job_id:
        from hpcds import slurm

        jobs = {job.job_id: job for job in slurm.squeue_mine()}
        job = jobs.get(job_id)
        if job is not None and job.state in ACTIVE_STATES:
            return f"its job {job_id} is {job.state}"
        return None
    progress = runs.read_json(Path(run_dir) / facts.PROGRESS_FILE, {}) or {}
    age = time.time() - float(progress["time"]) if isinstance(progress.get("time"), (int, float)) else None
    state, _ = local_state(events, age)
    return "it is training on this machine" if state == "RUNNING" and age is not None and age < LOCAL_ALIVE_S else None


def pin_to_run(run_dir: Path, spec):
    """`spec` with what `run_dir` pinned for its whole life where `spec` leaves it open: the ZeRO stage and offloads
    where it says auto (the planner could pick others for new resources), and model.init_from as resolved when the
    run was made (its source is not looked up again: a continue resumes from the run's own checkpoints)."""
    from hpcds.spec import deep_merge, load_spec, validate_spec

    old = load_spec(Path(run_dir) / facts.SPEC_FILE)
    update: dict[str, Any] = {}
    if spec.deepspeed.zero_stage == "auto":
        fields = ("zero_stage", "offload_optimizer", "offload_params")
        update["deepspeed"] = {key: getattr(old.deepspeed, key) for key in fields}
    if spec.model.init_from and old.model.init_from:
        update["model"] = {"init_from": old.model.init_from}
    if not update:
        return spec
    return validate_spec(deep_merge(spec.model_dump(mode="json"), update), "--resume")


def next_history_name(run_dir: Path) -> str:
    taken = [int(m.group(1)) for p in Path(run_dir).iterdir() if (m := _HISTORY.fullmatch(p.name))]
    return f"spec-{max(taken, default=0) + 1}.yaml"


def continue_run(run_dir: Path, files: dict[str, str], *, local: bool) -> dict[str, Any]:
    """Make `run_dir` continue with the resolved files `files` (spec.yaml, ds_config.json, and job.sbatch for Slurm).

    Refuses a busy run, a run of the other kind (local vs Slurm), refused changes (every one named with both values),
    and a finished run with nothing to train. Returns the `spec_changed` record (empty `changes` when none)."""
    from hpcds.spec import load_spec
    from hpcds.spec.continuation import change_records, compare_specs, refusal
    from hpcds.train.schedule import continuation_anchor

    run_dir = Path(run_dir)
    meta = runs.read_meta(run_dir)
    name = run_dir.name
    if bool(meta.get("local")) != local:
        kind, other = (
            ("local", "hpcds run SPEC --resume") if meta.get("local") else ("Slurm", "hpcds submit SPEC --resume")
        )
        raise HpcdsError(f"{name} is a {kind} run\nhint: continue it with {other} {name}, or hpcds resume {name}")
    busy = busy_reason(run_dir)
    if busy:
        raise HpcdsError(f"{name} cannot be changed now: {busy}\nhint: wait for it to end, or hpcds cancel {name}")
    old_text = (run_dir / facts.SPEC_FILE).read_text()
    comparison = compare_specs(yaml.safe_load(old_text), yaml.safe_load(files[facts.SPEC_FILE]))
    problem = refusal(comparison, name)
    if problem:
        raise problem
    old_spec = load_spec(run_dir / facts.SPEC_FILE)
    new_spec = load_spec_text(files[facts.SPEC_FILE])
    step = committed_step(run_dir, old_spec)
    if not comparison.changed and is_finished(run_dir) and (step or 0) >= new_spec.training.max_steps:
        raise HpcdsError(
            f"{name} finished at step {step} and the spec changes nothing: there is nothing to continue"
            f"\nhint: raise training.max_steps (e.g. --set training.max_steps={2 * new_spec.training.max_steps})"
        )
    record: dict[str, Any] = {"changes": change_records(comparison), "resume_step": step}
    environment = {"environment": record_environment(run_dir, meta, local=local)}
    if not comparison.changed:
        if not local and facts.SCRIPT_FILE in files:  # the same spec: the script may still name another hpcds
            runs.write_text_atomic(run_dir / facts.SCRIPT_FILE, files[facts.SCRIPT_FILE])
        return record | environment
    anchor = continuation_anchor(old_spec.training, new_spec.training, step or 0, meta.get(LR_ANCHOR_KEY))
    # The old spec is kept first: a crash after it leaves the run as it was, plus a copy.
    history = next_history_name(run_dir)
    runs.write_text_atomic(run_dir / history, old_text)
    for rel in (facts.DS_CONFIG_FILE, facts.SCRIPT_FILE, facts.SPEC_FILE):
        if rel in files:
            runs.write_text_atomic(run_dir / rel, files[rel])
    runs.update_meta(run_dir, **{LR_ANCHOR_KEY: anchor})
    record |= {"previous": history, "lr_anchor": anchor}
    runs.append_event(run_dir, "spec_changed", **record)
    return record | environment


def record_environment(run_dir: Path, meta: dict[str, Any], *, local: bool) -> dict[str, list[Any]]:
    """A continue is submitted from this environment, so the job's starts compare with this one from now on
    (`environment_recorded` event): kept as it was, a run continued after an upgrade warned at every start, and under
    slurm.on_version_change: fail never started again. A Slurm run with a snapshot still runs the run's copy of hpcds:
    its code is the copy's, and its version the one recorded with the copy. Returns {name: [recorded before, now]}
    of what changed."""
    from hpcds import snapshot, versions

    now = versions.current_record()
    copy = snapshot.snapshot_package(run_dir)
    if not local and copy.is_dir():
        now |= {"hpcds_code": versions.code_digest(copy), "hpcds_path": meta.get("hpcds_path", str(copy))}
        now["versions"] = {**now["versions"], "hpcds": (meta.get("versions") or {}).get("hpcds")}
    changed = versions.changes(meta, now)
    if changed:
        runs.update_meta(run_dir, **now)
        runs.append_event(run_dir, "environment_recorded", changed=changed)
    return changed


def load_spec_text(text: str):
    from hpcds.spec import validate_spec

    return validate_spec(yaml.safe_load(text), facts.SPEC_FILE)


def describe(record: dict[str, Any]) -> list[str]:
    """Lines for people: each changed field with both values, and where the schedule goes on from."""
    from hpcds.versions import render_changes

    lines = [f"  {c['field']}: {c['old']} -> {c['new']}" for c in record.get("changes", [])]
    if record.get("environment"):
        lines.append(f"  environment recorded anew: {render_changes(record['environment'])}")
    anchor = record.get("lr_anchor")
    if anchor:
        lines.append(f"  learning rate continuous: {anchor['lr']:.6g} at step {anchor['step']}, then the new decay")
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# model.init_from and --after


def find_source_run(runs_root: Path, name: str) -> Path:
    """A run by name or path, or the newest run of the spec named `name` (`<name>-<stamp>`)."""
    try:
        return runs.find_run(runs_root, name)
    except HpcdsError:
        named = [(runs.read_meta(d), d) for d in runs.list_runs(runs_root)]
        named = [(meta.get("created") or 0, d) for meta, d in named if meta.get("spec_name") == name]
        if named:  # the newest by creation time: names sort sweep tasks (`<name>-t<i>-...`) after the others
            return max(named)[1].absolute()
        raise


def pin_init_from(spec, runs_root: Path, after: list[Path] = ()):
    """`spec` with model.init_from pinned to an absolute path (and a selector for a run), after checking that the
    source has the checkpoint it names, or is one of the runs the job waits for (`after`); unchanged without it."""
    from hpcds.spec import deep_merge, load_spec, validate_spec

    value = spec.model.init_from
    if not value:
        return spec
    name, selector = split_source(value)
    if is_export_folder(Path(name)):
        pinned = str(Path(name).absolute())
    else:
        source = find_source_run(runs_root, name)
        selector = selector or "final"
        pinned = f"{source}:{selector}"
        if source not in [Path(a).absolute() for a in after]:
            problem = missing_checkpoint(source, load_spec(source / facts.SPEC_FILE), selector)
            if problem:
                raise HpcdsError(
                    f"model.init_from: {source.name} {problem}\nhint: wait for it, or submit with --after "
                    f"{source.name} (the job then starts once it has finished)"
                )
    return validate_spec(deep_merge(spec.model_dump(mode="json"), {"model": {"init_from": pinned}}), "init_from")


def missing_checkpoint(source: Path, source_spec, selector: str) -> str | None:
    """Why the source run cannot give `selector`'s weights yet (cheap checks; the trainer picks the exact one)."""
    from hpcds.train.weights import committed_candidates

    candidates, _ = committed_candidates(checkpoint_dir(source, source_spec))
    if not candidates:
        return "has no committed checkpoint yet"
    if selector == "final" and not any(c.final for c in candidates):
        return "has not finished (no final checkpoint)"
    if selector == "best" and not source_spec.training.eval_interval_steps:
        return "never evaluates (training.eval_interval_steps is 0), so it has no best checkpoint"
    if selector.isdigit() and int(selector) not in [c.step for c in candidates]:
        return f"has no committed checkpoint at step {selector}"
    return None


def dependency_jobs(after: list[Path]) -> list[str]:
    """The newest job id of each run in `after` that has not finished yet (a finished one holds nothing back).
    A requeued job keeps its id, so the dependency still holds across requeues."""
    job_ids = []
    for run_dir in after:
        ids = [str(j) for j in runs.read_meta(run_dir).get("job_ids") or []]
        if not ids:
            raise HpcdsError(f"--after {run_dir.name}: the run has no Slurm job (a local run, or --dry-run)")
        if not is_finished(run_dir):
            job_ids.append(ids[-1])
    return job_ids
