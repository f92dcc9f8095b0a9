"""Memory per GPU and per node for one ZeRO strategy: model states, DeepSpeed's buffers, activations; FLOPs per token.

Parameter counts come from the architecture and equal what transformers builds (hpcds.plan.params). Model-state
bytes for 16-bit training equal DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs` /
`estimate_zero3_model_states_mem_needs`, zero_init on, buffer factor 1.5) when every weight trains; with LoRA only the
adapters carry gradients and optimizer states. ZeRO-0/1 and fp32 follow the same per-parameter bookkeeping.
Activations follow Korthikanti et al. 2022, Table 2, for GPT and the tensors the fused kernels save for backward for
Mamba; docs/memory.md derives every term. The communication buckets are chosen here (`zero_buckets`) and written
into the DeepSpeed config by hpcds.render, so the plan counts what the run will allocate. No I/O here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hpcds.plan.params import ParamCount, attention_widths, is_tied, mlp_width_per_token
from hpcds.spec import JobSpec, ModelSpec
from hpcds.spec.model import SSM_LAYOUTS

GIB = 2**30
HEADROOM_FRACTION = 0.10  # allocator fragmentation, DeepSpeed's communication buckets, temporary buffers
RESERVED_BYTES = 1 * GIB  # CUDA context, NCCL, cuBLAS workspaces: outside PyTorch's allocator
DS_BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor default (CPU side only)
CHECKPOINT_BANDWIDTH_GB_S = 1.0  # aggregate write speed assumed for the checkpoint save estimate
MAMBA2_CHUNK_SIZE = 256  # transformers' Mamba2Config default
# DeepSpeed's default reduce/allgather bucket size in elements, which suits models from ~100M parameters up.
DS_BUCKET_ELEMENTS = 500_000_000


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


def zero_buckets(spec: JobSpec, stage: int) -> dict[str, Any]:
    """The communication settings hpcds chooses for a ZeRO stage (the DeepSpeed config's `zero_optimization` holds
    them, under whatever `deepspeed.config` sets there)."""
    if stage == 0:
        return {}
    if stage in (1, 2):
        return {
            "overlap_comm": True,
            "contiguous_gradients": True,
            "allgather_partitions": True,
            "allgather_bucket_size": DS_BUCKET_ELEMENTS,
            "reduce_scatter": True,
            "reduce_bucket_size": DS_BUCKET_ELEMENTS,
        }
    # Stage 3 buckets scale with the hidden size (the rule transformers' "auto" values use): hidden**2 elements per
    # reduce bucket, 90% of that per prefetch, and parameters under 10 * hidden stay unpartitioned.
    hidden = spec.model.d_model
    return {
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": hidden * hidden if hidden else DS_BUCKET_ELEMENTS,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden) if hidden else DS_BUCKET_ELEMENTS,
        "stage3_param_persistence_threshold": 10 * hidden if hidden else 1_000_000,
    }


def bucket_bytes(spec: JobSpec, strategy: Strategy, params: ParamCount) -> int:
    """GPU bytes of DeepSpeed's gradient communication buffers, from the buckets the run's config will hold.

    ZeRO-1/2 allocate `reduce_bucket_size` elements whole, twice with overlap_comm (double buffering), whatever the
    model's size; ZeRO-0 flattens at most that many gradient elements per all-reduce; ZeRO-3 holds a reduce bucket and
    a prefetch bucket.
    """
    raw = spec.deepspeed.config.get("zero_optimization")
    set_by_user = {k: v for k, v in raw.items() if v != "auto"} if isinstance(raw, dict) else {}  # "auto": ours
    zero = {**zero_buckets(spec, strategy.stage), **set_by_user}
    w = 4 if spec.training.precision == "fp32" else 2

    def elements(key: str) -> int:
        value = zero.get(key, DS_BUCKET_ELEMENTS)
        return int(value) if isinstance(value, (int, float)) else DS_BUCKET_ELEMENTS  # "auto": DeepSpeed's default

    reduce = elements("reduce_bucket_size")
    if strategy.stage == 0:
        return min(reduce, params.trainable) * w
    if strategy.stage < 3:
        return reduce * w * (2 if zero.get("overlap_comm", False) else 1)
    return (reduce + elements("stage3_prefetch_bucket_size")) * w


def activation_bytes(model: ModelSpec, micro_batch: int, seq_len: int, precision: str, checkpointing: bool) -> int:
    """Activation memory per GPU at its peak (end of forward), logits and loss included. docs/memory.md derives it."""
    b, s, v = micro_batch, seq_len, model.vocab_size
    a = 4 if precision == "fp32" else 2  # bytes per activation element
    family = model.layout
    if family in SSM_LAYOUTS:
        d = model.d_model
        di, n = model.expand * d, model.d_state
        norm = 4 * d + 2 * a * d  # fp32 residual input saved by the RMSNorm, its normalised output, in_proj's input
        if family == "mamba":
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
        d_ff = mlp_width_per_token(model)  # a mixture of experts: the experts a token is routed to
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
    """Training FLOPs per token (forward + backward, no recomputation): 6 per trained weight plus token mixing.

    A mixture of experts counts the parameters a token passes through (`params.active_per_token`), not all of them.
    """
    # Lookups cost no FLOPs: GPT-2's position table, and the input embedding when the head is untied.
    untied_embedding = 0 if is_tied(model) else model.vocab_size * (model.d_model or 0)
    lookups = {"gpt2": model.max_seq_len * (model.d_model or 0), "hf": untied_embedding}
    lookups |= {family: untied_embedding for family in SSM_LAYOUTS}
    matmul = params.active_per_token - lookups.get(model.type, 0)
    # 2 forward + 2 for the input gradient per weight, + 2 for the weight gradient of trainable ones (LoRA: adapters)
    dense = 4 * matmul + 2 * min(params.trainable, matmul)
    d = model.d_model or 0
    family = model.layout
    if family == "mamba":
        mixing = 9 * model.expand * d * model.d_state  # selective scan forward (Gu & Dao 2023, Sec. 3.3)
    elif family == "mamba2":
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


def snapshot_bytes_per_node(params: ParamCount, precision: str, stage: int, ranks_per_node: int, nodes: int) -> int:
    """Host memory an asynchronous save's copy holds on the node of rank 0, the fullest: what its ranks write of one
    checkpoint (`checkpoint_bytes`): the weights whole (rank 0 writes them below ZeRO-3; under it each rank its
    partition) and the optimizer states, from rank 0 alone under ZeRO-0 and partitioned over every rank above it."""
    w = 2 if precision in ("bf16", "fp16") else 4
    share = ranks_per_node / max(1, ranks_per_node * nodes)
    weights = params.total * w * (share if stage == 3 else 1)
    optimizer = params.trainable * (4 + 8) * (share if stage >= 1 else 1)
    return int(weights + optimizer)


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
