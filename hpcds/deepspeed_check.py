"""DeepSpeed's own verdict on a run's config before anything is queued or launched.

The rendered ds_config.json goes to DeepSpeed's config classes (`deepspeed.runtime.config.DeepSpeedConfig`, the
object every engine builds first) in a child process: importing DeepSpeed takes seconds and pulls in torch, which
login-node commands keep out of their own process. Every refusal comes back as a Problem at its dotted path: the
child drops each refused setting and asks again, so all the refusals of DeepSpeed's config models (pydantic) come
at once, and of its other checks (asserts) those whose message names a top-level key; an assert naming none ends
the list. Top-level keys DeepSpeed never looks up are problems too (it ignores them without a word, so a misspelt
`zero_optimizaton` would silently train without it): refused when close to a key it reads, with "did you mean",
and otherwise returned to be shown as warnings.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from hpcds.cache import cache_dir
from hpcds.errors import CommandError, Problem, SpecError

RAW = "deepspeed.config"
# Enough rounds for every refusal a hand-written config holds; each round drops what the last one refused.
MAX_ROUNDS = 20
# A key DeepSpeed never reads this close to one it does (difflib's ratio) is a misspelling and refused; a key further
# from every real one (LLaMA-Factory's `monitor_config`, say) is only reported, since DeepSpeed itself ignores it.
MISSPELT_RATIO = 0.85
IGNORED = "is not a setting DeepSpeed reads: it is ignored"


def check_with_deepspeed(config: dict[str, Any], world_size: int, source: str = "") -> list[Problem]:
    """Raise SpecError with every problem DeepSpeed finds in `config` (the run's ds_config.json) for `world_size`
    ranks; otherwise return the keys it would ignore (to be shown as warnings).

    Verdicts are kept in the user's cache folder by a hash of the config, the world size, DeepSpeed's version and
    this module's source: the same question gets the same answer, without a second DeepSpeed import.
    """
    request = json.dumps({"config": config, "world_size": world_size}, sort_keys=True)
    cached = _cache_file(request)
    answer = _read_cached(cached) if cached else None
    if answer is None:
        argv = [sys.executable, "-m", "hpcds.deepspeed_check"]
        result = subprocess.run(argv, input=request, capture_output=True, text=True)
        if result.returncode != 0 or not result.stdout.strip():
            raise CommandError(argv, result.returncode, result.stderr[-4000:], hint="is DeepSpeed installed here?")
        answer = json.loads(result.stdout.splitlines()[-1])
        if cached:
            _store(cached, answer)
    found = [Problem(*fields) for fields in answer["problems"]]
    refused = [problem for problem in found if problem.message != IGNORED]
    if refused:
        raise SpecError(found, source or "the run's DeepSpeed config")
    return found


def _cache_file(request: str) -> Path | None:
    try:
        version = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        version = "none"
    # This module's own source is part of the key: a changed way of judging never reuses an old verdict.
    key = hashlib.sha256(f"{version}\n{request}".encode() + Path(__file__).read_bytes()).hexdigest()
    folder = cache_dir()
    return folder / "deepspeed-check" / f"{key}.json" if folder else None


def _read_cached(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _store(path: Path, answer: dict) -> None:
    # Written under a temporary name and renamed: two commands checking at once never read half a verdict.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{os.getpid()}.part")
        part.write_text(json.dumps(answer))
        os.replace(part, path)
    except OSError:
        pass  # no cache folder (read-only home): the verdict is simply asked again next time


# ---- the child: runs DeepSpeed's classes ----


class _Tracked(dict):
    """A config mapping that records every key DeepSpeed looks up in it (found or not), nested mappings too."""

    def __init__(self, data: dict, path: str, seen: set[str]):
        super().__init__({k: _Tracked(v, f"{path}{k}.", seen) if isinstance(v, dict) else v for k, v in data.items()})
        self._path, self._seen = path, seen

    def _look(self, key: object) -> None:
        self._seen.add(f"{self._path}{key}")

    def __getitem__(self, key):
        self._look(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._look(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self._look(key)
        return super().__contains__(key)

    def pop(self, key, *default):
        self._look(key)
        return super().pop(key, *default)

    def keys(self):  # `KEY in d.keys()` is DeepSpeed's common test, and a plain keys view would not record it
        return _TrackedKeys(self)


class _TrackedKeys:
    def __init__(self, owner: _Tracked):
        self._owner = owner

    def __contains__(self, key) -> bool:
        return key in self._owner

    def __iter__(self):
        return iter(dict.keys(self._owner))

    def __len__(self) -> int:
        return dict.__len__(self._owner)


def _delete(tree: dict, dotted: str) -> bool:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree.get(key)
        if not isinstance(tree, dict):
            return False
    if last not in tree:
        return False
    del tree[last]
    return True


def _config_model(title: str):
    """DeepSpeed's config model class called `title` (pydantic's error title), or None."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    stack = [DeepSpeedConfigModel]
    while stack:
        model = stack.pop()
        if model.__name__ == title:
            return model
        stack += model.__subclasses__()
    return None


def _section_of(tree: dict, loc: tuple, model) -> str | None:
    """The dotted place in `tree` of the section that `model` refused (the mapping a pydantic error's location starts
    in): of the sections holding the key, the one the model refuses when given it alone (fp16 and bf16 both hold
    `enabled`)."""
    from pydantic import ValidationError

    found = []

    def walk(node: dict, prefix: str) -> None:
        if loc and str(loc[0]) in node:
            found.append((prefix, node))
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(tree, "")
    for prefix, section in found:
        try:
            model(**section)
        except ValidationError:
            return prefix
        except Exception:
            continue
    return found[0][0] if found else None


def _field_names(model) -> list[str]:
    """Field names and aliases of one of DeepSpeed's config models."""
    names = []
    for name, field in model.model_fields.items() if model is not None else ():
        names += [name] + ([field.alias] if field.alias else [])
    return names


def _did_you_mean(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, sorted(set(valid)), n=1)
    return f"did you mean '{close[0]}'?" if close else ""


def _pydantic_problems(exc, config: dict) -> tuple[list[Problem], list[str]]:
    problems, drop = [], []
    model = _config_model(exc.title)
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        section = _section_of(config, loc, model) if model is not None else None
        where = f"{section}{'.'.join(loc)}" if section is not None else ".".join(loc)
        if error["type"] == "extra_forbidden":
            message, hint = "is not a DeepSpeed setting here", _did_you_mean(loc[-1], _field_names(model))
        else:
            message, hint = f"DeepSpeed refuses {error['input']!r}: {error['msg']}", ""
        problems.append(Problem(f"{RAW}.{where}", message, hint or "see DeepSpeed's configuration reference"))
        drop.append(where)
    return problems, drop


def _ignored_keys(config: dict, seen: set[str]) -> list[Problem]:
    """Top-level keys DeepSpeed never looked up. Only the top level: sections below are either validated by one of
    DeepSpeed's config models (which refuse unknown keys themselves) or read in part here and in part later by the
    engine (`optimizer.params`, `data_efficiency`), where an unread key proves nothing."""
    problems = []
    for key in config:
        if key in seen:
            continue
        close = difflib.get_close_matches(key, sorted(seen), n=1, cutoff=MISSPELT_RATIO)
        if close:
            problems.append(Problem(f"{RAW}.{key}", "is not a DeepSpeed setting", f"did you mean '{close[0]}'?"))
        else:
            hint = _did_you_mean(key, sorted(seen)) or "remove it, or check DeepSpeed's configuration reference"
            problems.append(Problem(f"{RAW}.{key}", IGNORED, hint))
    return problems


def verdict(config: dict, world_size: int) -> list[Problem]:
    """Every problem DeepSpeed's config classes find in `config` for `world_size` ranks (the child's work)."""
    import logging

    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger
    from pydantic import ValidationError

    logger.setLevel(logging.ERROR)  # its info lines and deprecation warnings are not the verdict
    config = json.loads(json.dumps(config))
    # Outside a process group DeepSpeed counts one rank: give it one rank's share of the global batch.
    if isinstance(config.get("train_batch_size"), int) and config["train_batch_size"] % world_size == 0:
        config["train_batch_size"] //= world_size
    problems: list[Problem] = []
    for _ in range(MAX_ROUNDS):
        seen: set[str] = set()
        try:
            DeepSpeedConfig(_Tracked(config, "", seen))
        except ValidationError as exc:
            found, drop = _pydantic_problems(exc, config)
            problems += found
            if not all([_delete(config, where) for where in drop]) or not drop:
                break
            continue
        except Exception as exc:  # DeepSpeed's own checks are asserts and plain exceptions
            message = str(exc).strip() or exc.__class__.__name__
            # When the message names one of the config's own top-level keys (its removed features do), the problem
            # is placed there and that key dropped to ask again; otherwise this is the last refusal found.
            named = [key for key in config if re.search(rf"\b{re.escape(key)}\b", message)]
            where = f"{RAW}.{named[0]}" if len(named) == 1 else RAW
            problems.append(Problem(where, f"DeepSpeed refuses it: {message}", "remove or change that setting"))
            if where == RAW:
                break
            del config[named[0]]
            continue
        problems += _ignored_keys(config, seen)
        break
    return problems


if __name__ == "__main__":
    request = json.loads(sys.stdin.read())
    found = verdict(request["config"], request["world_size"])
    print(json.dumps({"problems": [[p.path, p.message, p.hint] for p in found]}))
