"""Durations as Slurm writes them and as hpcds shows them: one parser, two formats. No I/O here.

Slurm's time format (`--time`, squeue's TIME and TIME_LIMIT columns) is read by `parse_slurm_time_s`; `hpcds status`
writes durations back in that format so they line up with squeue's, and the trainer's console line uses the short
`1h02m` form that fits beside a loss.
"""

from __future__ import annotations

# Words Slurm prints in a duration column where there is no duration.
NO_DURATION = frozenset({"UNLIMITED", "N/A", "INVALID", "NONE", "PARTITION_LIMIT"})


def parse_slurm_time_s(text: str) -> int | None:
    """Slurm's durations in seconds: `M` (minutes), `M:SS`, `H:MM:SS`, `D-H`, `D-H:MM`, `D-H:MM:SS`; None for the
    words in NO_DURATION. ValueError for anything else."""
    text = text.strip()
    if not text or text.upper() in NO_DURATION:
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if len(parts) > 3 or (days and not days.isdigit()):
        raise ValueError(f"not a Slurm duration: {text!r}")
    if days:
        hours, minutes, seconds = [*parts, 0, 0][:3]
        return int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def format_slurm_duration(seconds: float | None) -> str:
    """`M:SS`, `H:MM:SS` or `D-HH:MM:SS`, as squeue prints them; `-` for None."""
    if seconds is None:
        return "-"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_short_duration(seconds: float) -> str:
    """`1h02m`, `1m35s`, `7s`: an ETA on the trainer's console line."""
    hours, rest = divmod(max(0, int(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")
