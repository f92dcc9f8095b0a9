"""The lazy `hpcds` group: its static table agrees with every command module's COMMANDS, `hpcds --help` reads exactly
as an eagerly built group's would, and start-up imports only what the command run needs."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from hpcds.cli import COMMAND_TABLE, LazyGroup, cli
from hpcds.cli.doc import iter_commands, render_cli_reference

ROOT = Path(__file__).resolve().parents[1]
CLI_MODULES = sorted(f"hpcds.cli.{p.stem}" for p in (ROOT / "hpcds/cli").glob("*_cmd.py"))


def real_commands() -> dict[str, tuple[str, str, click.Command]]:
    """name -> (module, attribute, command), from each module's COMMANDS."""
    found = {}
    for module_name in CLI_MODULES:
        module = importlib.import_module(module_name)
        for command in module.COMMANDS:
            attribute = next(name for name, value in vars(module).items() if value is command)
            assert command.name not in found, f"{command.name} is registered by two modules"
            found[command.name] = (module_name, attribute, command)
    return found


def table_row(module: str, attribute: str, command: click.Command) -> tuple[str, str, str]:
    return (module, attribute, command.get_short_help_str(limit=10**6))


def test_table_matches_every_modules_commands():
    real = real_commands()
    expected = {name: table_row(*entry) for name, entry in real.items()}
    for name in sorted(expected.keys() | COMMAND_TABLE.keys()):
        assert COMMAND_TABLE.get(name) == expected.get(name), (
            f"hpcds/cli/__init__.py COMMAND_TABLE is out of date for {name!r}: it should read "
            f"{name!r}: {expected.get(name)!r} (None = remove the entry)"
        )
    assert all(module in {m for m, _, _ in COMMAND_TABLE.values()} for module in CLI_MODULES)


def eager_group() -> click.Group:
    return click.Group("hpcds", commands={name: command for name, (_, _, command) in real_commands().items()})


@pytest.mark.parametrize("width", [40, 80, 110])
def test_help_lists_what_an_eager_group_would(width):
    fresh = LazyGroup("hpcds", lazy_commands=COMMAND_TABLE)  # nothing loaded yet: the summaries come from the table
    listed = []
    for group in (fresh, eager_group()):
        ctx = click.Context(group, info_name="hpcds", terminal_width=width, max_content_width=width)
        formatter = ctx.make_formatter()
        group.format_commands(ctx, formatter)
        listed.append(formatter.getvalue())
    assert listed[0] == listed[1]
    assert fresh.commands == {}, "listing the commands imported them"


def test_every_command_resolves_and_the_reference_sees_them_all():
    ctx = click.Context(cli, info_name="hpcds")
    assert cli.list_commands(ctx) == sorted(COMMAND_TABLE)
    for name, (module, attribute, _) in COMMAND_TABLE.items():
        assert cli.get_command(ctx, name) is getattr(importlib.import_module(module), attribute)
    assert cli.get_command(ctx, "no-such-command") is None
    assert [full for full, _ in iter_commands(cli)] == [full for full, _ in iter_commands(eager_group())]
    assert render_cli_reference(cli) == render_cli_reference(eager_group())


PROBE = """
import json, sys
from hpcds.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
else:
    code = 0
watched = ("rich", "pydantic", "jinja2")
# Modules imported, not stand-ins put in sys.modules (hpcds.cli.skip_pydantic_plugin_scan's has no import spec).
imported = [m for m, module in sys.modules.items() if getattr(module, "__spec__", None) is not None]
loaded = sorted(m for m in imported if m.startswith("hpcds.cli.") or m.split(".")[0] in watched)
sys.__stdout__.write("\\nLOADED=" + json.dumps([code, loaded]) + "\\n")
"""


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--help"], []),
        (["--version"], []),
        (
            ["render", "configs/quickstart.yaml"],
            ["hpcds.cli.common", "hpcds.cli.render_cmd", "hpcds.cli.template_cache", "jinja2", "pydantic"],
        ),
        (  # rich only for the table, jinja2 only to render
            ["plan", "configs/quickstart.yaml", "--json"],
            ["hpcds.cli.common", "hpcds.cli.plan_cmd", "hpcds.cli.template_cache", "pydantic"],
        ),
    ],
    ids=["help", "version", "render", "plan --json"],
)
def test_start_up_imports_only_what_the_command_needs(argv, expected):
    result = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("LOADED=")]
    assert line, result.stderr[-2000:]
    code, loaded = json.loads(line[-1][len("LOADED=") :])
    assert code == 0, result.stderr[-2000:]
    assert sorted({m if m.startswith("hpcds.") else m.split(".")[0] for m in loaded}) == expected


PLUGIN_PROBE = """
import json, sys
from hpcds.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert not exc.code, exc.code
from pydantic.plugin import _loader
sys.__stdout__.write("\\nSCAN=" + json.dumps(["importlib.metadata" in sys.modules, _loader.__doc__ or ""]) + "\\n")
"""


@pytest.mark.parametrize(
    ("setting", "scanned"),
    [(None, False), ("", True), ("__all__", False), ("logfire", True)],
    ids=["unset", "empty: load every plugin", "all disabled", "one disabled"],
)
def test_pydantic_plugins_are_looked_for_only_when_asked(setting, scanned):
    """pydantic's plugin loader imports importlib.metadata and reads every installed package's entry points when the
    first validator is built (~15 ms): hpcds's commands skip it unless PYDANTIC_DISABLE_PLUGINS asks for plugins (set
    empty: all of them; a list of names: all but those), and then pydantic's own loader runs. The spec is validated
    the same either way (the render succeeds)."""
    env = {key: value for key, value in os.environ.items() if key != "PYDANTIC_DISABLE_PLUGINS"}
    if setting is not None:
        env["PYDANTIC_DISABLE_PLUGINS"] = setting
    argv = ["render", "configs/quickstart.yaml", "--ds-config"]
    result = subprocess.run(
        [sys.executable, "-c", PLUGIN_PROBE, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("SCAN=")]
    assert line, result.stderr[-2000:]
    metadata_imported, loader_doc = json.loads(line[-1][len("SCAN=") :])
    assert metadata_imported is scanned
    assert ("hpcds" in loader_doc) is not scanned, loader_doc


def test_unknown_command_is_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "hpcds", "rendr"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "No such command 'rendr'" in result.stderr
