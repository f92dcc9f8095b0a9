"""The report as a picture: loss and tokens/s against wall-clock time, each restart marked, downtime shaded.

matplotlib is imported here, when a PNG is drawn, and through its object API with the Agg canvas: no pyplot, no global
backend, no display needed on a login node.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

from hpcds.report.core import RunReport

FIGURE_SIZE_IN = (10.0, 6.0)
FIGURE_DPI = 100  # 1000 × 600 pixels


def draw_report_png(report: RunReport, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    loss_axes, rate_axes = figure.subplots(2, 1, sharex=True)
    origin = report.allocations[0].start_time if report.allocations else 0.0

    def minutes(time: float) -> float:
        return (time - origin) / 60

    for recomputed, style in ((False, {"color": "tab:blue"}), (True, {"color": "tab:gray", "alpha": 0.6})):
        label = "trained again later" if recomputed else None
        for index in range(len(report.allocations)):  # one line per allocation: no line across the downtime
            mine = [p for p in report.points if p.allocation == index and p.recomputed == recomputed]
            if not mine:
                continue
            times = [minutes(p.time) for p in mine]
            loss_axes.plot(times, [p.loss for p in mine], marker=".", label=label, **style)
            rates = [(minutes(p.time), p.tokens_per_s) for p in mine if p.tokens_per_s is not None]
            rate_axes.plot([t for t, _ in rates], [r for _, r in rates], marker=".", **style)
            label = None
    for index, (current, following) in enumerate(pairwise(report.allocations), start=1):
        for axes in (loss_axes, rate_axes):
            if current.end_time is not None:
                axes.axvspan(
                    minutes(current.end_time),
                    minutes(following.start_time),
                    color="tab:red",
                    alpha=0.15,
                    label="down" if index == 1 and axes is loss_axes else None,
                )
            axes.axvline(minutes(following.start_time), color="tab:red", linestyle="--", linewidth=1)
        loss_axes.annotate(
            f"restart {following.restart}",
            (minutes(following.start_time), 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
            color="tab:red",
        )
    goodput = f"goodput {report.goodput:.0%}" if report.goodput is not None else "no allocation"
    figure.suptitle(f"{report.name}: {goodput}, {len(report.interruptions)} interruption(s)")
    ends = [a.end_time for a in report.allocations if a.end_time is not None]
    if ends:  # from the first allocation's start: its start-up shows as the time before the first step
        rate_axes.set_xlim(left=0, right=minutes(max(ends)))
    loss_axes.set_ylabel("loss")
    rate_axes.set_ylabel("tokens/s")
    rate_axes.set_ylim(bottom=0)  # a dip reads as what it is, not as a fall to nothing
    rate_axes.set_xlabel("minutes since the first allocation started")
    if loss_axes.get_legend_handles_labels()[0]:
        loss_axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    return path
