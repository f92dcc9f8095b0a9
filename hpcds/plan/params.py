"""Parameter counts from the architecture: what transformers (and peft) build for a spec, tied weights once.

mamba, mamba2 and gpt2 follow the trainer's own configs (hpcds.train.models: GPT-2 positions = max_seq_len). `hf`
models follow the block layout of `model.hf_arch`: the Llama family (grouped-query attention, `n_kv_head`, an
explicit head size `attn_head_dim`), phi-2, GPT-J, GPT-NeoX, the mixture-of-experts layouts (total and active
parameters) and Mamba / Mamba-2 folders; `model.n_params` (a meta-device count of a layout-less folder) replaces the
layout. Tests build the transformers classes and compare, parameter for parameter. No I/O here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hpcds.errors import HpcdsError
from hpcds.spec import ModelSpec
from hpcds.spec.model import MOE_ARCHES, MOE_FIELDS, SSM_LAYOUTS

# peft's default LoRA targets (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) per layout; a layout without one
# (qwen2_moe, qwen3_moe, mamba) needs model.lora.target_modules, as peft does.
LORA_DEFAULT_TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt_neox": ["query_key_value"],
}
# transformers' default tie_word_embeddings per hf_arch, for a spec (or config.json) that does not say
HF_TIED_BY_DEFAULT = {"gemma2": True, "gemma3": True, "mamba": True}


@dataclass(frozen=True)
class ParamCount:
    total: int
    trainable: int
    frozen: int
    largest_layer: int  # most parameters held directly by one module: ZeRO-3 gathers it whole
    active: int | None = None  # mixture of experts: parameters one token passes through; None = all of them

    @property
    def active_per_token(self) -> int:
        return self.total if self.active is None else self.active


def is_tied(model: ModelSpec) -> bool:
    """Whether the output head reuses the input embedding: the spec's word, else the layout's default."""
    if model.tie_embeddings is not None:
        return model.tie_embeddings
    return model.type != "hf" or HF_TIED_BY_DEFAULT.get(model.layout, False)


def _hf_sizes(model: ModelSpec) -> tuple[int, int, int]:
    missing = [f"model.{name}" for name in ("d_model", "n_layer") if getattr(model, name) is None]
    if missing:
        where = f"model.type {model.type}" + (f" ({model.path})" if model.path else "")
        raise HpcdsError(
            f"the planner needs {', '.join(missing)} (and model.vocab_size, model.d_ff) for {where}: it never "
            "downloads a config. Set them in the spec, or plan from a local folder that holds config.json"
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


def mlp_width_per_token(model: ModelSpec) -> int:
    """MLP width one token passes through: d_ff, or for a mixture of experts its experts' and the shared expert's."""
    d_ff = model.d_ff or 4 * (model.d_model or 0)
    if model.layout not in MOE_ARCHES:
        return d_ff
    return model.experts_per_token * (model.expert_d_ff or d_ff) + (model.shared_expert_d_ff or 0)


def _mamba_block(model: ModelSpec) -> dict[str, int]:
    """One Mamba block by module; the planner counts transformers' defaults (no in/out projection biases)."""
    d = model.d_model
    di, n, rank = model.expand * d, model.d_state, math.ceil(d / 16)
    return {
        "norm": d,
        "in_proj": d * 2 * di,
        "conv1d": di * model.d_conv + di,
        "x_proj": di * (rank + 2 * n),
        "dt_proj": rank * di + di,
        "mixer": di * n + di,  # A_log and D sit on the mixer itself
        "out_proj": di * d,
    }


def _mamba2_block(model: ModelSpec) -> dict[str, int]:
    d = model.d_model
    di, g = model.expand * d, model.n_groups
    heads, conv_dim = di // model.head_dim, di + 2 * g * model.d_state
    return {
        "norm": d,
        "in_proj": d * (di + conv_dim + heads),  # z, x, B, C and dt in one projection
        "conv1d": conv_dim * model.d_conv + conv_dim,
        "mixer": 3 * heads,  # dt_bias, A_log, D
        "gated_norm": di,
        "out_proj": di * d,
    }


def _attention(model: ModelSpec, arch: str) -> dict[str, int]:
    """The attention projections of one block, named as transformers names them."""
    d = model.d_model
    if arch in ("gptj", "gpt_neox"):  # full multi-head attention over the hidden size
        if arch == "gptj":  # no biases
            return {"q_proj": d * d, "k_proj": d * d, "v_proj": d * d, "out_proj": d * d}
        return {"query_key_value": d * 3 * d + 3 * d, "dense": d * d + d}
    q_width, kv_width, head = attention_widths(model)
    qkv_bias = arch in ("qwen2", "qwen2_moe", "phi")  # biases on q/k/v (phi: on its output projection too)
    block = {
        "q_proj": d * q_width + (q_width if qkv_bias else 0),
        "k_proj": d * kv_width + (kv_width if qkv_bias else 0),
        "v_proj": d * kv_width + (kv_width if qkv_bias else 0),
    }
    if arch == "phi":
        block["dense"] = q_width * d + d
    else:
        block["o_proj"] = q_width * d
    if arch in ("qwen3", "gemma3", "qwen3_moe"):  # RMSNorm over each query and key head, one weight of head size each
        block["q_norm"] = block["k_norm"] = head or d
    return block


def _mlp(model: ModelSpec, arch: str) -> dict[str, int]:
    d, _, d_ff = _hf_sizes(model)
    if arch == "phi":
        return {"fc1": d * d_ff + d_ff, "fc2": d_ff * d + d}
    if arch == "gptj":
        return {"fc_in": d * d_ff + d_ff, "fc_out": d_ff * d + d}
    if arch == "gpt_neox":
        return {"dense_h_to_4h": d * d_ff + d_ff, "dense_4h_to_h": d_ff * d + d}
    if arch in MOE_ARCHES:
        # transformers 5 holds every expert's gate/up and down weights as two 3-D parameters of one module
        experts, expert_ff = model.n_experts, model.expert_d_ff or d_ff
        block = {"router": d * experts, "experts": experts * 3 * d * expert_ff}
        if arch == "qwen2_moe":  # a shared expert every token passes, scaled by a sigmoid gate
            shared = model.shared_expert_d_ff
            block |= {"shared_expert.gate_proj": d * shared, "shared_expert.up_proj": d * shared}
            block |= {"shared_expert.down_proj": shared * d, "shared_expert_gate": d}
        return block
    # gated MLP (SwiGLU; Gemma's GeGLU has the same three matrices)
    return {"gate_proj": d * d_ff, "up_proj": d * d_ff, "down_proj": d_ff * d}


def _norms(model: ModelSpec, arch: str) -> int:
    """Normalisation weights of one block: RMSNorms (d each) or LayerNorms with biases (2d each)."""
    d = model.d_model
    if arch in ("phi", "gptj"):  # one LayerNorm feeds the parallel attention and MLP
        return 2 * d
    if arch == "gpt_neox":
        return 2 * 2 * d
    # before attention and MLP; Gemma 2 and 3 also normalise each branch's output
    return (4 if arch in ("gemma2", "gemma3") else 2) * d


def _hf_block(model: ModelSpec) -> dict[str, int]:
    """Parameters of one hf decoder block by module (linear layers by their transformers names)."""
    arch = model.layout
    _hf_sizes(model)
    given = [f"model.{name}" for name in MOE_FIELDS if getattr(model, name) is not None]
    if given and arch not in MOE_ARCHES:
        raise HpcdsError(
            f"{', '.join(given)} set, but the layout is {arch}\nhint: set model.hf_arch to mixtral, qwen2_moe or "
            "qwen3_moe (or plan from a local folder whose config.json names it)"
        )
    return {**_attention(model, arch), **_mlp(model, arch), "norms": _norms(model, arch)}


def _hf_ends(model: ModelSpec, arch: str) -> tuple[int, int, int, int]:
    """(embedding, final norm, output head's own parameters, the head module's) of an hf model.

    A tied head owns only its bias, but the module still holds the shared weight, which ZeRO-3 gathers with it.
    """
    v, d = model.vocab_size, model.d_model
    head_bias = v if arch in ("phi", "gptj") else 0  # their LM heads carry a bias, even when the weight is tied
    head = head_bias + (0 if is_tied(model) else v * d)
    final = 2 * d if arch in ("phi", "gptj", "gpt_neox") else d  # LayerNorm (weight and bias) or RMSNorm
    return v * d, final, head, v * d + head_bias


def _layer_modules(model: ModelSpec) -> dict[str, tuple[int, int]]:
    """Per block: LoRA-adaptable linear modules by name -> (in_features, out_features)."""
    d = model.d_model
    arch = model.layout
    if arch == "gpt2":
        d_ff = model.d_ff or 4 * d
        return {"c_attn": (d, 3 * d), "attn.c_proj": (d, d), "c_fc": (d, d_ff), "mlp.c_proj": (d_ff, d)}
    if arch in SSM_LAYOUTS:
        di = model.expand * d
        if arch == "mamba2":
            heads, conv_dim = di // model.head_dim, di + 2 * model.n_groups * model.d_state
            return {"in_proj": (d, di + conv_dim + heads)}
        # peft refuses out_proj and conv1d of Mamba models (its kernels bypass them): not adaptable
        rank = math.ceil(d / 16)
        return {"in_proj": (d, 2 * di), "x_proj": (di, rank + 2 * model.d_state), "dt_proj": (rank, di)}
    d, _, d_ff = _hf_sizes(model)
    q_width, kv_width, _ = attention_widths(model)
    if arch == "gpt_neox":
        return {"query_key_value": (d, 3 * d), "attention.dense": (d, d), "dense_h_to_4h": (d, d_ff),
                "dense_4h_to_h": (d_ff, d)}  # fmt: skip
    modules = {"q_proj": (d, q_width), "k_proj": (d, kv_width), "v_proj": (d, kv_width)}
    if arch == "gptj":
        return modules | {"out_proj": (d, d), "fc_in": (d, d_ff), "fc_out": (d_ff, d)}
    if arch == "phi":
        return modules | {"dense": (q_width, d), "fc1": (d, d_ff), "fc2": (d_ff, d)}
    if arch == "phi3":  # Llama's weights, q/k/v and gate/up fused into one matrix each
        return {"qkv_proj": (d, q_width + 2 * kv_width), "o_proj": (q_width, d), "gate_up_proj": (d, 2 * d_ff),
                "down_proj": (d_ff, d)}  # fmt: skip
    modules["o_proj"] = (q_width, d)
    if arch in ("mixtral", "qwen3_moe"):  # the experts are 3-D parameters, not linear layers peft can adapt
        return modules
    if arch == "qwen2_moe":
        shared = model.shared_expert_d_ff
        return modules | {"shared_expert.gate_proj": (d, shared), "shared_expert.up_proj": (d, shared),
                          "shared_expert.down_proj": (shared, d), "shared_expert_gate": (d, 1)}  # fmt: skip
    return modules | {"gate_proj": (d, d_ff), "up_proj": (d, d_ff), "down_proj": (d_ff, d)}


def _lora_params(model: ModelSpec) -> int:
    lora = model.lora
    if model.n_params is not None:
        raise HpcdsError(
            "model.lora: the planner counts LoRA adapters from a block layout, and this model has none "
            "(model.n_params is set)\nhint: set model.hf_arch to the layout whose module names the adapters target "
            "and the shape fields, or train every weight"
        )
    modules = _layer_modules(model)
    arch = model.layout
    targets = lora.target_modules or LORA_DEFAULT_TARGETS.get(arch)
    if not targets:
        raise HpcdsError(
            f"model.lora.target_modules: peft has no default for the {arch} layout\nhint: name the modules, "
            f"e.g. target_modules: [{', '.join(list(modules)[:2])}]"
        )
    count = 0
    for target in targets:
        # peft matches a target against the end of each module's dotted name, so "c_proj" means both of GPT-2's.
        matched = [shape for name, shape in modules.items() if name == target or name.endswith("." + target)]
        if not matched:
            valid = sorted({n.rsplit(".", 1)[-1] for n in modules})
            raise HpcdsError(f"model.lora.target_modules: no module named {target!r}; valid: {', '.join(valid)}")
        count += sum(lora.r * (fan_in + fan_out) for fan_in, fan_out in matched)
    return count * model.n_layer


def _given_count(model: ModelSpec) -> tuple[int, int]:
    """(total, largest module) for a spec whose total is given (model.n_params, from a meta-device count).

    The largest module is not known without the layout: the larger of the embedding and one block's average share
    of the rest, which no module of a block exceeds when the blocks are alike (ZeRO-3 gathers the largest whole).
    """
    d, n_layer, _ = _hf_sizes(model)  # the activation estimate needs them whatever gives the total
    total = model.n_params
    embedding = model.vocab_size * d
    per_block = (total - embedding) // n_layer
    return total, max(embedding, per_block)


def count_params(model: ModelSpec) -> ParamCount:
    """Parameters of the model transformers builds for this spec; tied weights once, LoRA adapters included."""
    v, n_layer, arch = model.vocab_size, model.n_layer, model.layout
    active = None
    if model.type == "hf" and model.n_params is not None:
        total, largest = _given_count(model)
        trainable = _lora_params(model) if model.lora is not None else total
        total += trainable if model.lora is not None else 0
        return ParamCount(total=total, trainable=trainable, frozen=total - trainable, largest_layer=largest)
    if arch in SSM_LAYOUTS:
        d, n_layer, _ = _hf_sizes(model)
        modules = _mamba_block(model) if arch == "mamba" else _mamba2_block(model)
        layer, embedding, final = sum(modules.values()), v * d, d
        modules["lm_head"] = 0 if is_tied(model) else v * d
        final += modules["lm_head"]
    elif arch == "gpt2":
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
        embedding, norm, head, modules["lm_head"] = _hf_ends(model, arch)
        final = norm + head
        if "experts" in modules:  # a token passes experts_per_token of n_experts experts in every block
            idle = modules["experts"] * (model.n_experts - model.experts_per_token) // model.n_experts
            active = embedding + n_layer * (layer - idle) + final
    total = embedding + n_layer * layer + final
    largest = max(v * model.d_model, *modules.values())
    trainable = _lora_params(model) if model.lora is not None else total
    total += trainable if model.lora is not None else 0
    if active is not None and model.lora is not None:
        active += trainable
    return ParamCount(total=total, trainable=trainable, frozen=total - trainable, largest_layer=largest, active=active)
