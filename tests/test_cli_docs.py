"""docs/cli.md holds every command's help, regenerated from the click commands (HPCDS_ACCEPT=1 rewrites it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcds.cli import cli
from hpcds.cli.doc import iter_commands, render_cli_reference

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- BEGIN GENERATED", "<!-- END GENERATED -->"


def test_cli_reference_is_current():
    doc_path = ROOT / "docs/cli.md"
    text = doc_path.read_text()
    head, _, rest = text.partition(BEGIN)
    marker_line, _, rest = rest.partition("\n")
    generated, _, tail = rest.partition(END)
    expected = "\n" + render_cli_reference(cli) + "\n"
    if generated != expected:
        if os.environ.get("HPCDS_ACCEPT") == "1":
            doc_path.write_text(head + BEGIN + marker_line + "\n" + expected + END + tail)
        else:
            pytest.fail("docs/cli.md is out of date with the CLI: rerun with HPCDS_ACCEPT=1 to regenerate")


def test_every_command_is_in_the_docs_and_the_readme():
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    readme = (ROOT / "README.md").read_text()
    for full, _ in iter_commands(cli):
        assert f"`{full}" in docs, f"{full} is not documented under docs/"
        top = " ".join(full.split()[:2])
        assert f"`{top}" in readme, f"{top} is missing from the README's CLI table"
