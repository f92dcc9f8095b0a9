"""The one exception family of hpcds.

Every mistake a person can make or fix (a bad spec, a failing Slurm command, a missing file) is an `HpcdsError`.
The CLI alone turns it into a message and exit code 1; anything else is a bug and keeps its traceback. No I/O here.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass


class HpcdsError(Exception):
    """An error meant for the person at the terminal: its text says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Problem:
    """One problem in a job spec: where (dotted path), what, and a hint for the fix."""

    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.path or '<spec>'}: {self.message}"
        return f"{text}\n    hint: {self.hint}" if self.hint else text


class SpecError(HpcdsError):
    """A job spec with one or more problems, all reported together."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        count = len(self.problems)
        lines = [f"{count} problem{'s' if count != 1 else ''}{where}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class CommandError(HpcdsError):
    """An external command (sbatch, squeue, deepspeed, ...) that failed: shown with its command line and stderr."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str, hint: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        status = "could not be started" if returncode is None else f"exited with code {returncode}"
        text = f"command {status}: {shlex.join(self.argv)}"
        if stderr.strip():
            text += "\n" + "\n".join(f"  | {line}" for line in stderr.strip().splitlines())
        if hint:
            text += f"\nhint: {hint}"
        super().__init__(text)
