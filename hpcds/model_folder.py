"""A model folder as users already have it: its config.json fills the shape fields a spec leaves unset, for every
command that loads a spec (hpcds.cli.common.spec_options), so render, submit, run and plan see the same shape.

`model.type: hf` folders are counted by the layout their model_type names (hpcds.spec.hf_config); a model_type
without one is built by transformers on the meta device in a child process (`python -m hpcds.model_folder FOLDER`),
and its count becomes `model.n_params`: login-node commands never import torch themselves, and the planner never
recommends a strategy from a guessed count. `mamba` / `mamba2` folders fill the built-in families' fields and must
agree with what the spec sets, as the trainer requires. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from hpcds.errors import HpcdsError
from hpcds.spec import JobSpec, validate_spec
from hpcds.spec.hf_config import fill_fields, needs_meta_count, read_shape, why_no_layout

META_COUNT_TIMEOUT_S = 600  # importing torch and transformers on a busy login node, then building on "meta"


def read_config(config_path: Path) -> dict:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise HpcdsError(
            f"cannot read {config_path}: {exc}\nhint: fix the file, or set the model's shape in the spec "
            "(model.d_model, model.n_layer, ...)"
        ) from None
    if not isinstance(config, dict):
        raise HpcdsError(f"{config_path} is not a JSON object\nhint: point model.path at a Hugging Face model folder")
    return config


def with_folder_shape(spec: JobSpec) -> tuple[JobSpec, list[str]]:
    """The spec with the shape fields it leaves unset filled from <model.path>/config.json; notes say what came from
    where (the plan prints them). Hub names and folders without config.json are left alone, except that mamba /
    mamba2 without d_model or n_layer need the file."""
    model = spec.model
    if model.type == "gpt2" or not model.path:
        return spec, []
    config_path = Path(model.path) / "config.json"
    if not config_path.is_file():
        missing = [f"model.{name}" for name in ("d_model", "n_layer") if getattr(model, name) is None]
        if model.type != "hf" and missing:
            raise HpcdsError(
                f"{' and '.join(missing)} not set, and {config_path} does not exist to read them from\n"
                f"hint: point model.path at a folder with config.json, or set them (or a preset)"
            )
        return spec, []  # hf: the planner then says which fields it needs
    shape = read_shape(read_config(config_path))
    update, notes, problems = fill_fields(model, shape, str(config_path))
    if problems:
        raise HpcdsError(
            f"model.path {model.path!r} does not match the spec:\n  - "
            + "\n  - ".join(problems)
            + "\nhint: remove the spec's shape lines to take the folder's, or fix them; the trainer refuses weights "
            "of another shape"
        )
    if needs_meta_count(model, shape):
        why = why_no_layout(shape, str(config_path))
        update["n_params"] = count_on_meta_device(model.path, why)
        notes.append(f"{why}: counted by transformers on the meta device, model.n_params {update['n_params']:,}")
    elif model.type == "hf" and shape.arch is None and model.hf_arch is not None:
        notes.append(f"{why_no_layout(shape, str(config_path))}: planned as the spec's hf_arch {model.hf_arch}")
    if not update:
        return spec, notes
    tree = spec.model_dump(mode="json")
    tree["model"].update(update)
    return validate_spec(tree, str(config_path)), notes


def count_on_meta_device(folder: str, why: str) -> int:
    """Parameters transformers builds from the folder's config (AutoModelForCausalLM, as the trainer does), counted in
    a child process on the meta device: no weights are read and no memory is used for them."""
    import subprocess  # here: every spec command imports this module, few count on the meta device

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "hpcds.model_folder", folder]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=META_COUNT_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        done = None
    lines = done.stdout.strip().splitlines() if done is not None else []
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if done is not None and done.returncode == 0 and isinstance(result.get("n_params"), int):
        return result["n_params"]
    if done is None:
        error = f"no answer in {META_COUNT_TIMEOUT_S} s"
    else:
        error = result.get("error") or (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise HpcdsError(
        f"{why}, and transformers could not build it to count its parameters ({' '.join(command)}: {error})\n"
        "hint: set model.n_params to the model's parameter count, or model.hf_arch and the shape fields of a layout "
        "that builds the same weights (docs/spec.md lists them)"
    )


def _count(folder: str) -> dict:
    """The child's work: build the folder's model on the meta device and count its parameters, shared ones once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # any failure is the answer: an unknown model_type, remote code, a bad config
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    n_params = sum({id(p): p.numel() for p in model.parameters()}.values())
    return {"n_params": n_params, "model_class": type(model).__name__}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m hpcds.model_folder FOLDER\n")
        return 2
    result = _count(argv[0])
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if "n_params" in result else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
