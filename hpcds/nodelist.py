"""Slurm node lists (`gpu[001-003,007],cpu-a[1-2]`) expanded to host names offline, and the hosts of a simulated
allocation.

Inside a job `scontrol show hostnames` is authoritative (hpcds launch uses it). Offline (rendering, planning,
simulating 1,024 nodes, tests) this module expands a node list with submitit's parser
(`submitit.slurm.slurm._parse_node_list`), which handles zero padding, several ranges in one bracket, several bracket
groups (`rack[1-2]-node[01-02]`, outer-major like Slurm) and text after a bracket (`node[1-2]-ib`). It is stricter
around the edges where submitit is lenient and Slurm is not: a descending range (`n[10-8]`) expands to nothing in
submitit and is an error in Slurm; an empty name (`n1,,n2`), whitespace, or an unbalanced bracket would give
surprising names. Those are refused here with the reason. No I/O here.
"""

from __future__ import annotations

import re

from hpcds.errors import HpcdsError

# Letters, digits and the punctuation Slurm node names use, plus the list syntax itself.
_ALLOWED = re.compile(r"[A-Za-z0-9._\-\[\],]*")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _check(nodelist: str) -> None:
    if not _ALLOWED.fullmatch(nodelist):
        bad = sorted({c for c in nodelist if not _ALLOWED.fullmatch(c)})
        raise HpcdsError(f"node list {nodelist!r} has characters Slurm node lists never hold: {bad}")
    depth = 0
    start = 0
    for i, char in enumerate(nodelist):
        if char == "[":
            if depth:
                raise HpcdsError(f"node list {nodelist!r}: brackets cannot nest (at position {i})")
            depth, start = 1, i
        elif char == "]":
            if not depth:
                raise HpcdsError(f"node list {nodelist!r}: ']' without '[' (at position {i})")
            depth = 0
            _check_ranges(nodelist, nodelist[start + 1 : i])
        elif char == "," and not depth and (i == 0 or nodelist[i - 1] == "," or i == len(nodelist) - 1):
            raise HpcdsError(f"node list {nodelist!r}: empty host name (a ',' at position {i} with nothing beside it)")
    if depth:
        raise HpcdsError(f"node list {nodelist!r}: '[' at position {start} is never closed")


def _check_ranges(nodelist: str, inside: str) -> None:
    for part in inside.split(","):
        match = _RANGE.fullmatch(part)
        if not match:
            raise HpcdsError(f"node list {nodelist!r}: {part!r} in [{inside}] is not a number or a range like 1-4")
        low, high = match.group(1), match.group(2)
        if high is not None and int(high) < int(low):
            raise HpcdsError(f"node list {nodelist!r}: range {part!r} runs backwards (Slurm refuses it too)")


def expand(nodelist: str) -> list[str]:
    """Host names of a Slurm node list, in Slurm's order (submitit's parser after a strict syntax check)."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise HpcdsError("empty node list: expected something like n[1-2] or gpu[001-004],cpu1")
    _check(nodelist)
    from submitit.slurm.slurm import SlurmParseException, _parse_node_list

    try:
        hosts = _parse_node_list(nodelist)
    except SlurmParseException as exc:
        raise HpcdsError(f"node list {nodelist!r} cannot be parsed: {exc}") from None
    if not hosts or any(not host for host in hosts):
        raise HpcdsError(f"node list {nodelist!r} expands to an empty host name: {hosts}")
    return hosts


def compress(hosts: list[str]) -> str:
    """A short Slurm node list for `hosts` (runs of one prefix with consecutive numbers of one width become
    `prefix[a-b,...]`); `expand(compress(h)) == h` for host names that need no brackets themselves."""
    groups: list[tuple[str, list[str]]] = []
    for host in hosts:
        match = re.fullmatch(r"(.*?)(\d+)", host)
        prefix, number = (match.group(1), match.group(2)) if match else (host, "")
        if number and groups and groups[-1][0] == prefix and groups[-1][1]:
            groups[-1][1].append(number)
        else:
            groups.append((prefix, [number] if number else []))
    parts = []
    for prefix, numbers in groups:
        if not numbers:
            parts.append(prefix)
        elif len(numbers) == 1:
            parts.append(prefix + numbers[0])
        else:
            parts.append(f"{prefix}[{_ranges(numbers)}]")
    return ",".join(parts)


def _ranges(numbers: list[str]) -> str:
    runs: list[list[str]] = []
    for number in numbers:
        last = runs[-1][-1] if runs else None
        if last is not None and len(last) == len(number) and int(number) == int(last) + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ",".join(run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def simulated_hosts(nodes: int, prefix: str = "gpu", width: int = 4) -> list[str]:
    """Host names of a made-up allocation of `nodes` nodes (gpu0001, gpu0002, ...), for rendering at scale."""
    return [f"{prefix}{i:0{width}d}" for i in range(1, nodes + 1)]
