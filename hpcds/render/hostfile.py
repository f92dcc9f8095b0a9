"""DeepSpeed's hostfile (`<host> slots=<N>` per node, the format of DeepSpeed's `_parse_hostfile`), written and
read. No I/O here.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from hpcds.errors import HpcdsError


def render_hostfile(hosts: Sequence[str], slots: int) -> str:
    """DeepSpeed's hostfile: one `<host> slots=<N>` line per node, in allocation order (node rank = line index)."""
    if isinstance(hosts, str):
        raise HpcdsError("render_hostfile takes a list of host names, not one string")
    if not hosts:
        raise HpcdsError("no hosts for the hostfile: the allocation's node list is empty")
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise HpcdsError(f"slots per host must be a positive integer, not {slots!r}")
    seen: set[str] = set()
    for host in hosts:
        if not host or any(c.isspace() or unicodedata.category(c)[0] in "CZ" for c in host) or host.startswith("#"):
            raise HpcdsError(f"host name {host!r} cannot go in a hostfile (empty, whitespace, control character or #)")
        if host in seen:
            raise HpcdsError(f"host {host!r} appears twice; DeepSpeed refuses duplicate hostfile entries")
        seen.add(host)
    return "".join(f"{host} slots={slots}\n" for host in hosts)


def parse_hostfile(text: str) -> dict[str, int]:
    """Hosts and slots as DeepSpeed's `_parse_hostfile` reads them (`<host> slots=<n>`, # comments). No I/O here."""
    hosts: dict[str, int] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise HpcdsError(f"bad hostfile line {raw!r}: expected '<host> slots=<n>'")
        if parts[0] in hosts:
            raise HpcdsError(f"hostfile names {parts[0]} twice")
        hosts[parts[0]] = int(parts[1][6:])
    return hosts
