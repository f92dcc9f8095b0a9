"""`hpcds import`: a spec from what a person already has: another tool's training YAML (LLaMA-Factory, Hugging Face
TrainingArguments, gpt-neox), a DeepSpeed JSON, a model folder. The translation is `hpcds.spec.foreign.import_tree`;
this module reads and writes the files and checks the result as any spec is checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from hpcds.cli import COMMAND_SETTINGS
from hpcds.errors import HpcdsError, SpecError

SECTIONS = ("name", "preset", "model", "data", "training", "deepspeed", "checkpoint", "slurm", "wandb")


def _read_source(source: Path) -> dict:
    from hpcds.spec.load import read_json_or_yaml

    try:
        tree = read_json_or_yaml(source)
    except ValueError as exc:
        raise HpcdsError(str(exc)) from None
    if not isinstance(tree, dict):
        raise HpcdsError(f"{source} does not hold a mapping (key: value lines)")
    return tree


def _existing(path: str, folders: list[Path]) -> str | None:
    """`path` made absolute against the first folder where it exists (as its own tool would find it), or None."""
    if Path(path).is_absolute():
        return path if Path(path).exists() else None
    return next((str((folder / path).absolute()) for folder in folders if (folder / path).exists()), None)


@click.command("import", context_settings=COMMAND_SETTINGS)
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A Hugging Face model folder (config.json) to train: model.type hf, model.path.",
)
@click.option("--name", help="Run name (default: from the file's name).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the spec to OUT.")
def import_command(source: Path, model_dir: Path | None, name: str | None, out: Path | None) -> None:
    """Write a spec from another tool's training YAML or a DeepSpeed JSON; what cannot be carried over is listed.

    SOURCE is a training YAML of LLaMA-Factory, Hugging Face's TrainingArguments or gpt-neox (flat key: value lines),
    or a DeepSpeed JSON, which becomes deepspeed.config. Each setting the spec can say is written where the spec says
    it; the others are listed at the end as comments with the reason. The spec is then checked as `hpcds render`
    checks it: what is left to fill in (a model, data folders) is printed, with exit code 1.
    """
    import yaml

    from hpcds.spec.foreign import import_tree

    foreign = _read_source(source)
    is_ds_config = source.suffix == ".json"
    tree, notes = ({"deepspeed": {"config": str(source.absolute())}}, []) if is_ds_config else import_tree(foreign)
    named = (tree.get("deepspeed") or {}).get("config")
    if isinstance(named, str) and not is_ds_config:
        # LLaMA-Factory names it from where it is run; the file's own folder is the other place to look
        found = _existing(named, [Path.cwd(), source.parent])
        if found is None:
            del tree["deepspeed"]["config"]
            notes.append(f"deepspeed: {named!r}  # not found here or beside {source.name}: name it in deepspeed.config")
        else:
            tree["deepspeed"]["config"] = found
    if model_dir is not None:
        tree.setdefault("model", {}).update(type="hf", path=str(model_dir.absolute()))
    elif (tree.get("model") or {}).get("path") and "type" not in tree["model"]:
        tree["model"]["type"] = "hf"  # model_name_or_path: a Hugging Face model
    tree["name"] = name or re.sub(r"[^A-Za-z0-9._-]+", "-", source.stem).strip("-._")[:64] or "imported"
    ordered = {key: tree[key] for key in SECTIONS if key in tree}
    text = f"# Made by `hpcds import` from {source.name}; check each value before training.\n"
    text += yaml.safe_dump(ordered, sort_keys=False)
    if notes:
        text += f"\n# Not carried over from {source.name}:\n" + "".join(f"#   {note}\n" for note in notes)
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"wrote {out}", err=True)
    _check(text, out.parent if out is not None else Path.cwd())


def _check(text: str, folder: Path) -> None:
    """Load the written spec as `hpcds render` would (from a file: deepspeed.config is read, paths resolved)."""
    import tempfile

    from hpcds.spec import load_spec

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=folder if folder.is_dir() else None) as spec_file:
        spec_file.write(text)
        spec_file.flush()
        try:
            load_spec(spec_file.name)
        except SpecError as exc:
            left = "\n".join(f"  - {problem}" for problem in exc.problems)
            raise HpcdsError(f"the imported spec is not complete yet; still to fill in:\n{left}") from None


COMMANDS = [import_command]
