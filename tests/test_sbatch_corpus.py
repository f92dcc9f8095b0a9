"""Public multi-node training sbatch scripts, and where each of their Slurm flags goes in an hpcds spec.

The scripts in tests/fixtures/sbatch_corpus/ are copied from their repositories (SOURCES.md names each, with commit and
licence). This module reads their `#SBATCH` lines the way sbatch does (up to the first command) and the options of
their `srun` lines, and checks every flag against MAPPING: a spec field (hpcds writes the flag from it and refuses it
in slurm.extra_sbatch), slurm.extra_sbatch (written as is), slurm.srun_args (on the step's srun line), owned (hpcds
writes it itself and refuses it, with a hint saying what to set instead), or not expressible (with the reason). A flag
the table does not know fails the test, so the table grows with the corpus. KNOWN_GAPS are flags hpcds should refuse
and does not yet: their checks are strict xfails, which turn red the day hpcds refuses them, so the entry goes then.
No Slurm needed.
"""

from __future__ import annotations

import json
import re
import shlex
from functools import partial
from pathlib import Path

import pytest

from hpcds.errors import SpecError
from hpcds.render import render_sbatch
from hpcds.spec import load_spec

CORPUS = Path(__file__).resolve().parent / "fixtures" / "sbatch_corpus"
SCRIPTS = sorted(CORPUS.glob("*.sbatch"))

FIELD = "field"  # a spec field: the detail is its dotted path
EXTRA = "extra_sbatch"  # slurm.extra_sbatch, written as `#SBATCH <flag>`
SRUN = "srun_args"  # slurm.srun_args, on the step's srun line
OWNED = "owned"  # hpcds writes it and refuses it: the detail is a word its hint must hold
NOT_EXPRESSIBLE = "not expressible"  # the detail says why

_ONE_TASK = "one task per node"
MAPPING: dict[tuple[str, str], tuple[str, str]] = {
    # (sbatch | srun, flag name) -> (where, detail)
    ("sbatch", "nodes"): (FIELD, "slurm.nodes"),
    ("sbatch", "time"): (FIELD, "slurm.time"),
    ("sbatch", "partition"): (FIELD, "slurm.partition"),
    ("sbatch", "account"): (FIELD, "slurm.account"),
    ("sbatch", "qos"): (FIELD, "slurm.qos"),
    ("sbatch", "constraint"): (FIELD, "slurm.constraint"),
    ("sbatch", "cpus-per-task"): (FIELD, "slurm.cpus_per_task"),
    ("sbatch", "mem"): (FIELD, "slurm.mem"),
    ("sbatch", "gpus-per-node"): (FIELD, "slurm.gpus_per_node"),
    ("sbatch", "gres"): (FIELD, "slurm.gpus_per_node"),  # gpu:N, with slurm.gpu_request: gres
    ("sbatch", "job-name"): (OWNED, "set name"),
    ("sbatch", "output"): (OWNED, "slurm-%j.out"),
    ("sbatch", "error"): (OWNED, "slurm-%j.out"),
    ("sbatch", "requeue"): (OWNED, "max_requeues"),
    ("sbatch", "ntasks-per-node"): (OWNED, _ONE_TASK),
    ("sbatch", "gpus-per-task"): (OWNED, _ONE_TASK),
    ("sbatch", "tasks-per-node"): (OWNED, _ONE_TASK),  # sbatch's other name for --ntasks-per-node
    ("sbatch", "exclusive"): (EXTRA, "whole nodes"),
    ("sbatch", "reservation"): (EXTRA, "a reservation's nodes"),
    ("sbatch", "hint"): (EXTRA, "nomultithread: physical cores"),
    ("sbatch", "wait-all-nodes"): (EXTRA, "start when every node has booted"),
    ("sbatch", "time-min"): (EXTRA, "backfill may shorten the limit; --signal is relative to the real end"),
    ("sbatch", "mem-per-cpu"): (EXTRA, "memory by CPU instead of slurm.mem (sbatch refuses both together)"),
    ("srun", "wait"): (SRUN, "seconds to wait for the other tasks after the first ends"),
    ("srun", "label"): (SRUN, "task number before each output line"),
    ("srun", "unbuffered"): (SRUN, "output line by line"),
    ("srun", "distribution"): (SRUN, "task placement"),
    ("srun", "kill-on-bad-exit"): (OWNED, "always 1"),
    ("srun", "cpus-per-task"): (OWNED, "slurm.cpus_per_task"),
    ("srun", "nodes"): (OWNED, "whole allocation"),
    ("srun", "ntasks"): (OWNED, _ONE_TASK),
    ("srun", "nodelist"): (OWNED, "whole allocation"),  # a step on some nodes only
    ("srun", "jobid"): (
        NOT_EXPRESSIBLE,
        "not needed: the batch script's srun already runs in its own job; srun_args are written shell-quoted, so "
        "--jobid=$SLURM_JOB_ID would reach srun unexpanded",
    ),
    ("srun", "container-image"): (OWNED, "slurm.container"),  # pyxis: the container section binds the run's folders
    ("srun", "container-mounts"): (OWNED, "slurm.container"),
}
INT_FIELDS = {"slurm.nodes", "slurm.cpus_per_task", "slurm.gpus_per_node"}

# Flags hpcds should refuse and accepts today: each is written after hpcds's own flag, and sbatch/srun take the last.
KNOWN_GAPS: dict[tuple[str, str], str] = {}

# Values written as placeholders for the reader to fill in, which the spec rightly refuses.
PLACEHOLDERS = {("cotainr_lumi_multigpu_torchrun", "account"): "project_<your_project_id>"}

SHORT = {
    "-N": "--nodes",
    "-t": "--time",
    "-p": "--partition",
    "-A": "--account",
    "-q": "--qos",
    "-C": "--constraint",
    "-c": "--cpus-per-task",
    "-J": "--job-name",
    "-o": "--output",
    "-e": "--error",
    "-l": "--label",
    "-u": "--unbuffered",
}
# srun options in the corpus written as `--name VALUE`; the #SBATCH lines use it too (`--time 100:00:00`).
SRUN_VALUE_OPTIONS = {"jobid", "container-image", "container-mounts", "nodelist", "nodes", "ntasks", "cpus-per-task"}


# ---------------------------------------------------------------------------------------------------------------------
# Reading the scripts


def _normalize(words: list[str], takes_value, expand=lambda word: None) -> list[str]:
    """`--name=value` flags from the leading options among words, up to the command.

    expand(word) gives the words a `$VAR` in option position stands for (None: not a variable); a value is never
    expanded (`--jobid $SLURM_JOB_ID` stays as written).
    """
    words, flags = list(words), []
    while words:
        word = words.pop(0)
        expanded = expand(word)
        if expanded is not None:
            words[:0] = expanded
            continue
        if not word.startswith("-"):
            break
        if not word.startswith("--"):
            short, glued = word[:2], word[2:]
            word = SHORT.get(short, short) + (f"={glued}" if glued else "")
        if "=" not in word and takes_value(word[2:]) and words and not words[0].startswith("-"):
            word = f"{word}={words.pop(0)}"
        flags.append(word)
    return flags


def read_sbatch_flags(text: str) -> list[str]:
    """The #SBATCH flags as sbatch reads them: only before the first command, `#` starts a comment."""
    flags = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if re.match(r"#SBATCH\s", stripped):
            tokens = shlex.split(stripped[len("#SBATCH") :], comments=True)
            found = _normalize(tokens, lambda name: True)
            assert all(any(token in flag for flag in found) for token in tokens), f"not all options: {line!r}"
            flags += found
    return flags


def _variables(text: str) -> dict[str, list[str]]:
    """NAME="..." strings and `declare -a NAME=(...)` arrays, as the words they expand to."""
    found = {}
    for name, body in re.findall(r'^\s*(?:export\s+)?([A-Z_]+)="([^"]*)"', text, re.M):
        found[name] = shlex.split(body)
    for name, body in re.findall(r"^\s*declare -a ([A-Z_]+)=\((.*?)\)", text, re.M | re.S):
        found[name] = shlex.split(body)
    return found


def _expand(variables: dict[str, list[str]], word: str) -> list[str] | None:
    var = re.fullmatch(r"\$\{?([A-Z_]+)(?:\[@\])?\}?", word)
    return variables.get(var.group(1), []) if var else None  # unset: nothing, as bash expands it


def read_srun_flags(text: str) -> list[str]:
    """The options of every srun command (not commented out), with $VAR and "${ARR[@]}" expanded from the script."""
    text = text.replace("\\\n", " ")
    variables = _variables(text)
    flags = []
    for line in text.splitlines():
        match = re.match(r"(?:[^#]*[;&|]\s*)?srun\s+(.*)", line.strip())
        if not match or line.strip().startswith("#"):
            continue
        words = shlex.split(match.group(1), comments=True)
        flags += _normalize(words, lambda name: name in SRUN_VALUE_OPTIONS, partial(_expand, variables))
    return flags


def corpus_flags() -> list[tuple[str, str, str]]:
    """(script, sbatch | srun, flag) for every flag of every script in the corpus."""
    found = []
    for script in SCRIPTS:
        text = script.read_text()
        found += [(script.stem, "sbatch", flag) for flag in read_sbatch_flags(text)]
        found += [(script.stem, "srun", flag) for flag in read_srun_flags(text)]
    return found


def name_of(flag: str) -> str:
    return flag[2:].split("=", 1)[0]


def unmapped(flags: list[tuple[str, str, str]]) -> list[str]:
    return [f"{script}: {step} {flag}" for script, step, flag in flags if (step, name_of(flag)) not in MAPPING]


# ---------------------------------------------------------------------------------------------------------------------
# The table is complete, and the reader reads what sbatch and srun read


def test_the_corpus_is_there():
    assert len(SCRIPTS) >= 6
    assert {p.name for p in CORPUS.iterdir()} == {"SOURCES.md", *(p.name for p in SCRIPTS)}
    sources = (CORPUS / "SOURCES.md").read_text()
    for script in SCRIPTS:
        assert f"| {script.name} |" in sources, f"{script.name} has no row in SOURCES.md"


def test_every_flag_in_the_corpus_has_a_place_in_the_mapping():
    flags = corpus_flags()
    assert len(flags) > 50
    assert unmapped(flags) == [], "add these flags to MAPPING in tests/test_sbatch_corpus.py"


def test_a_flag_the_mapping_does_not_know_fails():
    text = "#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --frobnicate=3\nsrun --cpu-freq=high --wait=60 train.sh\n"
    flags = [("x", "sbatch", f) for f in read_sbatch_flags(text)] + [("x", "srun", f) for f in read_srun_flags(text)]
    assert unmapped(flags) == ["x: sbatch --frobnicate=3", "x: srun --cpu-freq=high"]


def test_the_reader_reads_what_sbatch_and_srun_read():
    def read(stem):
        text = (CORPUS / f"{stem}.sbatch").read_text()
        return read_sbatch_flags(text), read_srun_flags(text)

    sbatch, srun = read("nanotron_train_2")
    assert "--qos=high" in sbatch and not [f for f in sbatch if "exclude" in f or "array" in f]  # `#SBATCz` lines
    assert srun == ["--unbuffered"]  # $SRUN_ARGS is never set there
    sbatch, srun = read("bigscience_tr11_176b")
    assert "--time=100:00:00" in sbatch and sbatch.count("--job-name=tr11-176B-ml") == 1
    assert srun == ["--wait=60", "--kill-on-bad-exit=1", "--jobid=$SLURM_JOB_ID"]
    assert read("aws_gptneox_train")[1] == [
        "--label",
        "--container-image=$IMAGE",
        "--container-mounts=$CONTAINER_MOUNT",
    ]
    olmo = read("olmo_lumi_peteish7")[1]
    assert olmo == ["--cpus-per-task=$SLURM_CPUS_PER_TASK", "--distribution=block:block", "--kill-on-bad-exit"]
    assert read("aws_megatron_deepspeed_finetune_llama")[1].count("--label") == 2  # not the commented-out srun
    assert read("cotainr_lumi_multigpu_torchrun")[1] == []


def test_not_expressible_flags_say_why():
    for key, (where, why) in MAPPING.items():
        if where == NOT_EXPRESSIBLE:
            assert why.startswith(("not yet", "not needed")) and len(why) > 40, key


# ---------------------------------------------------------------------------------------------------------------------
# Each flag lands where the table says


def _refusals(field: str, flag: str) -> list:
    with pytest.raises(SpecError) as info:
        load_spec(None, [f"slurm.{field}={json.dumps([flag])}"], preset="quickstart")
    return info.value.problems


def _field_sets(path: str, flag: str) -> tuple[list[str], str]:
    """--set assignments that say what the flag says, and the #SBATCH line hpcds writes from them."""
    value = flag.split("=", 1)[1]
    if name_of(flag) == "gres":
        count = re.fullmatch(r"gpu:(\d+)", value)
        assert count, f"{flag}: only gpu:N is expressible (slurm.gpu_request: gres writes --gres=gpu:N)"
        return [f"{path}={count.group(1)}", "slurm.gpu_request=gres"], f"#SBATCH {flag}"
    typed = int(value) if path in INT_FIELDS else value
    return [f"{path}={json.dumps(typed)}"], f"#SBATCH {flag}"


def _cases():
    seen = set()
    for script, step, flag in corpus_flags():
        where = MAPPING.get((step, name_of(flag)), (None,))[0]
        if where in (None, NOT_EXPRESSIBLE) or (step, flag) in seen:
            continue
        seen.add((step, flag))
        gap = KNOWN_GAPS.get((step, name_of(flag)))
        marks = [pytest.mark.xfail(strict=True, raises=pytest.fail.Exception, reason=gap)] if gap else []
        yield pytest.param(script, step, flag, id=f"{script}:{step}:{flag}", marks=marks)


@pytest.mark.parametrize(("script", "step", "flag"), list(_cases()))
def test_corpus_flag_lands_where_the_mapping_says(script, step, flag):
    where, detail = MAPPING[(step, name_of(flag))]
    field = "extra_sbatch" if step == "sbatch" else "srun_args"
    if where in (FIELD, OWNED):
        # Refused where a user would paste it, with a hint naming what to set instead.
        problems = _refusals(field, flag)
        assert [(p.path, p.message) for p in problems] == [(f"slurm.{field}[0]", f"{flag} is set by hpcds itself")]
        assert detail in problems[0].hint
    if where == FIELD:
        sets, line = _field_sets(detail, flag)
        placeholder = PLACEHOLDERS.get((script, name_of(flag)))
        if placeholder:
            with pytest.raises(SpecError) as info:
                load_spec(None, sets, preset="quickstart")
            assert [p.path for p in info.value.problems] == [detail] and placeholder in flag
            return
        spec = load_spec(None, sets, preset="quickstart")
        lines = render_sbatch(spec, "/r/x").splitlines()
        assert line in lines, f"{detail} from {flag} did not render {line!r}"
    elif where == EXTRA:
        spec = load_spec(None, [f"slurm.extra_sbatch={json.dumps([flag])}"], preset="quickstart")
        assert f"#SBATCH {flag}" in render_sbatch(spec, "/r/x").splitlines()
    elif where == SRUN:
        spec = load_spec(None, [f"slurm.srun_args={json.dumps([flag])}"], preset="quickstart")
        (srun,) = [line for line in render_sbatch(spec, "/r/x").splitlines() if line.startswith("srun ")]
        words = shlex.split(srun)
        assert flag in words and words.index(flag) < words.index("launch"), srun


def test_memory_per_cpu_beside_slurm_mem_is_refused():
    # nanotron_train_2 asks for memory per CPU; a spec that also sets slurm.mem renders `--mem` and `--mem-per-cpu`,
    # which sbatch refuses as mutually exclusive: at submit time, not when the spec is checked.
    with pytest.raises(SpecError) as info:
        load_spec(None, ['slurm.mem="256G"', 'slurm.extra_sbatch=["--mem-per-cpu=11G"]'], preset="quickstart")
    assert [p.path for p in info.value.problems] == ["slurm.extra_sbatch[0]"]
