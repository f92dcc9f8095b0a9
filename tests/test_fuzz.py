"""Hostile strings in every string field of the spec: each one is refused with a SpecError naming the field, or it
ends up inert in everything hpcds writes.

Values come from a seeded generator (newline, CR, NUL, NEL, U+2028, `$(...)`, backticks, quotes, `;`, `&&`, `|`,
`#`, `%`, backslashes, non-ASCII) and go into every string field found by walking the pydantic models, keys of maps
included. An accepted spec is rendered (batch script, DeepSpeed JSON, resolved spec.yaml); the batch script is then
EXECUTED with `srun`, `sbatch`, `scontrol`, `deepspeed` and `hpcds` replaced by recorders on PATH. The payloads try to
run `touch SENTINEL` or a `pwned` command: neither may happen, and the recorded `srun ... hpcds launch` argv must be
exactly the run directory. `slurm.setup` lines are shell code by design (the user's `module load`, `conda activate`):
they are only checked to be refused or copied verbatim, never executed here.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
import signal
import stat
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from hpcds.errors import SpecError
from hpcds.render import render_ds_config, render_sbatch
from hpcds.render.sbatch import container_words
from hpcds.spec import JobSpec, build_tree, validate_spec

SEED = 20261123
VALUES_PER_FIELD = 1000
MIN_EXECUTIONS = 200
# Values are drawn evenly over the payloads, so a field's first accepted values already carry every kind of payload;
# running more of the same field's scripts costs time and finds nothing new.
MAX_EXECUTIONS_PER_FIELD = 120
YAML_CHECKS = 25
JOB_ID = "4242"
NODELIST = "n[1-2]"

BASE: dict[str, Any] = {
    "name": "fuzz",
    # gpt2 so that model.lora (gpt2 and hf only) is a field a value can reach
    "model": {"type": "gpt2", "d_model": 64, "n_layer": 2, "n_head": 4, "vocab_size": 256, "max_seq_len": 64},
    "training": {"precision": "fp32"},
    "deepspeed": {"zero_stage": 2},
    "slurm": {"nodes": 2, "gpus_per_node": 0, "ranks_per_node": 2, "time": "01:00:00", "signal_lead_s": 60},
}

# `{S}` becomes the sentinel file's path. `pwned` is a recorder on PATH: running it in any form is a finding.
PAYLOADS = [
    "$(touch {S})",
    "`touch {S}`",
    "; touch {S}",
    ";touch {S};",
    "&& touch {S}",
    "|| touch {S}",
    "| touch {S}",
    "' ; touch {S} ; '",
    '" ; touch {S} ; "',
    "'$(touch {S})'",
    '"$(touch {S})"',
    "\ntouch {S}",
    "\rtouch {S}",
    "\r\ntouch {S}",
    "\x00touch {S}",
    "$(pwned)",
    "`pwned`",
    ";pwned",
    "&&pwned",
    "|pwned",
    "\npwned",
    "\x85pwned",
    "\u2028pwned",
    "\u2029pwned",
    "\x0bpwned",
    "\x0cpwned",
    "\x1bpwned",
    "${IFS}pwned",
    "$((1+1))",
    "${PATH}",
    "<(pwned)",
    ">(pwned)",
    "\\$(pwned)",
    "\\`pwned\\`",
    "#$(pwned)",
    "%j$(pwned)",
    '"$(pwned)',
    "'`pwned`",
    "\\",
    "'",
    '"',
    "#",
    "%",
    "*",
    "~root",
    "{a,b}",
    "!!",
    " --wrap=pwned",
    "\t--wrap=pwned",
    "é",
    "日本語",
    "Ω≈ç√",
    "\u202e",
    "\ufeff",
    "\U0001f600",
    "\u00a0pwned",
]
PREFIXES = ["", "a", "gpu", "x-1", "--comment=", "1", "00:10:00", "64G", "a100&", "/tmp/x", "NAME_", "auto", "cpu"]
SUFFIXES = ["", "b", " ", "x'y", '"', "\\", "$", ";", "\n", "é"]


def hostile_values(count: int, sentinel: Path, rng: random.Random) -> list[str]:
    values = []
    for i in range(count):
        pieces = [PAYLOADS[i % len(PAYLOADS)]]  # every payload, evenly
        pieces += rng.sample(PAYLOADS, rng.randint(0, 2))
        rng.shuffle(pieces)
        value = rng.choice(PREFIXES) + "".join(pieces) + rng.choice(SUFFIXES)
        values.append(value.replace("{S}", str(sentinel)))
    return values


# ---------------------------------------------------------------------------------------------------------------------
# Where strings live in the spec: found by walking the models, so a new field is fuzzed without touching this test.


def _strip(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _options(annotation: Any) -> list[Any]:
    annotation = _strip(annotation)
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [_strip(a) for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _is_text(annotation: Any) -> bool:
    if annotation is str or annotation is Any:
        return True
    if typing.get_origin(annotation) is typing.Literal:
        return any(isinstance(v, str) for v in typing.get_args(annotation))
    return False


def string_fields(model: type[BaseModel] = JobSpec, prefix: tuple = ()) -> list[tuple[tuple, str]]:
    """(path, how) for every place a string goes: how is 'value', 'list', 'key' or 'map'."""
    found = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        for option in _options(field.annotation):
            origin = typing.get_origin(option)
            args = [_strip(a) for a in typing.get_args(option)]
            if isinstance(option, type) and issubclass(option, BaseModel):
                found += string_fields(option, path)
            elif _is_text(option):
                found.append((path, "value"))
            elif origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
                found += string_fields(args[0], (*path, 0))
            elif origin is list and args and _is_text(args[0]):
                found.append((path, "list"))
            elif origin is dict:
                if _is_text(args[0]):
                    found.append((path, "key"))
                if _is_text(args[1]):
                    found.append((path, "map"))
    return sorted(set(found), key=str)


FIELDS = string_fields()


def dotted(path: tuple) -> str:
    text = ""
    for key in path:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else key)
    return text


# A container needs its kind (and what the kind needs) before any other of its fields can be judged.
CONTAINER_BASE = {
    "kind": {},
    "wrapper": {"kind": "wrapper"},
    "hpcds": {"kind": "wrapper", "wrapper": ["podman-hpc", "run", "img"]},
    "image": {"kind": "pyxis"},
}


def tree_with(path: tuple, how: str, value: str) -> dict:
    tree = copy.deepcopy(BASE)
    if path[:2] == ("slurm", "container"):
        tree["slurm"]["container"] = copy.deepcopy(CONTAINER_BASE.get(path[2], {"kind": "pyxis", "image": "img"}))
    leaf: Any = {"list": [value], "key": {value: "1"}, "map": {"HPCDS_FUZZ": value}}.get(how, value)
    node: Any = tree
    for key, nxt in itertools.pairwise(path):
        if isinstance(key, int):  # a list of models: the value goes into the first item
            while len(node) <= key:
                node.append({})
            node = node[key]
            continue
        node = node.setdefault(key, [] if isinstance(nxt, int) else {})
    node[path[-1]] = leaf
    if path[:2] == ("data", "train") or path[:2] == ("data", "val"):
        node.setdefault("path", "builtin:stdlib-docs")
    return tree


# ---------------------------------------------------------------------------------------------------------------------
# Executing a rendered script with recorders in place of the real commands

RECORDER = """#!/bin/bash
# Records its name, argv and the fuzzed variable, then exits like the real command would.
dir="$HPCDS_RECORD_DIR/$(date +%s%N)-$$-${0##*/}"
mkdir -p "$dir"
printf '%s\\0' "${0##*/}" "$@" >"$dir/argv"
printf '%s' "${HPCDS_FUZZ-<unset>}" >"$dir/fuzz"
case ${0##*/} in
  pwned) touch "$HPCDS_SENTINEL" ;;
  srun)
    # As the trainer would: an event line (e.g. `stopped`) in the run's log, whose folder is the last argument.
    [ -n "${HPCDS_FAKE_EVENT:-}" ] && printf '%s\n' "$HPCDS_FAKE_EVENT" >>"${!#}/events.jsonl"
    exit "${HPCDS_FAKE_RC:-0}" ;;
  scontrol) exit "${HPCDS_SCONTROL_RC:-0}" ;;
esac
exit 0
"""
COMMANDS = ("srun", "sbatch", "scontrol", "deepspeed", "hpcds", "pwned")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    paths = {name: root / name for name in ("bin", "records", "run", "work", "home")}
    for path in paths.values():
        path.mkdir()
    for command in COMMANDS:
        recorder = paths["bin"] / command
        recorder.write_text(RECORDER)
        recorder.chmod(recorder.stat().st_mode | stat.S_IXUSR)
    paths["sentinel"] = root / "SENTINEL"
    return paths


def execute(
    script: str,
    sandbox: dict[str, Path],
    fake_rc: int,
    extra_env: dict[str, str] | None = None,
    earlier_events: str = "",
) -> tuple[int, list[list[str]], list[dict], str]:
    for old in sandbox["records"].iterdir():
        for file in old.iterdir():
            file.unlink()
        old.rmdir()
    (sandbox["run"] / "events.jsonl").write_text(earlier_events)
    job = sandbox["run"] / "job.sbatch"
    job.write_text(script)
    env = {
        "PATH": f"{sandbox['bin']}:/usr/bin:/bin",
        "HOME": str(sandbox["home"]),
        "LANG": "C.UTF-8",
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_JOB_NODELIST": NODELIST,
        "HPCDS_RECORD_DIR": str(sandbox["records"]),
        "HPCDS_SENTINEL": str(sandbox["sentinel"]),
        "HPCDS_FAKE_RC": str(fake_rc),
        **(extra_env or {}),
    }
    result = subprocess.run(["bash", str(job)], cwd=sandbox["work"], env=env, capture_output=True, timeout=30)
    records = []
    fuzz_seen = ""
    for folder in sorted(sandbox["records"].iterdir()):
        records.append((folder / "argv").read_bytes().decode().split("\0")[:-1])
        if records[-1][0] == "srun":
            fuzz_seen = (folder / "fuzz").read_bytes().decode()
    events = [json.loads(line) for line in (sandbox["run"] / "events.jsonl").read_text().splitlines()]
    return result.returncode, records, events, fuzz_seen


def step_words(spec, run_dir: str) -> list[str]:
    """The words srun must get between its own options and `launch RUN_DIR`, as the renderer meant them: the spec's
    srun options, the container's words and the hpcds it runs, each one word, nothing expanded."""
    container = spec.slurm.container
    inside = list(container.hpcds) if container and container.hpcds else ["hpcds"]
    return [*spec.slurm.srun_args, *container_words(spec, run_dir), *inside]


def check_inert_run(
    script: str,
    sandbox: dict[str, Path],
    fake_rc: int,
    env_value: str | None = None,
    words: list[str] = ("hpcds",),
    contained: bool = False,
) -> None:
    rc, records, events, fuzz_seen = execute(script, sandbox, fake_rc)
    run_dir = str(sandbox["run"])
    assert not sandbox["sentinel"].exists(), "an injected command ran (sentinel file created)"
    assert rc == fake_rc
    # With a container, the host names are asked for outside, for `hpcds launch` inside.
    expected = [["scontrol", "show", "hostnames", NODELIST]] if contained else []
    expected.append(["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *words, "launch", run_dir])
    if fake_rc == 75:
        expected.append(["scontrol", "requeue", JOB_ID])
    assert records == expected
    assert [e["event"] for e in events] == ["started", "exited"] + (["requeue"] if fake_rc == 75 else [])
    assert events[0]["nodes"] == NODELIST and events[0]["job_id"] == JOB_ID and events[0]["restart"] == 0
    assert events[1]["rc"] == fake_rc
    if env_value is not None:
        assert fuzz_seen == env_value, "an exported value reached the job changed"


# ---------------------------------------------------------------------------------------------------------------------


def test_the_walk_finds_the_string_fields():
    names = {dotted(path) for path, _ in FIELDS}
    for expected in ("name", "slurm.partition", "slurm.setup", "slurm.extra_sbatch", "data.train[0].path"):
        assert expected in names
    assert (("slurm", "env"), "key") in FIELDS and (("slurm", "env"), "map") in FIELDS
    assert len(FIELDS) >= 25


def test_hostile_values_in_every_string_field_are_refused_or_inert(sandbox):
    rng = random.Random(SEED)
    values = hostile_values(VALUES_PER_FIELD, sandbox["sentinel"], rng)
    assert len(set(values)) > 0.9 * len(values)
    run_dir = str(sandbox["run"])
    base_script = render_sbatch(validate_spec(build_tree(copy.deepcopy(BASE))), run_dir)
    tally = {"refused": 0, "accepted": 0, "executed": 0, "reached_script": 0}
    to_execute: list[tuple[str, str | None, list[str], bool]] = []
    sampled: list[tuple[str, str | None, list[str], bool]] = []
    for path, how in FIELDS:
        field = dotted(path)
        accepted_here = executed_here = 0
        for value in values:
            tree = tree_with(path, how, value)
            try:
                spec = validate_spec(build_tree(tree))
                script = render_sbatch(spec, run_dir)
                ds_config = render_ds_config(spec)
            except SpecError as exc:
                named = [p.path for p in exc.problems]
                assert any(p == field or p.startswith((field + ".", field + "[")) for p in named), (
                    f"{field}={value!r} was refused, but the error names {named}"
                )
                tally["refused"] += 1
                continue
            tally["accepted"] += 1
            accepted_here += 1
            # Every file the value can reach holds it as data: the JSON and the resolved spec.yaml read back the
            # same (YAML is slow in pure Python: the first YAML_CHECKS values per field).
            assert json.loads(json.dumps(ds_config)) == ds_config
            if accepted_here <= YAML_CHECKS:
                assert validate_spec(yaml.safe_load(spec.to_yaml())) == spec
            if field == "slurm.setup":  # shell code by design: copied verbatim, one line, never executed here
                assert f"\n{value}\n" in script
                continue
            env_value = value if (path, how) == (("slurm", "env"), "map") else None
            run = (script, env_value, step_words(spec, run_dir), spec.slurm.container is not None)
            if script != base_script:
                tally["reached_script"] += 1
                if executed_here < MAX_EXECUTIONS_PER_FIELD:
                    executed_here += 1
                    to_execute.append(run)
            elif len(sampled) < MIN_EXECUTIONS:
                sampled.append(run)
    # Execute every script a value changed, plus unchanged ones up to MIN_EXECUTIONS in all.
    to_execute += sampled[: max(0, MIN_EXECUTIONS - len(to_execute))]
    for i, (script, env_value, words, contained) in enumerate(to_execute):
        check_inert_run(script, sandbox, 75 if i % 2 else 0, env_value=env_value, words=words, contained=contained)
        tally["executed"] += 1
    print(f"\nfuzz: {len(values)} values x {len(FIELDS)} fields: {tally}")
    assert tally["executed"] >= MIN_EXECUTIONS
    assert tally["refused"] > 0 and tally["accepted"] > 0


def test_script_requeues_only_on_75_and_below_the_limit(sandbox):
    spec = validate_spec(build_tree(copy.deepcopy(BASE)))
    run_dir = str(sandbox["run"])
    script = render_sbatch(spec, run_dir)
    launch = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "hpcds", "launch", run_dir]

    rc, records, events, _ = execute(script, sandbox, fake_rc=1)
    assert (rc, records, [e["event"] for e in events]) == (1, [launch], ["started", "exited", "not_requeued"])
    # A failure without a new checkpoint in this allocation is not requeued (a start-up bug must not loop).
    assert (events[1]["rc"], events[1]["class"], events[2]["reason"]) == (1, "failed", "no_new_checkpoint")

    limit = str(spec.slurm.max_requeues)
    rc, records, events, _ = execute(script, sandbox, fake_rc=75, extra_env={"SLURM_RESTART_COUNT": limit})
    assert (rc, records) == (75, [launch])
    assert [e["event"] for e in events] == ["started", "exited", "requeue_limit"]
    assert {e["restart"] for e in events} == {int(limit)}

    # A controller that never answers: five tries, then the run ends with the reason in its log.
    no_wait = {"HPCDS_SCONTROL_RC": "1", "HPCDS_REQUEUE_RETRY_S": "0"}
    rc, records, events, _ = execute(script, sandbox, fake_rc=75, extra_env=no_wait)
    assert (rc, records[1:]) == (75, [["scontrol", "requeue", JOB_ID]] * 5)
    assert [e["event"] for e in events] == ["started", "exited", "requeue"] + ["requeue_retry"] * 5 + ["requeue_failed"]
    assert [e["attempt"] for e in events[3:8]] == [1, 2, 3, 4, 5]
    assert (events[-1]["rc"], events[-1]["attempts"]) == (1, 5)


def test_a_node_killed_after_the_trainer_stopped_still_requeues(sandbox):
    # On two nodes, the first to exit 75 makes srun (--kill-on-bad-exit) kill the other, and srun reports 137. The
    # trainer's `stopped` event (written after the commit, before any rank exits) says the save is done: requeue.
    spec = validate_spec(build_tree(copy.deepcopy(BASE)))
    script = render_sbatch(spec, str(sandbox["run"]))
    stopped = json.dumps({"time": 1, "event": "stopped", "signal": "SIGUSR2", "step": 3})
    rc, records, events, _ = execute(script, sandbox, fake_rc=137, extra_env={"HPCDS_FAKE_EVENT": stopped})
    assert (rc, records[-1]) == (137, ["scontrol", "requeue", JOB_ID])
    assert [e["event"] for e in events] == ["started", "stopped", "exited", "requeue"]
    assert (events[2]["rc"], events[2]["class"]) == (137, "requeued")

    # Killed by the warning signal itself (128 + USR2, before `hpcds launch` blocked it): requeued as well.
    rc, records, events, _ = execute(script, sandbox, fake_rc=128 + int(signal.SIGUSR2))
    assert (events[1]["class"], records[-1]) == ("requeued", ["scontrol", "requeue", JOB_ID])

    # The same exit code without the trainer's word in this allocation is a failure, even after an earlier stop.
    rc, records, events, _ = execute(script, sandbox, fake_rc=137, earlier_events=stopped + "\n")
    assert [e["event"] for e in events] == ["stopped", "started", "exited", "not_requeued"]
    assert events[2]["class"] == "failed"


def test_the_recorders_catch_an_injection(sandbox):
    # The control: the same harness fails on a script that does run a payload.
    script = render_sbatch(validate_spec(build_tree(copy.deepcopy(BASE))), str(sandbox["run"]))
    injected = script.replace("hpcds_event started", "export HPCDS_FUZZ=$(pwned)\nhpcds_event started", 1)
    try:
        with pytest.raises(AssertionError, match="injected command ran"):
            check_inert_run(injected, sandbox, fake_rc=0)
    finally:
        sandbox["sentinel"].unlink(missing_ok=True)


def test_generic_template_prepares_once_per_job_and_runs_the_run_script(sandbox, tmp_path):
    # sbatch/deepspeed.sbatch as Slurm would run it (twice: the second time is the requeued job, same id), with the
    # real `hpcds prepare` and srun/scontrol recorded.
    import sys

    root = Path(__file__).resolve().parents[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("srun", "scontrol", "sbatch", "deepspeed"):
        (bin_dir / command).symlink_to(sandbox["bin"] / command)
    (bin_dir / "hpcds").write_text(f'#!/bin/bash\nexec {sys.executable} -m hpcds "$@"\n')
    (bin_dir / "hpcds").chmod(0o755)
    runs = tmp_path / "runs"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(sandbox["home"]),
        "LANG": "C.UTF-8",
        "SLURM_JOB_ID": "777",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": NODELIST,
        "HPCDS_RUNS_DIR": str(runs),
        "HPCDS_RECORD_DIR": str(sandbox["records"]),
        "HPCDS_SENTINEL": str(sandbox["sentinel"]),
    }
    argv = ["bash", str(root / "sbatch/deepspeed.sbatch"), str(root / "configs/quickstart.yaml")]

    def submit(fake_rc: int, **extra: str) -> tuple[Path, list[list[str]]]:
        for old in sandbox["records"].iterdir():
            for file in old.iterdir():
                file.unlink()
            old.rmdir()
        result = subprocess.run(
            argv, cwd=tmp_path, env={**env, "HPCDS_FAKE_RC": str(fake_rc), **extra}, capture_output=True, timeout=120
        )
        assert result.returncode == fake_rc, result.stderr.decode()[-2000:]
        line = [ln for ln in result.stdout.decode().splitlines() if ln.startswith("run directory: ")]
        records = [
            (folder / "argv").read_bytes().decode().split("\0")[:-1] for folder in sorted(sandbox["records"].iterdir())
        ]
        return Path(line[0].removeprefix("run directory: ")), records

    run_dir, records = submit(75)
    assert run_dir.parent == runs.absolute()
    assert records[0][:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert records[0][-2:] == ["launch", str(run_dir)] and Path(records[0][-3]).is_absolute()
    assert records[1] == ["scontrol", "requeue", "777"]
    assert yaml.safe_load((run_dir / "spec.yaml").read_text())["slurm"]["nodes"] == 2  # the allocation wins

    again, records = submit(0, SLURM_RESTART_COUNT="1")
    assert again == run_dir and [r[0] for r in records] == ["srun"]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["created", "started", "exited", "requeue", "started", "exited"]
    assert [e.get("restart") for e in events if e["event"] == "started"] == [0, 1]

    other, _ = submit(0, SLURM_JOB_ID="778")
    assert other != run_dir and other.parent == run_dir.parent

    # A spec with a container and srun options, in an allocation that asked for --gres=gpu:2: the template carries
    # them onto the srun line as the renderer writes them for `hpcds submit`.
    spec = tmp_path / "contained.yaml"
    contained = "{kind: wrapper, wrapper: [podman-hpc, run, img]}"
    spec.write_text(f"name: contained\npreset: quickstart\nslurm: {{container: {contained}, srun_args: [--label]}}\n")
    argv[-1] = str(spec)
    gres_run, records = submit(0, SLURM_JOB_ID="779", SLURM_GPUS_ON_NODE="2")
    assert yaml.safe_load((gres_run / "spec.yaml").read_text())["slurm"]["gpus_per_node"] == 2
    words = ["--label", "bash", "-c", 'trap "" USR2 TERM INT; exec "$@"', "hpcds-container", "podman-hpc", "run", "img"]
    assert records[0] == ["scontrol", "show", "hostnames", NODELIST]  # asked outside, for `hpcds launch` inside
    assert records[1][3:-3] == words and records[1][-2:] == ["launch", str(gres_run)], records
    assert not sandbox["sentinel"].exists()


def test_setup_lines_cannot_switch_off_the_ending_logic(sandbox):
    # `set -e` and an ERR trap that exits, as people write them in cluster recipes: the script must still record the
    # exit and requeue on 75. Without the reset after the setup lines, it ended at the failing srun.
    tree = copy.deepcopy(BASE)
    tree["slurm"] = {**tree.get("slurm", {}), "setup": ["set -e", "set -o errexit", "trap 'exit 3' ERR"]}
    script = render_sbatch(validate_spec(build_tree(tree)), str(sandbox["run"]))
    rc, _, events, _ = execute(script, sandbox, fake_rc=1)
    assert [e["event"] for e in events] == ["started", "exited", "not_requeued"] and events[1]["class"] == "failed"
    rc, records, events, _ = execute(script, sandbox, fake_rc=75)
    assert (rc, records[-1]) == (75, ["scontrol", "requeue", JOB_ID])
    assert [e["event"] for e in events] == ["started", "exited", "requeue"]


def test_an_exit_in_a_setup_line_is_recorded_as_the_allocations_ending(sandbox):
    tree = copy.deepcopy(BASE)
    tree["slurm"] = {**tree.get("slurm", {}), "setup": ["module load cuda/12.4 || exit 3"]}  # no `module` here
    script = render_sbatch(validate_spec(build_tree(tree)), str(sandbox["run"]))
    rc, records, events, _ = execute(script, sandbox, fake_rc=0)
    assert (rc, records) == (3, [])  # never launched
    assert [(e["event"], e["rc"], e["class"], e["reason"]) for e in events] == [("exited", 3, "failed", "setup")]


@pytest.mark.parametrize(
    "line, refused",
    [
        ("exec bash", "`exec COMMAND` replaces the batch shell"),
        ("module load x && exec python train.py", "`exec COMMAND` replaces the batch shell"),
        ("exec > >(tee -a setup.log) 2>&1", None),  # only redirects this shell's output
        ("exec 2>&1", None),
        ("export WANDB_API_KEY=0123456789abcdef", "writes the value of WANDB_API_KEY"),
        ("export A=1 WANDB_API_KEY=abc", "writes the value of WANDB_API_KEY"),
        ("module load cuda && AWS_SECRET_ACCESS_KEY='abc' run", "writes the value of AWS_SECRET_ACCESS_KEY"),
        ("export HF_TOKEN=$(cat ~/.secrets/hf)", None),  # read at run time from a file: fine
        ('export HF_TOKEN="$HF_TOKEN_FILE"', None),
        ("export HF_TOKEN_PATH=/home/u/.hf/token", None),  # where a secret is, not the secret
        ("export TOKENIZERS_PARALLELISM=false", None),  # not a secret name
    ],
)
def test_setup_lines_that_replace_the_shell_or_write_a_secret_are_refused(line, refused):
    tree = copy.deepcopy(BASE)
    tree["slurm"] = {**tree.get("slurm", {}), "setup": [line]}
    spec = validate_spec(build_tree(tree))
    if refused is None:
        render_sbatch(spec, "/runs/x")
        return
    with pytest.raises(SpecError) as excinfo:
        render_sbatch(spec, "/runs/x")
    assert [(p.path, refused in p.message) for p in excinfo.value.problems] == [("slurm.setup[0]", True)]
