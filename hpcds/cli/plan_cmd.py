"""`hpcds plan`: the memory table for every ZeRO stage and offload, and the strategy a run would pin.

Light on purpose (login nodes): it imports neither torch nor deepspeed. For `model.type: hf` a local folder's
config.json fills the shape fields the spec leaves unset, and the plan's notes say which; nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich import box
from rich.markup import escape
from rich.table import Table

from hpcds.cli import COMMAND_SETTINGS
from hpcds.cli.common import console, print_json, spec_options
from hpcds.errors import HpcdsError
from hpcds.plan import GIB, Plan, checkpoint_save_s, plan_job
from hpcds.spec import JobSpec, validate_spec

# spec fields -> config.json keys (Llama-like names first, GPT-2's after); hf_arch comes from model_type
_HF_CONFIG_KEYS = {
    "d_model": ("hidden_size", "n_embd", "d_model"),
    "n_layer": ("num_hidden_layers", "n_layer"),
    "n_head": ("num_attention_heads", "n_head"),
    "n_kv_head": ("num_key_value_heads",),
    "attn_head_dim": ("head_dim",),
    "d_ff": ("intermediate_size", "n_inner"),
    "vocab_size": ("vocab_size",),
    "tie_embeddings": ("tie_word_embeddings",),
}
# config.json model_type -> model.hf_arch (Mistral's blocks hold the same weights as Llama's)
_HF_ARCHES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}
# transformers saves config.json with only the values that differ from the config class's defaults (to_diff_dict
# in transformers 4), so a real file may omit any of these: Gemma 3 4B's text_config gives neither vocab_size nor
# num_key_value_heads. These are the classes' defaults (tests/test_plan.py checks them against the installed
# transformers). Not AutoConfig itself: transformers' config code imports torch, which login-node commands never do.
# None = derived as transformers derives it, which is what the planner does for an unset field: num_key_value_heads =
# num_attention_heads (model.n_kv_head unset), head_dim = hidden_size // num_attention_heads (model.attn_head_dim).
_HF_DEFAULTS = {
    "llama": (32000, 4096, 11008, 32, 32, None, None, False),
    "mistral": (32000, 4096, 14336, 32, 32, 8, None, False),
    "qwen2": (151936, 4096, 22016, 32, 32, 32, None, False),
    "qwen3": (151936, 4096, 22016, 32, 32, 32, 128, False),
    "gemma3_text": (262208, 2304, 9216, 26, 8, 4, 256, True),
}
_HF_DEFAULT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)
# the text model of a multimodal config whose text_config names no model_type (transformers' own choice)
_HF_TEXT_MODEL_TYPES = {"gemma3": "gemma3_text"}
# what the planner does with a field that neither the spec, config.json nor a known default gives
_PLANNED_WITHOUT = {
    "d_model": "needed (the planner asks for it)",
    "n_layer": "needed (the planner asks for it)",
    "n_head": "multi-head attention over the full width",
    "n_kv_head": "= n_head",
    "attn_head_dim": "= d_model / n_head",
    "d_ff": "= 4·d_model",
    "tie_embeddings": "the hf_arch's default",
}


def hf_config_defaults(model_type: str) -> dict[str, int | bool | None] | None:
    """transformers' config-class defaults for the keys the planner reads, or None for a model_type it has none for."""
    values = _HF_DEFAULTS.get(model_type)
    return dict(zip(_HF_DEFAULT_KEYS, values, strict=True)) if values is not None else None


def _text_config(config: dict) -> tuple[dict, str | None]:
    """The language model's config and model_type: a multimodal config keeps it in text_config."""
    top_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    text = config.get("text_config")
    if not isinstance(text, dict):
        # a composite config written without text_config means the text model's defaults throughout
        return ({}, _HF_TEXT_MODEL_TYPES[top_type]) if top_type in _HF_TEXT_MODEL_TYPES else (config, top_type)
    text_type = text.get("model_type") if isinstance(text.get("model_type"), str) else None
    return text, text_type or _HF_TEXT_MODEL_TYPES.get(top_type, top_type)


def _is_value(field: str, value: object) -> bool:
    if field == "tie_embeddings":
        return isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int: a stray `true` is not a size


def _config_values(config: dict) -> tuple[dict, dict, list[str], str | None]:
    """(spec fields the file gives, fields from transformers' defaults, fields neither gives, model_type).

    A default of None (derived by transformers from other fields, as the planner derives an unset field) is left out
    of both dicts and listed as neither given, like any field of a model_type without known defaults.
    """
    text, model_type = _text_config(config)
    defaults = hf_config_defaults(model_type) if model_type else None
    found, from_defaults, absent = {}, {}, []
    for name, keys in _HF_CONFIG_KEYS.items():
        given = [text[k] for k in keys if _is_value(name, text.get(k))]
        if given:
            found[name] = given[0]
        elif defaults is not None and defaults[keys[0]] is not None:
            from_defaults[name] = defaults[keys[0]]
        else:
            absent.append(name)
    if model_type in _HF_ARCHES:
        found["hf_arch"] = _HF_ARCHES[model_type]
    return found, from_defaults, absent, model_type


def _shape_notes(model, config_path: Path, update: dict, found: dict, from_defaults: dict, absent: list, model_type):
    """Where each filled field came from, and what the planner does for the fields nobody gives."""
    notes = []
    read = [f"model.{name}" for name in found if name in update]
    if read:
        notes.append(f"read from {config_path}: " + ", ".join(read))
    defaulted = [f"model.{name} {update[name]}" for name in from_defaults if name in update]
    unset = [name for name in absent if name not in model.model_fields_set]
    if hf_config_defaults(model_type or "") is not None:
        derived = [f"model.{name} {_PLANNED_WITHOUT[name]}" for name in unset]
        if defaulted or derived:
            notes.append(
                f"not in {config_path}, so transformers' defaults for model_type {model_type!r}: "
                + ", ".join(defaulted + derived)
            )
    elif unset:
        planned = [f"model.{name} ({_PLANNED_WITHOUT.get(name, f'the spec default {getattr(model, name)}')})"
                   for name in unset]  # fmt: skip
        kind = f"model_type {model_type!r}" if model_type else "a config without model_type"
        notes.append(
            f"{config_path} gives no {', '.join(f'model.{name}' for name in unset)}, and the planner knows no "
            f"transformers defaults for {kind}: planned with " + ", ".join(planned)
        )
    return notes


def with_local_hf_shape(spec: JobSpec) -> tuple[JobSpec, list[str]]:
    """Fill the shape fields an hf spec leaves unset from <model.path>/config.json; notes say what came from where.

    A field the file omits takes the config class's default, as transformers reads it. Fields the spec sets win;
    where they differ from the file (or its defaults), a note says so. Hub names are never resolved here.
    """
    model = spec.model
    if model.type != "hf" or not model.path:
        return spec, []
    config_path = Path(model.path) / "config.json"
    if not config_path.is_file():
        return spec, []  # the planner then says which fields it needs
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise HpcdsError(
            f"cannot read {config_path}: {exc}\nhint: fix the file, or set the model's shape in the spec "
            "(model.d_model, model.n_layer, ...)"
        ) from None
    if not isinstance(config, dict):
        raise HpcdsError(f"{config_path} is not a JSON object\nhint: point model.path at a Hugging Face model folder")
    found, from_defaults, absent, model_type = _config_values(config)
    update, differ = {}, []
    for values, where in ((found, str(config_path)), (from_defaults, f"transformers' default for {model_type}")):
        for name, value in values.items():
            if name not in model.model_fields_set:
                update[name] = value
            elif getattr(model, name) != value:
                spec_value = getattr(model, name)
                differ.append(f"model.{name} is {spec_value} in the spec, {value} in {where}: planned as set")
    notes = _shape_notes(model, config_path, update, found, from_defaults, absent, model_type) + differ
    if model_type not in _HF_ARCHES and "hf_arch" not in model.model_fields_set:
        unknown = (
            f"has model_type {model_type!r}, which the planner has no layout for"
            if model_type
            else "names no model_type"
        )
        notes.append(f"{config_path} {unknown}: counted as Llama blocks (no biases, two norms per block)")
    if not update:
        return spec, notes
    tree = spec.model_dump(mode="json")
    tree["model"].update(update)
    return validate_spec(tree, str(config_path)), notes


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
    spec, shape_notes = with_local_hf_shape(spec)
    plan = plan_job(spec, gpu_mem_gb)
    plan.notes[:0] = shape_notes
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
