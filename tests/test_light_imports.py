"""Login-node commands stay light: render, plan, submit, status, logs and cancel never import the training stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "deepspeed", "transformers", "wandb")

PROBE = """
import json, sys
from hpcds.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
sys.__stdout__.write("\\nHEAVY=" + json.dumps([code, heavy]) + "\\n")
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["render", "configs/mamba7b.yaml", "--nodes", "2"],
        ["plan", "configs/mamba7b.yaml", "--gpus-per-node", "4", "--json"],
        ["submit", "configs/quickstart.yaml", "--dry-run", "--runs-dir", "{tmp}"],
        ["status", "--json", "--runs-dir", "{tmp}"],
        ["logs", "nonexistent-run", "--runs-dir", "{tmp}"],
        ["cancel", "nonexistent-run", "--runs-dir", "{tmp}"],
    ],
    ids=lambda argv: argv[0],
)
def test_login_node_commands_do_not_import_the_training_stack(argv, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=set(HEAVY)), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("HEAVY=")]
    assert line, f"probe did not finish: {result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    code, heavy = json.loads(line[-1][len("HEAVY=") :])
    # 0 = ran; 1 = a clear HpcdsError (e.g. no such run). 2 would be a usage error: the command must exist.
    assert code in (0, 1), f"exit {code}: {result.stderr[-2000:]}"
    assert heavy == [], f"hpcds {argv[0]} imported heavy modules"
