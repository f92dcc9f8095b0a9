"""`hpcds plan`: the memory table for every ZeRO stage and offload, and the strategy a run would pin.

Light on purpose (login nodes): it imports neither torch nor deepspeed. A local model folder's config.json has
filled the shape fields the spec leaves unset by the time the spec arrives (hpcds.model_folder, through
spec_options); the plan's notes say which. Nothing is ever downloaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from hpcds.cli import COMMAND_SETTINGS
from hpcds.cli.common import SHAPE_NOTES_KEY, print_json, spec_options
from hpcds.plan import GIB, Plan, checkpoint_save_s, lead_needed_s, plan_job
from hpcds.spec import JobSpec

if TYPE_CHECKING:
    from rich.table import Table


def _size(value: int) -> str:
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


def _gb(value: int) -> str:
    return f"{value / GIB:.1f}"


def render_plan_table(spec: JobSpec, plan: Plan) -> Table:
    from rich import box
    from rich.table import Table

    train = spec.training
    title = (
        f"{spec.name}: {plan.nodes} node(s) × {plan.gpus_per_node} GPU(s) of {plan.gpu_mem_bytes / GIB:g} GiB, "
        f"micro batch {train.micro_batch_size} × {spec.model.max_seq_len} tokens, {train.precision}, "
        f"activation checkpointing {'on' if train.activation_checkpointing else 'off'}"
    )
    table = Table(
        title=title,
        title_justify="left",
        caption="GiB per GPU; bufs = DeepSpeed's gradient buckets; free = usable memory left\n"
        "opt, par = optimizer, params offloaded to CPU; CPU = GiB of RAM per node",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for header in ("ZeRO", "offload", "params", "grads", "optim", "activ", "bufs", "total", "free", "CPU", "fits"):
        table.add_column(header, justify="left" if header in ("ZeRO", "offload") else "right", no_wrap=True)
    for row in plan.rows:
        mark = "[green]✓[/]" if row.fits else "[red]✗[/]"
        if row is (plan.chosen or plan.recommended):
            mark += " ←"
        strategy = row.strategy
        offload = "opt+par" if strategy.offload_params else "opt" if strategy.offload_optimizer else "-"
        table.add_row(
            str(strategy.stage),
            offload,
            _gb(row.params_bytes),
            _gb(row.grads_bytes),
            _gb(row.optimizer_bytes),
            _gb(row.activations_bytes),
            _gb(row.buffers_bytes),
            _gb(row.total_bytes),
            _gb(row.headroom_bytes),
            f"{row.cpu_bytes_per_node / GIB:.0f}",
            mark,
        )
    return table


def print_plan(spec: JobSpec, gpu_mem_gb: float | None = None, as_json: bool = False) -> Plan:
    """Print the plan for people (a table) or scripts (`plan.to_dict()` as JSON); returns it.

    The notes on what the model folder's config.json filled in come from spec_options, through the click context.
    """
    context = click.get_current_context(silent=True)
    plan = plan_job(spec, gpu_mem_gb)
    plan.notes[:0] = context.meta.get(SHAPE_NOTES_KEY, []) if context is not None else []
    if as_json:
        print_json(plan.to_dict())
        return plan
    # rich only for the table: `--json` (scripts) does without its start-up time.
    from rich.markup import escape

    from hpcds.cli.common import console

    console.print(render_plan_table(spec, plan))
    usable_gb = (plan.gpu_mem_bytes - plan.reserve_bytes) / GIB
    console.print(
        f"usable per GPU: {usable_gb:.1f} GiB (kept back: 10% + 1 GiB for CUDA context and fragmentation)",
        highlight=False,
    )
    params = plan.params
    scale = f"{params.total / 1e9:.2f}B" if params.total >= 1e9 else f"{params.total / 1e6:.1f}M"
    line = f"parameters: {params.total:,} ({scale})"
    if params.active is not None:
        active = params.active_per_token
        line += f", active per token {active:,} ({active / 1e9:.2f}B)"
    if params.frozen:
        line += f", trainable {params.trainable:,}"
    console.print(line)
    console.print(f"FLOPs per token (training, forward + backward): {plan.flops_per_token:.3e}")
    gbps = spec.checkpoint.write_gbps
    save_s = checkpoint_save_s(plan.checkpoint_bytes, gbps)
    lead_s, need_s = spec.slurm.signal_lead_s, lead_needed_s(spec, plan)
    verdict = "ok" if lead_s >= need_s else f"[bold red]too short[/] (needs {need_s:.0f} s: 2 saves + 30 s)"
    console.print(
        f"checkpoint: {_size(plan.checkpoint_bytes)} per save, ~{save_s:.0f} s at {gbps:g} GB/s; "
        f"slurm.signal_lead_s = {lead_s} s: {verdict}"
    )
    chosen, best = plan.chosen, plan.recommended
    if chosen is not None:
        if chosen.fits:
            console.print(
                f"[bold]the spec's strategy:[/] {chosen.strategy.name}, fits ({_gb(chosen.headroom_bytes)} GiB free)"
            )
        else:
            short = f"{_gb(-chosen.headroom_bytes)} GiB short" if chosen.headroom_bytes < 0 else "too little CPU RAM"
            console.print(f"[bold red]the spec's strategy {chosen.strategy.name} does not fit[/] ({short})")
    if chosen is None and best is not None:
        console.print(f"[bold]recommended (pinned at submit):[/] {best.strategy.name}")
    elif chosen is not None and best is not None and best is not chosen:
        console.print(f"least communication that fits with the spec's stage: {best.strategy.name}")
    elif best is None:
        console.print(
            "[bold red]nothing fits[/]: add GPUs (--nodes, --gpus-per-node), offload "
            "(deepspeed.offload_optimizer: cpu), lower training.micro_batch_size or set "
            "training.activation_checkpointing: true"
        )
    if spec.slurm.gpus_per_node == 0:
        console.print(
            "note: the spec runs CPU ranks (slurm.gpus_per_node 0); the table is what each rank needs on a GPU"
        )
    for note in plan.notes:
        console.print(f"note: {escape(note)}")
    return plan


@click.command("plan", context_settings=COMMAND_SETTINGS)
@spec_options
@click.option(
    "--gpu-mem-gb",
    type=click.FloatRange(min=0, min_open=True),
    help="Memory of one GPU in GiB, as nvidia-smi MiB / 1024 (slurm.gpu_mem_gb).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(spec: JobSpec, spec_path, gpu_mem_gb: float | None, as_json: bool) -> None:
    """Memory per GPU for each ZeRO stage and offload, and the strategy that fits with the least communication."""
    print_plan(spec, gpu_mem_gb, as_json)


COMMANDS = [plan]
