"""Parameter counts from the architecture: what transformers (and peft) build for a spec, tied weights once.

mamba, mamba2 and gpt2 follow the trainer's own configs (hpcds.train.models: tied embeddings, GPT-2 positions =
max_seq_len). `hf` models follow the block layout of `model.hf_arch` (Llama, Qwen2, Qwen3, Gemma 3) with grouped-query
attention (`n_kv_head`), an explicit head size (`attn_head_dim`) and a tied or untied output head; tests build the
transformers classes and compare, parameter for parameter. No I/O here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpcds.errors import HpcdsError
from hpcds.spec import ModelSpec

LORA_DEFAULT_TARGETS = {"gpt2": ["c_attn"], "hf": ["q_proj", "v_proj"]}  # peft's defaults (GPT-2; Llama, Qwen, Gemma)
# transformers' default tie_word_embeddings per hf_arch, for a spec (or config.json) that does not say
HF_TIED_BY_DEFAULT = {"llama": False, "qwen2": False, "qwen3": False, "gemma3": True}


@dataclass(frozen=True)
class ParamCount:
    total: int
    trainable: int
    frozen: int
    largest_layer: int  # most parameters held directly by one module: ZeRO-3 gathers it whole


def is_tied(model: ModelSpec) -> bool:
    """Whether the output head reuses the input embedding: always for the built-in families, per config for hf."""
    if model.tie_embeddings is not None:
        return model.tie_embeddings
    return model.type != "hf" or HF_TIED_BY_DEFAULT[model.hf_arch or "llama"]


def _hf_sizes(model: ModelSpec) -> tuple[int, int, int]:
    missing = [f"model.{name}" for name in ("d_model", "n_layer") if getattr(model, name) is None]
    if missing:
        raise HpcdsError(
            f"the planner needs {', '.join(missing)} (and model.vocab_size, model.d_ff) for model.type hf "
            f"({model.path}): it never downloads a config. Set them in the spec, or plan from a local folder that "
            "holds config.json"
        )
    return model.d_model, model.n_layer, model.d_ff or 4 * model.d_model


def attention_widths(model: ModelSpec) -> tuple[int, int, int | None]:
    """(query width, key/value width, head size) of an hf block: n_head · head, n_kv_head · head.

    Without n_head the block is taken as multi-head attention over the full hidden size (4·d² weights).
    """
    d = model.d_model
    if model.n_head is None:
        return d, d, None
    head = model.attn_head_dim or d // model.n_head
    return model.n_head * head, (model.n_kv_head or model.n_head) * head, head


def _hf_block(model: ModelSpec) -> dict[str, int]:
    """Parameters of one hf decoder block by module (linear layers by their transformers names)."""
    d, _, d_ff = _hf_sizes(model)
    q_width, kv_width, head = attention_widths(model)
    arch = model.hf_arch or "llama"
    biases = arch == "qwen2"  # Qwen2's q/k/v projections carry biases; o_proj and the MLP do not
    block = {
        "q_proj": d * q_width + (q_width if biases else 0),
        "k_proj": d * kv_width + (kv_width if biases else 0),
        "v_proj": d * kv_width + (kv_width if biases else 0),
        "o_proj": q_width * d,
        "gate_proj": d * d_ff,  # gated MLP (SwiGLU; Gemma 3's GeGLU has the same three matrices)
        "up_proj": d * d_ff,
        "down_proj": d_ff * d,
        # RMSNorms: before attention and MLP; Gemma 3 also normalises each branch's output
        "norms": (4 if arch == "gemma3" else 2) * d,
    }
    if arch in ("qwen3", "gemma3"):  # RMSNorm over each query and key head, one weight of head size each
        block["q_norm"] = block["k_norm"] = head or d
    return block


def _layer_modules(model: ModelSpec) -> dict[str, tuple[int, int]]:
    """Per block: LoRA-adaptable linear modules by name -> (in_features, out_features)."""
    d = model.d_model
    if model.type == "gpt2":
        d_ff = model.d_ff or 4 * d
        return {"c_attn": (d, 3 * d), "attn.c_proj": (d, d), "c_fc": (d, d_ff), "mlp.c_proj": (d_ff, d)}
    d, _, d_ff = _hf_sizes(model)
    q_width, kv_width, _ = attention_widths(model)
    return {
        "q_proj": (d, q_width),
        "k_proj": (d, kv_width),
        "v_proj": (d, kv_width),
        "o_proj": (q_width, d),
        "gate_proj": (d, d_ff),
        "up_proj": (d, d_ff),
        "down_proj": (d_ff, d),
    }


def _lora_params(model: ModelSpec) -> int:
    lora = model.lora
    modules = _layer_modules(model)
    targets = lora.target_modules or LORA_DEFAULT_TARGETS[model.type]
    count = 0
    for target in targets:
        # peft matches a target against the end of each module's dotted name, so "c_proj" means both of GPT-2's.
        matched = [shape for name, shape in modules.items() if name == target or name.endswith("." + target)]
        if not matched:
            valid = sorted({n.rsplit(".", 1)[-1] for n in modules})
            raise HpcdsError(f"model.lora.target_modules: no module named {target!r}; valid: {', '.join(valid)}")
        count += sum(lora.r * (fan_in + fan_out) for fan_in, fan_out in matched)
    return count * model.n_layer


def count_params(model: ModelSpec) -> ParamCount:
    """Parameters of the model transformers builds for this spec; tied weights once, LoRA adapters included."""
    v, n_layer = model.vocab_size, model.n_layer
    if model.type == "mamba":
        d = model.d_model
        di, n, rank = model.expand * d, model.d_state, math.ceil(d / 16)
        modules = {
            "norm": d,
            "in_proj": d * 2 * di,
            "conv1d": di * model.d_conv + di,
            "x_proj": di * (rank + 2 * n),
            "dt_proj": rank * di + di,
            "mixer": di * n + di,  # A_log and D sit on the mixer itself
            "out_proj": di * d,
        }
        layer, embedding, final = sum(modules.values()), v * d, d
    elif model.type == "mamba2":
        d = model.d_model
        di, g = model.expand * d, model.n_groups
        heads, conv_dim = di // model.head_dim, di + 2 * g * model.d_state
        modules = {
            "norm": d,
            "in_proj": d * (di + conv_dim + heads),  # z, x, B, C and dt in one projection
            "conv1d": conv_dim * model.d_conv + conv_dim,
            "mixer": 3 * heads,  # dt_bias, A_log, D
            "gated_norm": di,
            "out_proj": di * d,
        }
        layer, embedding, final = sum(modules.values()), v * d, d
    elif model.type == "gpt2":
        d, d_ff = model.d_model, model.d_ff or 4 * model.d_model
        modules = {
            "ln_1": 2 * d,
            "c_attn": d * 3 * d + 3 * d,
            "attn.c_proj": d * d + d,
            "ln_2": 2 * d,
            "c_fc": d * d_ff + d_ff,
            "mlp.c_proj": d_ff * d + d,
        }
        layer = sum(modules.values())
        modules["wpe"] = model.max_seq_len * d  # learned positions, n_positions = max_seq_len
        embedding, final = v * d + modules["wpe"], 2 * d
    else:
        d, n_layer, _ = _hf_sizes(model)
        modules = _hf_block(model)
        layer = sum(modules.values())
        # final RMSNorm, plus the LM head unless it is the embedding matrix itself
        embedding, final = v * d, d + (0 if is_tied(model) else v * d)
    total = embedding + n_layer * layer + final
    largest = max(v * model.d_model, *modules.values())
    trainable = _lora_params(model) if model.lora is not None else total
    total += trainable if model.lora is not None else 0
    return ParamCount(total=total, trainable=trainable, frozen=total - trainable, largest_layer=largest)
