"""The package's shape: imports only down the flow, no circles, and docs/architecture.md showing the real graph."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_LOADER = importlib.machinery.SourceFileLoader("import_graph", str(ROOT / "scripts" / "import-graph"))
_SPEC = importlib.util.spec_from_loader("import_graph", _LOADER)
graph_tool = importlib.util.module_from_spec(_SPEC)
_LOADER.exec_module(graph_tool)


def test_imports_follow_the_flow_without_circles():
    assert graph_tool.problems(graph_tool.graph()) == []


def test_the_checker_finds_a_circle_an_upward_import_and_a_core_adapter():
    edges = {
        "hpcds.plan.memory": {"hpcds.render.deepspeed"},  # up the flow, and half of a circle
        "hpcds.render.deepspeed": {"hpcds.plan.memory"},
        "hpcds.spec.job": {"hpcds.runs"},  # up the flow from the pure core into an adapter
        "hpcds.runs": set(),
        "hpcds.train.loop": {"hpcds.runs"},  # fine: down the flow
    }
    found = graph_tool.problems(edges)
    assert "import circle: hpcds.plan.memory <-> hpcds.render.deepspeed" in found
    assert any(p.startswith("hpcds.plan.memory (plan) imports hpcds.render.deepspeed (render)") for p in found)
    assert any(p.startswith("hpcds.spec.job (spec) imports hpcds.runs (submit)") for p in found)
    assert not any(p.startswith("hpcds.train.loop") for p in found)


def test_lazy_imports_count(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from hpcds import runs\n    import hpcds.spec\n")
    known = {"hpcds", "hpcds.runs", "hpcds.spec", "hpcds.m"}
    assert graph_tool.imports_of("hpcds.m", source, known) == {"hpcds.runs", "hpcds.spec"}


def test_architecture_doc_shows_the_current_graph():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    start, end = doc.index(graph_tool.BEGIN), doc.index(graph_tool.END) + len(graph_tool.END)
    expected = graph_tool.render(graph_tool.graph())
    if os.environ.get("HPCDS_ACCEPT") == "1" and doc[start:end] != expected:
        graph_tool.DOC.write_text(doc[:start] + expected + doc[end:])
        return
    assert doc[start:end] == expected, "docs/architecture.md is stale: run scripts/import-graph --write"
