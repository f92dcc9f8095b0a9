"""The command reference in docs/cli.md, generated from the click commands so it cannot drift from the code.

`render_cli_reference(group)` writes one section per command (and sub-command): usage, help text and options, as
click itself formats them. A test regenerates it and compares with the checked-in docs. No I/O here.
"""

from __future__ import annotations

import click


def iter_commands(group: click.Group, prefix: str = "hpcds") -> list[tuple[str, click.Command]]:
    """Every command as (full name, command), sub-groups expanded, sorted by name."""
    # list_commands/get_command, not `group.commands`: the top-level group loads its commands lazily.
    ctx = click.Context(group, info_name=prefix)
    found = []
    for name in sorted(group.list_commands(ctx)):
        command = group.get_command(ctx, name)
        full = f"{prefix} {name}"
        if isinstance(command, click.Group):
            found += iter_commands(command, full)
        else:
            found.append((full, command))
    return found


def render_cli_reference(group: click.Group) -> str:
    sections = []
    # The group's settings (`-h` beside `--help`) reach every command as `hpcds COMMAND -h` would have them; click also
    # caches each command's help option, so a context without them would make the text depend on what ran first.
    settings = {**group.context_settings, "terminal_width": 110, "max_content_width": 110}
    for full, command in iter_commands(group):
        ctx = click.Context(command, info_name=full, **settings)
        help_text = command.get_help(ctx)
        sections.append(f"### `{full}`\n\n```\n{help_text}\n```\n")
    return "\n".join(sections)
