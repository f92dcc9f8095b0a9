"""`hpcds report RUN`: where a run's time went, as a table, `--json`, and a PNG (docs/report.md).

Light on purpose (login nodes): no torch or deepspeed; matplotlib only once the PNG is drawn.
"""

from __future__ import annotations

from pathlib import Path

import click

from hpcds.cli import COMMAND_SETTINGS
from hpcds.cli.common import console, print_json, runs_root_option
from hpcds.durations import format_slurm_duration
from hpcds.report.core import RunReport

REPORT_PNG = "report.png"  # in the run directory, unless --png says where
CAUSE_CHARS = 60  # of an allocation's stop signal or error in the table


def _s(seconds: float | None) -> str:
    """Seconds as people read them: `12.3 s` under two minutes, `M:SS` / `H:MM:SS` above."""
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else format_slurm_duration(seconds)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def summary_rows(report: RunReport, png: Path | None) -> list[tuple[str, str]]:
    notes = report.notes
    gpu_hours = f"{report.gpu_hours:.2f}" if report.gpu_hours is not None else f"- ({notes.get('gpu_hours', '')})"
    mfu = _share(report.mfu) if report.mfu is not None else f"- ({notes.get('mfu', '')})"
    if report.mfu is not None:
        mfu += f" of {report.peak_tflops:g} TFLOP/s dense per GPU ({report.gpu_name})"
    rows = [
        (
            "goodput",
            f"{_share(report.goodput)} ({_s(report.effective_s)} training of {_s(report.allocated_s)} allocated)",
        ),
        ("allocations", f"{len(report.allocations)}, interruptions {len(report.interruptions)}"),
        ("downtime", f"{_s(report.downtime_s)} between allocations"),
        ("steps", f"{report.steps_kept} kept, {report.steps_recomputed} recomputed"),
        ("saves", f"{report.saves}: {_s(report.save_blocking_s)} blocking, {_s(report.save_background_s)} background"),
        ("GPU-hours", gpu_hours),
        ("tokens", "-" if report.tokens is None else f"{report.tokens:,}"),
        ("tokens/s", "-" if report.tokens_per_s is None else f"{report.tokens_per_s:,.0f} while training"),
        ("MFU", mfu),
    ]
    if "allocations" in notes:
        rows.append(("note", notes["allocations"]))
    if png is not None:
        rows.append(("plot", str(png)))
    return rows


def render_tables(report: RunReport, png: Path | None) -> list:
    from rich.markup import escape
    from rich.table import Table

    summary = Table(title=f"{report.name}", title_justify="left", show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold", no_wrap=True)
    summary.add_column(overflow="fold")
    for key, value in summary_rows(report, png):
        summary.add_row(key, escape(value))
    tables = [summary]
    if report.allocations:
        origin = report.allocations[0].start_time
        allocations = Table(title="allocations", title_justify="left", box=None, header_style="bold")
        for header in ("#", "start", "ran", "training", "goodput", "steps", "redone", "1st step"):
            allocations.add_column(header, justify="right", no_wrap=True)
        allocations.add_column("ending", overflow="fold")
        for a in report.allocations:
            steps = "-" if a.last_step is None else f"{a.resumed_from_step or 0}→{a.last_step}"
            # Escaped: error messages quote source locations like `[/…/pair.cc:553]`, which rich would read as markup.
            cause = a.cause if len(a.cause) <= CAUSE_CHARS else a.cause[: CAUSE_CHARS - 1] + "…"  # --json has it all
            ending = escape(a.ending + (f": {cause}" if cause else ""))
            allocations.add_row(
                str(a.restart), f"+{_s(a.start_time - origin)}", _s(a.allocated_s), _s(a.effective_s),
                _share(a.goodput), steps, str(a.steps_recomputed), _s(a.start_to_first_step_s), ending,
            )  # fmt: skip
        tables.append(allocations)
    if report.interruptions:
        interruptions = Table(
            title="interruptions", title_justify="left", box=None, header_style="bold", pad_edge=False
        )
        for header in ("#", "ending", "saved at", "signal→commit", "queue wait", "1st step", "resumed at", "redone"):
            interruptions.add_column(header, justify="right", no_wrap=True)
        for i in report.interruptions:
            commit = "-" if i.signal_to_commit_max_s is None else f"≤ {_s(i.signal_to_commit_max_s)}"
            interruptions.add_row(
                str(i.restart), i.ending, "-" if i.stopped_at_step is None else str(i.stopped_at_step), commit,
                _s(i.queue_wait_s), _s(i.next_start_to_first_step_s),
                "-" if i.resumed_from_step is None else str(i.resumed_from_step), str(i.steps_recomputed),
            )  # fmt: skip
        tables.append(interruptions)
    return tables


@click.command(context_settings=COMMAND_SETTINGS)
@click.argument("name", metavar="RUN")
@runs_root_option
@click.option("--json", "as_json", is_flag=True, help="The report's numbers as JSON (the plot's points included).")
@click.option(
    "--png",
    "png_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"Where to draw the plot (default: {REPORT_PNG} in the run directory).",
)
@click.option("--no-png", is_flag=True, help="Do not draw the plot.")
@click.option("--gpu", "gpu_name", metavar="NAME", help='The GPU the run used, for MFU, e.g. "H100 SXM".')
def report(name: str, runs_root: Path, as_json: bool, png_path: Path | None, no_png: bool, gpu_name: str | None):
    """Where a run's time went: goodput, each interruption's cost, saves, GPU-hours, tokens/s, MFU, and a plot."""
    from hpcds.cli.jobs_cmd import select_run
    from hpcds.report.read import read_report

    run_dir = select_run(runs_root, name)
    found = read_report(run_dir, gpu_name)
    png = None
    if not no_png:
        from hpcds.report.png import draw_report_png

        png = draw_report_png(found, png_path or run_dir / REPORT_PNG)
    if as_json:
        print_json({**found.to_dict(), "png": str(png) if png else None})
        return
    for table in render_tables(found, png):
        console.print(table)
        console.print()


COMMANDS = [report]
