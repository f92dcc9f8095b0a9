"""The memory planner: parameter counts, per-GPU memory for every ZeRO stage and offload, and the strategy to use.

Parameter counts come from the architecture and equal what transformers builds (hpcds.plan_params). Model-state
bytes for 16-bit training equal DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs` /
`estimate_zero3_model_states_mem_needs`, zero_init on, buffer factor 1.5) when every weight trains; with LoRA only the
adapters carry gradients and optimizer states. ZeRO-0/1 and fp32 follow the same per-parameter bookkeeping.
Activations follow Korthikanti et al. 2022, Table 2, for GPT and the tensors the fused kernels save for backward for
Mamba; docs/memory.md derives every term. The recommendation is the first strategy in `STRATEGY_ORDER` (least
communication first) that fits. No I/O here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from hpcds.errors import HpcdsError
from hpcds.plan_params import ParamCount, attention_widths, count_params, is_tied
from hpcds.spec import JobSpec, ModelSpec

GIB = 2**30
HEADROOM_FRACTION = 0.10  # allocator fragmentation, DeepSpeed's communication buckets, temporary buffers
RESERVED_BYTES = 1 * GIB  # CUDA context, NCCL, cuBLAS workspaces: outside PyTorch's allocator
DS_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor default (CPU side only)
CHECKPOINT_BANDWIDTH_GB_S = 1.0  # aggregate write speed assumed for the checkpoint save estimate
MAMBA2_CHUNK_SIZE = 256  # transformers' Mamba2Config default
DS_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size


@dataclass(frozen=True)
class Strategy:
    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def name(self) -> str:
        offload = (
            " + optimizer+params→CPU" if self.offload_params else " + optimizer→CPU" if self.offload_optimizer else ""
        )
        return f"ZeRO-{self.stage}{offload}"


# Least communication first (the order of the DeepSpeed/transformers guide: 0 > 1 > 2 > 2+offload > 3 > 3+offload).
# ZeRO-1 with optimizer offload moves as much over PCIe as ZeRO-2 with it while keeping full gradients, so it never
# comes first; it stays for completeness.
STRATEGY_ORDER = (
    Strategy(0),
    Strategy(1),
    Strategy(2),
    Strategy(2, offload_optimizer=True),
    Strategy(1, offload_optimizer=True),
    Strategy(3),
    Strategy(3, offload_optimizer=True),
    Strategy(3, offload_optimizer=True, offload_params=True),
)


@dataclass(frozen=True)
class PlanRow:
    strategy: Strategy
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    cpu_bytes_per_node: int
    usable_bytes: int  # GPU memory minus headroom
    cpu_fits: bool = True
    buffers_bytes: int = 0  # DeepSpeed's gradient communication buckets

    @property
    def model_state_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_state_bytes + self.activations_bytes + self.buffers_bytes

    @property
    def headroom_bytes(self) -> int:
        """Usable memory left after this strategy; negative when it does not fit."""
        return self.usable_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0 and self.cpu_fits

    def to_dict(self) -> dict:
        return {
            "stage": self.strategy.stage,
            "offload_optimizer": self.strategy.offload_optimizer,
            "offload_params": self.strategy.offload_params,
            "name": self.strategy.name,
            "params_bytes": self.params_bytes,
            "grads_bytes": self.grads_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "activations_bytes": self.activations_bytes,
            "buffers_bytes": self.buffers_bytes,
            "total_bytes": self.total_bytes,
            "cpu_bytes_per_node": self.cpu_bytes_per_node,
            "headroom_bytes": self.headroom_bytes,
            "fits": self.fits,
        }


@dataclass
class Plan:
    rows: list[PlanRow]
    params: ParamCount
    flops_per_token: float
    recommended: PlanRow | None
    chosen: PlanRow | None  # the spec's own strategy when its zero_stage is not auto
    gpu_mem_bytes: int
    reserve_bytes: int
    world_size: int
    gpus_per_node: int
    nodes: int
    checkpoint_bytes: int
    notes: list[str] = field(default_factory=list)

    def row(self, strategy: Strategy) -> PlanRow:
        return next(r for r in self.rows if r.strategy == strategy)

    def to_dict(self) -> dict:
        return {
            "params": self.params.total,
            "param_count": asdict(self.params),
            "flops_per_token": self.flops_per_token,
            "gpu_mem_bytes": self.gpu_mem_bytes,
            "reserve_bytes": self.reserve_bytes,
            "world_size": self.world_size,
            "gpus_per_node": self.gpus_per_node,
            "nodes": self.nodes,
            "checkpoint_bytes": self.checkpoint_bytes,
            "checkpoint_save_s": checkpoint_save_s(self.checkpoint_bytes),
            "strategies": [r.to_dict() for r in self.rows],
            "recommended": self.recommended.to_dict() if self.recommended else None,
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "notes": list(self.notes),
        }


# ---------------------------------------------------------------------------------------------------------------------
# Memory


def model_state_bytes(
    strategy: Strategy, params: ParamCount, gpus_per_node: int, nodes: int, precision: str = "bf16"
) -> tuple[int, int, int, int]:
    """(params, grads, optimizer) bytes per GPU and CPU bytes per node for Adam-style training.

    For 16-bit precision and no frozen weights the GPU sum and the CPU figure are DeepSpeed's estimators, expression
    for expression (its float arithmetic and int() truncation included), so the numbers agree to the byte. With
    frozen weights (LoRA) gradients and optimizer states, on the GPU or offloaded, exist for trainable ones only.
    """
    world = nodes * gpus_per_node
    p, ll = params.trainable, params.largest_layer
    half = precision in ("bf16", "fp16")
    w = 2 if half else 4  # bytes of a weight as the model holds it
    frozen_gpu = params.frozen * w  # frozen weights: no gradient, no optimizer state
    stage, off_opt, off_par = strategy.stage, strategy.offload_optimizer, strategy.offload_params
    if stage == 3:
        cpu = _ds_zero3_cpu(params, gpus_per_node, nodes, off_opt, off_par)
        gather = 4 * ll  # DeepSpeed's largest-layer term: the gathered layer (weight + gradient, 16-bit)
        if off_par:
            return gather, 0, 0, cpu
        weights = int(w * p / world) + int(frozen_gpu / world)
        if off_opt:
            return gather + weights, 0, 0, cpu
        sharded = int((16 + w) * p / world)  # 16-bit: int(18 * P / N), DeepSpeed's expression
        grads = int(4 * p / world)
        return gather + weights, grads, sharded - int(w * p / world) - grads, cpu
    cpu = _ds_zero2_cpu(params, gpus_per_node, nodes, off_opt)
    weights = w * p + frozen_gpu
    # Per trainable parameter: gradient in the model's dtype (g16) plus, for 16-bit, the fp32 gradient partition (4),
    # fp32 master weights (4, skipped by plain fp32 ZeRO-0) and Adam's two moments (8).
    g16, g32 = (2, 4) if half else (4, 0)
    master = 4 if (half or stage > 0) else 0
    if off_opt:  # stages 1-2: the GPU keeps only weights (and ZeRO-1's unpartitioned 16-bit gradients)
        return weights, (g16 * p if stage == 1 else 0), 0, cpu
    if stage == 0:
        return weights, (g16 + g32) * p, (master + 8) * p, cpu
    sharded = int((g32 + master + 8 + (g16 if stage == 2 else 0)) * p / world)  # 16-bit ZeRO-2: int(18 * P / N)
    grads_sharded = int((g32 + (g16 if stage == 2 else 0)) * p / world)
    grads = grads_sharded + (g16 * p if stage == 1 else 0)
    return weights, grads, sharded - grads_sharded, cpu


# DeepSpeed's CPU figures split into what holds every weight and what holds optimizer state. The offloaded optimizer
# keeps 16 bytes per trainable parameter (fp32 master, Adam's two moments, fp32 gradient); loading (fp32 copies of the
# whole model) and offloaded ZeRO-3 parameters (16-bit) hold frozen weights too. With every parameter trainable the
# split expressions are DeepSpeed's own, integer for integer, so the full fine-tuning figures agree to the byte.


def _ds_zero2_cpu(params: ParamCount, gpus_per_node: int, nodes: int, offload: bool) -> int:
    total, trainable = params.total, params.trainable
    if offload:  # DeepSpeed: total · max(4 · GPUs in the job, 16): the larger of loading and optimizer state
        return int(max(total * 4 * nodes * gpus_per_node, trainable * 16) * DS_BUFFER_FACTOR)
    return int(total * 4 * gpus_per_node * DS_BUFFER_FACTOR)  # every rank first builds the model in fp32 on CPU


def _ds_zero3_cpu(params: ParamCount, gpus_per_node: int, nodes: int, off_opt: bool, off_par: bool) -> int:
    gpus_factor = 1 / nodes
    if off_opt:  # DeepSpeed: total · (18 or 16) / nodes = 2 bytes per offloaded weight + 16 per trained one
        held = (2 * params.total if off_par else 0) + 16 * params.trainable
        return int(held * gpus_factor * DS_BUFFER_FACTOR)
    return int(params.largest_layer * 4 * gpus_per_node * DS_BUFFER_FACTOR)


def bucket_bytes(spec: JobSpec, strategy: Strategy, params: ParamCount) -> int:
    """GPU bytes of DeepSpeed's gradient communication buffers, read from the DeepSpeed config hpcds renders.

    ZeRO-1/2 allocate `reduce_bucket_size` elements whole, twice with overlap_comm (double buffering), whatever the
    model's size; ZeRO-0 flattens at most that many gradient elements per all-reduce; ZeRO-3 holds a reduce bucket and
    a prefetch bucket.
    """
    from hpcds.render import render_ds_config  # pure; imported here because render pins through this module

    offload = {
        "zero_stage": strategy.stage,
        "offload_optimizer": "cpu" if strategy.offload_optimizer else "none",
        "offload_params": "cpu" if strategy.offload_params else "none",
    }
    try:
        as_run = spec.model_copy(update={"deepspeed": spec.deepspeed.model_copy(update=offload)})
        zero = render_ds_config(as_run).get("zero_optimization", {})
    except HpcdsError:
        zero = {}
    w = 4 if spec.training.precision == "fp32" else 2

    def elements(key: str, default: int) -> int:
        value = zero.get(key, default)
        return int(value) if isinstance(value, (int, float)) else default  # "auto" and the like: DeepSpeed's default

    reduce = elements("reduce_bucket_size", DS_BUCKET_ELEMENTS)
    if strategy.stage == 0:
        return min(reduce, params.trainable) * w
    if strategy.stage < 3:
        return reduce * w * (2 if zero.get("overlap_comm", False) else 1)
    return (reduce + elements("stage3_prefetch_bucket_size", DS_BUCKET_ELEMENTS)) * w


def activation_bytes(model: ModelSpec, micro_batch: int, seq_len: int, precision: str, checkpointing: bool) -> int:
    """Activation memory per GPU at its peak (end of forward), logits and loss included. docs/memory.md derives it."""
    b, s, v = micro_batch, seq_len, model.vocab_size
    a = 4 if precision == "fp32" else 2  # bytes per activation element
    if model.type in ("mamba", "mamba2"):
        d = model.d_model
        di, n = model.expand * d, model.d_state
        norm = 4 * d + 2 * a * d  # fp32 residual input saved by the RMSNorm, its normalised output, in_proj's input
        if model.type == "mamba":
            rank = math.ceil(d / 16)
            # mamba_inner_fn (checkpoint_lvl 1) keeps xz, x_dbl, B and C copies and the scan output; the conv output
            # and delta are recomputed in backward.
            per_token = norm + a * (2 * di + (rank + 2 * n) + 2 * n + di)
            scan_states = b * di * math.ceil(s / 2048) * 2 * n * 4  # fp32 chunk states of the selective scan
        else:
            heads, g = di // model.head_dim, model.n_groups
            # mamba_split_conv1d_scan_combined keeps zxbcdt (in_proj output), the scan output and the norm's rstd.
            per_token = norm + a * (2 * di + 2 * g * n + heads) + a * di + 4 * g
            scan_states = 0
        layer = b * s * per_token + scan_states
        layer_input = b * s * d * 4  # residual stream is fp32 (residual_in_fp32)
        final = b * s * norm  # norm_f saves what a block's norm does; the LM head keeps its input
    else:
        d = model.d_model or 0
        heads = model.n_head or max(1, d // 128)
        d_ff = model.d_ff or 4 * d
        # Korthikanti et al. Table 2 (t = 1): sbh(34 + 5as/h) bytes in 16-bit. Split by width: 16-bit tensors are
        # 8 sbh (LayerNorm inputs 2, attention 5, MLP input 1) + 2 sb·d_ff (GeLU in and out) + 2 as²b elements,
        # dropout masks 2 sbh + as²b bytes. At d_ff = 4h and 2 bytes: 32 + 2 = 34 sbh and 4 + 1 = 5 as²b.
        layer = a * (8 * b * s * d + 2 * b * s * d_ff + 2 * heads * s * s * b) + 2 * b * s * d + heads * s * s * b
        if model.type == "gpt2":
            # transformers' GPT-2 keeps no softmax (fused attention) but more elsewhere: its gelu_new keeps five
            # d_ff-wide tensors and K, V are copied (measured: 10 sbh + 5 sb·d_ff elements + fp32 log-sum-exp).
            # Short sequences on wide models exceed the paper's figure: plan for the larger.
            layer = max(layer, a * (10 * b * s * d + 5 * b * s * d_ff + 4 * b * s) + 4 * heads * s * b)
        layer_input = b * s * d * a
        final = b * s * (2 * a * d + 2 * a)  # ln_f input and statistics, the LM head's input
    logits = b * s * v * ((a + 4 + 4) if a == 2 else 8)  # logits, their fp32 copy, fp32 log-softmax for the loss
    if checkpointing:
        return model.n_layer * layer_input + layer + final + logits  # stored inputs + one layer being recomputed
    return model.n_layer * layer + final + logits


def flops_per_token(model: ModelSpec, params: ParamCount, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward, no recomputation): 6 per trained weight plus token mixing."""
    # Lookups cost no FLOPs: GPT-2's position table, and the input embedding when the head is untied (hf).
    untied_embedding = 0 if is_tied(model) else model.vocab_size * (model.d_model or 0)
    lookups = {"gpt2": model.max_seq_len * (model.d_model or 0), "hf": untied_embedding}
    matmul = params.total - lookups.get(model.type, 0)
    # 2 forward + 2 for the input gradient per weight, + 2 for the weight gradient of trainable ones (LoRA: adapters)
    dense = 4 * matmul + 2 * min(params.trainable, matmul)
    d = model.d_model or 0
    if model.type == "mamba":
        mixing = 9 * model.expand * d * model.d_state  # selective scan forward (Gu & Dao 2023, Sec. 3.3)
    elif model.type == "mamba2":
        di = model.expand * d
        mixing = 2 * MAMBA2_CHUNK_SIZE * (model.n_groups * model.d_state + di) + 4 * di * model.d_state
    else:
        width = attention_widths(model)[0] if model.type == "hf" and d else d  # n_head · head size
        mixing = 4 * seq_len * width  # attention scores and weighted values (PaLM's 6N + 12·L·H·Q·T)
    return float(dense + 3 * model.n_layer * mixing)


def checkpoint_bytes(params: ParamCount, precision: str) -> int:
    """Bytes one save writes: model weights, fp32 master weights and Adam's two moments for trainable weights."""
    w = 2 if precision in ("bf16", "fp16") else 4
    return params.total * w + params.trainable * (4 + 8)


def checkpoint_save_s(size_bytes: int, bandwidth_gb_s: float = CHECKPOINT_BANDWIDTH_GB_S) -> float:
    """Seconds to write `size_bytes` at an aggregate bandwidth in GB/s (10^9 bytes)."""
    return size_bytes / (bandwidth_gb_s * 1e9)


def parse_mem_bytes(text: str | None) -> int | None:
    """Slurm --mem ('256G', '500000' = MB) -> bytes; None for unset or 0 (= all of the node's memory)."""
    if not text or text == "0":
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    if text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text) * 2**20


def plan_job(spec: JobSpec, gpu_mem_gb: float | None = None) -> Plan:
    """Memory per GPU for every strategy, and the first strategy (least communication) that fits."""
    gpu_mem_bytes = int((gpu_mem_gb if gpu_mem_gb is not None else spec.slurm.gpu_mem_gb) * GIB)
    reserve = int(gpu_mem_bytes * HEADROOM_FRACTION) + RESERVED_BYTES
    usable = gpu_mem_bytes - reserve
    params = count_params(spec.model)
    train = spec.training
    precision = train.precision
    seq_len = spec.model.max_seq_len
    acts = activation_bytes(spec.model, train.micro_batch_size, seq_len, precision, train.activation_checkpointing)
    gpus, nodes = spec.slurm.ranks, spec.slurm.nodes
    node_mem = parse_mem_bytes(spec.slurm.mem)
    rows = []
    for strategy in STRATEGY_ORDER:
        p, g, o, cpu = model_state_bytes(strategy, params, gpus, nodes, precision)
        cpu_fits = node_mem is None or cpu <= node_mem
        buffers = bucket_bytes(spec, strategy, params)
        rows.append(PlanRow(strategy, p, g, o, acts, cpu, usable, cpu_fits, buffers))
    allowed = [r for r in rows if _allowed(spec, r.strategy)]
    recommended = next((r for r in allowed if r.fits), None)
    ds = spec.deepspeed
    fixed = Strategy(ds.zero_stage, ds.offload_optimizer != "none", ds.offload_params != "none")
    chosen = next((r for r in rows if r.strategy == fixed), None) if ds.zero_stage != "auto" else None
    notes = []
    if spec.model.type in ("mamba", "mamba2"):
        notes.append(
            "Mamba activations assume the fused kernels (pip install 'hpcds[gpu]'); the reference path keeps more"
        )
    return Plan(
        rows=rows,
        params=params,
        flops_per_token=flops_per_token(spec.model, params, seq_len),
        recommended=recommended,
        chosen=chosen,
        gpu_mem_bytes=gpu_mem_bytes,
        reserve_bytes=reserve,
        world_size=spec.world_size,
        gpus_per_node=gpus,
        nodes=nodes,
        checkpoint_bytes=checkpoint_bytes(params, precision),
        notes=notes,
    )


def _allowed(spec: JobSpec, strategy: Strategy) -> bool:
    """Strategies compatible with what the spec fixed: a stage that is not auto, offloads the person asked for."""
    ds = spec.deepspeed
    if ds.zero_stage != "auto" and strategy.stage != ds.zero_stage:
        return False
    if ds.offload_optimizer != "none" and not strategy.offload_optimizer:
        return False
    return not (ds.offload_params != "none" and not strategy.offload_params)


def pin_strategy(spec: JobSpec) -> JobSpec:
    """Resolve `deepspeed.zero_stage: auto` to the recommended stage and offloads; any other spec is returned as is."""
    if spec.deepspeed.zero_stage != "auto":
        return spec
    plan = plan_job(spec)
    row = plan.recommended
    if row is None:
        raise HpcdsError(_nothing_fits_message(spec, plan))
    ds = spec.deepspeed
    opt = ds.offload_optimizer if ds.offload_optimizer != "none" else "cpu"
    par = ds.offload_params if ds.offload_params != "none" else "cpu"
    update = {
        "zero_stage": row.strategy.stage,
        "offload_optimizer": opt if row.strategy.offload_optimizer else "none",
        "offload_params": par if row.strategy.offload_params else "none",
    }
    return spec.model_copy(update={"deepspeed": ds.model_copy(update=update)})


def _nothing_fits_message(spec: JobSpec, plan: Plan) -> str:
    best = min((r for r in plan.rows if _allowed(spec, r.strategy)), key=lambda r: r.total_bytes)
    lines = [
        f"no ZeRO strategy fits {plan.params.total / 1e9:.2f}B parameters on {plan.world_size} GPU(s) of "
        f"{plan.gpu_mem_bytes / GIB:.0f} GiB ({(plan.gpu_mem_bytes - plan.reserve_bytes) / GIB:.1f} GiB usable).",
        f"Smallest: {best.strategy.name} needs {best.total_bytes / GIB:.1f} GiB per GPU "
        f"(activations {best.activations_bytes / GIB:.1f} GiB) and {best.cpu_bytes_per_node / GIB:.0f} GiB CPU RAM "
        "per node.",
        "hint: add GPUs (--nodes / --gpus-per-node), offload (deepspeed.offload_optimizer: cpu), lower "
        "training.micro_batch_size, or set training.activation_checkpointing: true; `hpcds plan` shows the table",
    ]
    return "\n".join(lines)
