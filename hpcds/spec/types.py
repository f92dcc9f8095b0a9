"""The spec's building blocks: checked string types, the strict base model and the problem list that cross-field
checks append to (see `hpcds.spec.validate_spec`). No I/O."""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo

from hpcds.errors import Problem


def _no_control_chars(value: str) -> str:
    # Newline, CR, NUL, NEL and the Unicode line/paragraph separators can end an #SBATCH line or a shell word early.
    for char in value:
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            raise ValueError(
                f"contains the control character {char!r}; strings may not hold newlines or other control characters"
            )
    return value


def _pattern(regex: str, what: str):
    # Compiled on first use (re keeps it): a spec uses a few of these patterns, and every command imports them all.
    def check(value: str) -> str:
        if not re.fullmatch(regex, value):
            raise ValueError(f"{value!r} is not a valid {what}")
        return value

    return check


SafeStr = Annotated[str, AfterValidator(_no_control_chars)]
# Names end up in file names, job names and W&B ids: keep them to a portable set, no shell metacharacters at all.
Name = Annotated[
    SafeStr,
    AfterValidator(
        _pattern(
            r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
            "name (letters, digits, '.', '_', '-'; at most 64; starting with a letter or digit)",
        )
    ),
]
SlurmWord = Annotated[
    SafeStr, AfterValidator(_pattern(r"[A-Za-z0-9_.,:@+-]+", "Slurm name (letters, digits, '_.,:@+-')"))
]
SlurmTime = Annotated[
    SafeStr,
    AfterValidator(
        _pattern(
            r"[0-9]+|[0-9]+:[0-9]{1,2}|[0-9]+:[0-9]{1,2}:[0-9]{1,2}"
            r"|[0-9]+-[0-9]{1,2}|[0-9]+-[0-9]{1,2}:[0-9]{1,2}|[0-9]+-[0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}",
            "Slurm time (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)",
        )
    ),
]
SlurmMem = Annotated[SafeStr, AfterValidator(_pattern(r"[0-9]+[KMGT]?", "memory size (e.g. 64G, 500000M, 0 = all)"))]
Constraint = Annotated[SafeStr, AfterValidator(_pattern(r"[A-Za-z0-9_.,:*&|\[\]()! -]+", "Slurm constraint"))]
SbatchFlag = Annotated[
    SafeStr,
    AfterValidator(_pattern(r"--[a-z][a-z0-9-]*(=\S+)?", "sbatch flag ('--name' or '--name=value', no spaces)")),
]
EnvName = Annotated[str, AfterValidator(_pattern(r"[A-Za-z_][A-Za-z0-9_]*", "environment variable name"))]


class Strict(BaseModel):
    # defer_build: a model's validator is built on first use, and validating a JobSpec builds the sections inside it
    # once, as part of JobSpec's; building every class at import would cost CLI start-up time for nothing.
    # (Mutable defaults below are plain `[]`/`{}`, which pydantic copies per instance: a `default_factory` costs a
    # signature inspection per field at import.)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, defer_build=True)


def _problems(info: ValidationInfo) -> list[Problem]:
    # Cross-field checks append here instead of raising, so one run reports them all (see `validate_spec`).
    return info.context.setdefault("problems", []) if info.context is not None else []


def find_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field's annotation holds (inside Optional, list, Annotated), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = find_model(arg)
        if found is not None:
            return found
    return None
