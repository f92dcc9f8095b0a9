"""Where a spec's values come from: layering (field defaults < preset < YAML < `--set a.b=value` < CLI flags), the
user's own DeepSpeed config read into it (hpcds.spec.ds_config), and validation that reports every problem at once
with its dotted path and a hint. No I/O here except `load_spec`, which reads the YAML file it is given and the
DeepSpeed config file that names, and looks whether a relative `model.path` is a folder beside the spec.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hpcds.errors import Problem, SpecError
from hpcds.facts import HF_PREFIX
from hpcds.spec.doc import spec_fields
from hpcds.spec.ds_config import merge_raw_config, raw_origins
from hpcds.spec.foreign import foreign_hint
from hpcds.spec.job import JobSpec, _as_dataset_list
from hpcds.spec.presets import PRESETS
from hpcds.spec.tree import deep_merge, get_path, set_path
from hpcds.spec.types import find_model

# libyaml's parser where PyYAML was built with it (the same YAML 1.1 values: the same constructor and resolver, in a
# tenth of the time: 0.3 ms instead of 3 ms for configs/mamba7b.yaml), else PyYAML's own.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=YAML_LOADER)  # a safe loader: plain values only


CLI_FLAGS = {
    "nodes": "slurm.nodes",
    "gpus_per_node": "slurm.gpus_per_node",
    "partition": "slurm.partition",
    "time": "slurm.time",
}


def parse_set(assignment: str) -> tuple[str, Any]:
    """'training.lr=1e-4' -> ('training.lr', 0.0001). The value is read as YAML, so lists and booleans work."""
    key, sep, raw = assignment.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
        raise SpecError(
            [
                Problem(
                    "--set",
                    f"{assignment!r} is not KEY=VALUE with a dotted key",
                    "e.g. --set training.lr=1e-4",
                )
            ]
        )
    try:
        # YAML reads '1e-4' as a string; pydantic then parses it as the float a person means.
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _model_at(path: tuple, model: type[BaseModel] | None) -> type[BaseModel] | None:
    for key in path:
        if model is None or not isinstance(key, str) or key not in model.model_fields:
            return None if not isinstance(key, int) else model
        annotation = model.model_fields[key].annotation
        model = find_model(annotation)
    return model


def _dotted(loc: tuple) -> str:
    text = ""
    for key in loc:
        if key == "[key]":  # pydantic's marker for a dict key that failed, e.g. slurm.env
            continue
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


def _problem_from(error: dict) -> Problem:
    loc = tuple(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        import difflib

        elsewhere = [f for f, _ in spec_fields() if f.rsplit(".", 1)[-1] == loc[-1] and "." in f and "[" not in f]
        if elsewhere:  # a spec field, in the wrong section (flat files put everything at the top)
            return Problem(_dotted(loc), "unknown key here", f"it belongs under {elsewhere[0].rsplit('.', 1)[0]}:")
        foreign = foreign_hint(str(loc[-1]), _dotted(loc))
        if foreign:  # another tool's name for a setting the spec has
            return Problem(_dotted(loc), "unknown key", foreign)
        parent = _model_at(loc[:-1], JobSpec)
        valid = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = (f"did you mean '{close[0]}'? " if close else "") + (f"valid keys: {', '.join(valid)}" if valid else "")
        return Problem(_dotted(loc), "unknown key", hint)
    if kind == "missing":
        return Problem(_dotted(loc), "is required", "add it to the spec, or use a preset that sets it")
    message = error["msg"].removeprefix("Value error, ")
    hint = ""
    if kind == "literal_error" and loc and loc[-1] == "preset":
        hint = "presets: " + ", ".join(PRESETS)
    elif kind == "model_type" and loc == ("deepspeed",) and isinstance(error.get("input"), str):
        # LLaMA-Factory and transformers' TrainingArguments name the DeepSpeed JSON right there
        message, hint = "is a section, not a file name", f"write it as deepspeed: {{config: {error['input']}}}"
    elif kind == "model_type":
        message, hint = "is a section, not a value", "its settings go on the indented lines below it"
    return Problem(_dotted(loc), message, hint)


def validate_spec(tree: dict, source: str = "") -> JobSpec:
    """Validate a merged spec tree; every problem, field-level and cross-field, in one SpecError."""
    context: dict[str, list[Problem]] = {"problems": []}
    problems: list[Problem] = []
    spec = None
    try:
        spec = JobSpec.model_validate(tree, context=context)
    except ValidationError as exc:
        problems += [_problem_from(err) for err in exc.errors()]
    problems += context["problems"]
    if problems or spec is None:
        raise SpecError(problems, source)
    return spec


def build_tree(yaml_tree: dict, sets: list[str] = (), flags: dict[str, Any] | None = None) -> dict:
    """Layer preset < YAML < --set < CLI flags into one plain dict (not yet validated), with the settings of a raw
    DeepSpeed config (`deepspeed.config`, already a mapping) moved into the spec's fields (hpcds.spec.ds_config)."""
    over: dict = {}
    for assignment in sets:
        key, value = parse_set(assignment)
        set_path(over, key, value)
    for flag, value in (flags or {}).items():
        if value is not None:
            set_path(over, CLI_FLAGS[flag], value)
    # The raw DeepSpeed config is read into the user's own layers, above the preset: its settings are the user's.
    tree, problems = merge_raw_config(deep_merge(yaml_tree, over))
    if problems:
        raise SpecError(problems)
    preset = tree.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            import difflib

            close = difflib.get_close_matches(str(preset), PRESETS, n=1)
            hint = (f"did you mean '{close[0]}'? " if close else "") + "presets: " + ", ".join(PRESETS)
            raise SpecError([Problem("preset", f"unknown preset {preset!r}", hint)])
        tree = deep_merge(PRESETS[preset], tree)
    return tree


def load_spec(
    path: str | Path | None,
    sets: list[str] = (),
    flags: dict[str, Any] | None = None,
    preset: str | None = None,
) -> JobSpec:
    """Read a YAML spec (or start from just a preset) and apply --set assignments and CLI flags."""
    source = str(path) if path else f"preset {preset}"
    yaml_tree: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise SpecError([Problem("", f"cannot read {path}: {exc.strerror}", "check the path")], source) from None
        try:
            yaml_tree = _yaml(text) or {}
        except yaml.YAMLError as exc:
            raise SpecError([Problem("", f"not valid YAML: {exc}", "check indentation and quoting")], source) from None
        if not isinstance(yaml_tree, dict):
            raise SpecError([Problem("", "the top level must be a mapping (key: value lines)", "see configs/")], source)
    if preset is not None:
        yaml_tree = {"preset": preset, "name": preset, **yaml_tree}
    folder = Path(path).absolute().parent if path else Path.cwd()
    yaml_tree = _read_ds_config_file(resolve_paths(yaml_tree, folder), folder, source)
    # What is still relative came from --set or a preset: it means the current folder, as any command-line path does.
    tree = resolve_paths(build_tree(yaml_tree, sets, flags), Path.cwd())
    try:
        return validate_spec(tree, source)
    except SpecError as exc:
        origins = raw_origins(tree)  # a value read from the user's DeepSpeed config: say where it was written
        problems = [
            Problem(p.path, f"{p.message} (as written in {origins[p.path]})", p.hint) if p.path in origins else p
            for p in exc.problems
        ]
        raise SpecError(problems, source) from None


# Spec fields that name files or folders. A relative one is made absolute against the folder of the YAML file that
# says it, so a spec means the same from any directory and the run (which starts elsewhere) finds it.
PATH_FIELDS = ("model.path", "checkpoint.dir", "deepspeed.nvme_path")
DATASET_LISTS = ("data.train", "data.val")
# "Qwen/Qwen3-8B", "gpt2": a Hugging Face name (in the local cache), not a folder, unless such a folder is there
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve_paths(tree: dict, folder: Path) -> dict:
    """`tree` (a raw spec tree) with its relative file and folder paths made absolute against `folder`.

    Left as they are: `builtin:` corpora, tokenizer names, and a `model.path` like `org/name` or `name` that is no
    folder under `folder` (a Hugging Face name in the local cache). That look at the file system, and `load_spec`'s
    reading, are this module's only I/O.
    """
    tree = copy.deepcopy(tree)

    def absolute(value: Any) -> Any:
        if not isinstance(value, str) or not value or value.startswith("builtin:") or Path(value).is_absolute():
            return value
        return str(folder / Path(value).expanduser())  # joined to an absolute ~ expansion, folder drops out

    for field in PATH_FIELDS:
        value = get_path(tree, field)
        hub_name = field == "model.path" and isinstance(value, str) and HUB_NAME.fullmatch(value)
        if value is not None and not (hub_name and not (folder / value).exists()):
            set_path(tree, field, absolute(value))
    for field in DATASET_LISTS:
        sources = _as_dataset_list(get_path(tree, field))
        if isinstance(sources, list):
            resolved = [{**s, "path": absolute(s.get("path"))} if isinstance(s, dict) else s for s in sources]
            set_path(tree, field, resolved)
    tokenizer = get_path(tree, "data.tokenizer")
    if isinstance(tokenizer, str) and tokenizer.startswith(HF_PREFIX):
        set_path(tree, "data.tokenizer", HF_PREFIX + absolute(tokenizer.removeprefix(HF_PREFIX)))
    elif isinstance(tokenizer, str) and tokenizer.endswith(".tiktoken"):
        set_path(tree, "data.tokenizer", absolute(tokenizer))
    return tree


def read_json_or_yaml(path: Path) -> Any:
    """A `.json` file read as JSON, any other as YAML (YAML 1.1 would read JSON's 5e8 or 1e-8 as strings). OSError
    passes through; a file that does not parse raises ValueError saying which format it is not."""
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else _yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from None


def _read_ds_config_file(tree: dict, folder: Path, source: str) -> dict:
    """`deepspeed.config: FILE` (JSON or YAML; relative to the spec's folder) replaced by the file's mapping."""
    named = (tree.get("deepspeed") or {}).get("config") if isinstance(tree.get("deepspeed"), dict) else None
    if not isinstance(named, str):
        return tree
    path = folder / Path(named).expanduser()
    try:
        loaded = read_json_or_yaml(path)
    except OSError as exc:
        problem = Problem("deepspeed.config", f"cannot read {path}: {exc.strerror}", "name a DeepSpeed JSON file")
        raise SpecError([problem], source) from None
    except ValueError as exc:
        raise SpecError([Problem("deepspeed.config", str(exc), "check the file")], source) from None
    if not isinstance(loaded, dict):
        problem = Problem("deepspeed.config", f"{path} does not hold a mapping", "a DeepSpeed JSON object: {...}")
        raise SpecError([problem], source)
    return {**tree, "deepspeed": {**tree["deepspeed"], "config": loaded}}
