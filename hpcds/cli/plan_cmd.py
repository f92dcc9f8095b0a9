"""`hpcds plan`: the memory table for every ZeRO stage and offload, and the strategy a run would pin.

Light on purpose (login nodes): it imports neither torch nor deepspeed. For `model.type: hf` without explicit sizes,
a local folder's config.json fills them in; nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich import box
from rich.markup import escape
from rich.table import Table

from hpcds.cli.common import console, print_json, spec_options
from hpcds.errors import HpcdsError
from hpcds.plan import GIB, Plan, checkpoint_save_s, plan_job
from hpcds.spec import JobSpec

# config.json keys of Llama-like and GPT-2 configs -> spec fields
_HF_CONFIG_KEYS = {
    "d_model": ("hidden_size", "n_embd", "d_model"),
    "n_layer": ("num_hidden_layers", "n_layer"),
    "n_head": ("num_attention_heads", "n_head"),
    "d_ff": ("intermediate_size", "n_inner"),
    "vocab_size": ("vocab_size",),
}


def with_local_hf_sizes(spec: JobSpec) -> JobSpec:
    """Fill model sizes of an hf model from <model.path>/config.json when the spec leaves them out."""
    model = spec.model
    if model.type != "hf" or (model.d_model and model.n_layer) or not model.path:
        return spec
    config_path = Path(model.path) / "config.json"
    if not config_path.is_file():
        return spec  # the planner then says which fields it needs
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise HpcdsError(f"cannot read {config_path}: {exc}; fix the file or set model.d_model/n_layer") from None
    update = {}
    for name, keys in _HF_CONFIG_KEYS.items():
        value = next((config[k] for k in keys if isinstance(config.get(k), int)), None)
        if value is not None and (name == "vocab_size" or getattr(model, name) is None):
            update[name] = value
    return spec.model_copy(update={"model": model.model_copy(update=update)})


def _size(value: int) -> str:
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


def _gb(value: int) -> str:
    return f"{value / GIB:.1f}"


def render_plan_table(spec: JobSpec, plan: Plan) -> Table:
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
    """Print the plan for people (a table) or scripts (`plan.to_dict()` as JSON); returns it."""
    spec = with_local_hf_sizes(spec)
    plan = plan_job(spec, gpu_mem_gb)
    if as_json:
        print_json(plan.to_dict())
        return plan
    console.print(render_plan_table(spec, plan))
    usable_gb = (plan.gpu_mem_bytes - plan.reserve_bytes) / GIB
    console.print(
        f"usable per GPU: {usable_gb:.1f} GiB (kept back: 10% + 1 GiB for CUDA context and fragmentation)",
        highlight=False,
    )
    params = plan.params
    scale = f"{params.total / 1e9:.2f}B" if params.total >= 1e9 else f"{params.total / 1e6:.1f}M"
    line = f"parameters: {params.total:,} ({scale})"
    if params.frozen:
        line += f", trainable {params.trainable:,}"
    console.print(line)
    console.print(f"FLOPs per token (training, forward + backward): {plan.flops_per_token:.3e}")
    save_s = checkpoint_save_s(plan.checkpoint_bytes)
    lead_s = spec.slurm.signal_lead_s
    verdict = "ok" if lead_s >= 2 * save_s else "[yellow]consider raising it[/]"
    console.print(
        f"checkpoint: {_size(plan.checkpoint_bytes)} per save, ~{save_s:.0f} s at 1 GB/s; "
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


@click.command("plan")
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
