"""A Hugging Face config.json as the spec's model fields: which layout the planner counts it with, the shape fields the
file gives, transformers' defaults for those it leaves out, and why a file fits no layout. No I/O here
(hpcds.model_folder reads the file and counts a layout-less model on the meta device).

transformers saves config.json with only the values that differ from the config class's defaults (to_diff_dict in
transformers 4), so a real file may omit any field: Gemma 3 4B's text_config gives neither vocab_size nor
num_key_value_heads. The defaults below are the config classes' (tests/test_plan.py checks them against the installed
transformers); they are kept here because transformers' config code imports torch, which login-node commands never
do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hpcds.spec.model import MOE_NEEDS, SSM_LAYOUTS

# config.json model_type -> model.hf_arch: the block layout whose weights the planner counts. Mistral's and Phi-3's
# blocks hold the same weights as Llama's; Phi-3's too, fused into qkv_proj and gate_up_proj, which LoRA targets;
# falcon_mamba's mixer normalises B, C and dt without weights of its own.
HF_LAYOUTS = {
    "llama": "llama",
    "mistral": "llama",
    "phi3": "phi3",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi": "phi",
    "gptj": "gptj",
    "gpt_neox": "gpt_neox",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "mamba": "mamba",
    "falcon_mamba": "mamba",
    "mamba2": "mamba2",
}
# the text model of a multimodal config whose text_config names no model_type (transformers' own choice)
TEXT_MODEL_TYPES = {"gemma3": "gemma3_text"}

# spec field -> config.json keys, first found wins (Llama-like names first, GPT-2/GPT-J's after)
ATTENTION_KEYS = {
    "d_model": ("hidden_size", "n_embd"),
    "n_layer": ("num_hidden_layers", "n_layer"),
    "n_head": ("num_attention_heads", "n_head"),
    "n_kv_head": ("num_key_value_heads",),
    "attn_head_dim": ("head_dim",),
    "d_ff": ("intermediate_size", "n_inner"),
    "vocab_size": ("vocab_size",),
    "tie_embeddings": ("tie_word_embeddings",),
    "n_experts": ("num_local_experts", "num_experts"),
    "experts_per_token": ("num_experts_per_tok",),
    "expert_d_ff": ("moe_intermediate_size",),
    "shared_expert_d_ff": ("shared_expert_intermediate_size",),
}
SSM_KEYS = {
    "d_model": ("hidden_size",),
    "n_layer": ("num_hidden_layers",),
    "vocab_size": ("vocab_size",),
    "tie_embeddings": ("tie_word_embeddings",),
    "d_state": ("state_size",),
    "d_conv": ("conv_kernel",),
    "expand": ("expand",),
    "head_dim": ("head_dim",),
    "n_groups": ("n_groups",),
}
# what the layouts read beyond the shared shape fields
_LAYOUT_FIELDS = {
    **MOE_NEEDS,
    "mamba": ("d_state", "d_conv", "expand"),
    "mamba2": ("d_state", "d_conv", "expand", "head_dim", "n_groups"),
}
_SHARED_FIELDS = ("d_model", "n_layer", "n_head", "n_kv_head", "attn_head_dim", "d_ff", "vocab_size", "tie_embeddings")

# The config classes' defaults for the keys read above. None = derived by transformers from other fields, as the
# planner derives an unset field: num_key_value_heads = num_attention_heads, head_dim = hidden / heads, n_inner =
# 4 · n_embd.
HF_DEFAULTS: dict[str, dict[str, int | bool | None]] = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "tie_word_embeddings": False},
    "mistral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "tie_word_embeddings": False},
    "phi3": {"vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": None, "tie_word_embeddings": False},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False},
    "qwen3": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "tie_word_embeddings": False},
    "gemma2": {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
               "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "tie_word_embeddings": True},
    "gemma3_text": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "tie_word_embeddings": True},
    "phi": {"vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
            "num_attention_heads": 32, "num_key_value_heads": None, "tie_word_embeddings": False},
    "gptj": {"vocab_size": 50400, "n_embd": 4096, "n_inner": None, "n_layer": 28, "n_head": 16,
             "tie_word_embeddings": False},
    "gpt_neox": {"vocab_size": 50432, "hidden_size": 6144, "intermediate_size": 24576, "num_hidden_layers": 44,
                 "num_attention_heads": 64, "tie_word_embeddings": False},
    "mixtral": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "tie_word_embeddings": False,
                "num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                  "num_attention_heads": 16, "num_key_value_heads": 16, "tie_word_embeddings": False,
                  "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632},
    "qwen3_moe": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
                  "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": None, "tie_word_embeddings": False,
                  "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768},
    "mamba": {"vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 32, "state_size": 16, "conv_kernel": 4,
              "expand": 2, "tie_word_embeddings": True},
    "falcon_mamba": {"vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 32, "state_size": 16,
                     "conv_kernel": 4, "expand": 2, "tie_word_embeddings": True},
    "mamba2": {"vocab_size": 32768, "hidden_size": 4096, "num_hidden_layers": 64, "state_size": 128, "conv_kernel": 4,
               "expand": 2, "head_dim": 64, "n_groups": 8, "tie_word_embeddings": False},
}  # fmt: skip
# Settings a layout counts at one value (the class default, so a file that omits them fits). A file with another value
# builds weights the layout does not count: it is counted on the meta device instead.
LAYOUT_ASSUMES: dict[str, dict[str, object]] = {
    "llama": {"attention_bias": False, "mlp_bias": False},
    "qwen3": {"attention_bias": False},
    "gemma2": {"attention_bias": False},
    "gemma3_text": {"attention_bias": False},
    "phi": {"qk_layernorm": False},
    "gpt_neox": {"attention_bias": True},
    "qwen2_moe": {"qkv_bias": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "qwen3_moe": {"attention_bias": False, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "mamba": {"use_bias": False, "use_conv_bias": True},
    "falcon_mamba": {"use_bias": False, "use_conv_bias": True},
    "mamba2": {"use_bias": False, "use_conv_bias": True},
}


@dataclass(frozen=True)
class ConfigShape:
    """What one config.json says about the model's shape, in spec fields."""

    model_type: str | None
    arch: str | None  # the hf_arch that counts it; None: no layout fits (count it on the meta device)
    found: dict = field(default_factory=dict)  # field -> value the file gives
    defaults: dict = field(default_factory=dict)  # field -> transformers' default for a field the file omits
    absent: list = field(default_factory=list)  # fields neither gives: the planner's own rule applies
    departures: list = field(default_factory=list)  # settings that keep the file out of its model_type's layout


def text_config(config: dict) -> tuple[dict, str | None]:
    """The language model's config and model_type: a multimodal config keeps it in text_config."""
    top_type = config.get("model_type") if isinstance(config.get("model_type"), str) else None
    text = config.get("text_config")
    if not isinstance(text, dict):
        # a composite config written without text_config means the text model's defaults throughout
        return ({}, TEXT_MODEL_TYPES[top_type]) if top_type in TEXT_MODEL_TYPES else (config, top_type)
    text_type = text.get("model_type") if isinstance(text.get("model_type"), str) else None
    return text, text_type or TEXT_MODEL_TYPES.get(top_type, top_type)


def _is_value(name: str, value: object) -> bool:
    if name == "tie_embeddings":
        return isinstance(value, bool)
    return isinstance(value, int) and not isinstance(value, bool) and value > 0  # a stray `true` is not a size


def _departures(text: dict, model_type: str, layout: str | None) -> list[str]:
    found = [
        f"{key} {text[key]!r}"
        for key, assumed in LAYOUT_ASSUMES.get(model_type, {}).items()
        if key in text and text[key] != assumed
    ]
    hidden = text.get("hidden_size")
    if layout == "mamba" and isinstance(hidden, int):
        rank = text.get("time_step_rank", "auto")
        if rank not in ("auto", -(-hidden // 16)):  # the planner's dt rank is transformers' "auto", ceil(d / 16)
            found.append(f"time_step_rank {rank!r}")
        width = text.get("intermediate_size")
        if isinstance(width, int) and width % hidden:
            found.append(f"intermediate_size {width} (not a multiple of hidden_size)")
    if layout == "mamba2" and isinstance(hidden, int):
        heads, head = text.get("num_heads"), text.get("head_dim", 64)
        if isinstance(heads, int) and isinstance(head, int) and heads * head != text.get("expand", 2) * hidden:
            found.append(f"num_heads {heads} (not expand · hidden_size / head_dim)")
    return found


def read_shape(config: dict) -> ConfigShape:
    """The spec fields one config.json gives or implies, and the layout that counts it."""
    text, model_type = text_config(config)
    layout = HF_LAYOUTS.get(model_type or "")
    departures = _departures(text, model_type, layout) if model_type else []
    arch = layout if layout and not departures else None
    keys = SSM_KEYS if layout in SSM_LAYOUTS else ATTENTION_KEYS
    # a file no layout counts gives only the shared fields (the activations estimate reads them); experts and SSM
    # sizes would need a layout that uses them
    fields = [f for f in _SHARED_FIELDS if f in keys] + [
        f for f in _LAYOUT_FIELDS.get(arch or "", ()) if f not in _SHARED_FIELDS
    ]
    defaults_of = HF_DEFAULTS.get(model_type or "")
    found, from_defaults, absent = {}, {}, []
    for name in fields:
        given = [text[k] for k in keys[name] if _is_value(name, text.get(k))]
        default = defaults_of.get(keys[name][0], defaults_of.get(keys[name][-1])) if defaults_of else None
        if given:
            found[name] = given[0]
        elif default is not None:
            from_defaults[name] = default
        else:
            absent.append(name)
    if layout == "mamba" and isinstance(text.get("intermediate_size"), int) and "d_model" in found:
        # transformers' Mamba mixers are intermediate_size wide when the file says so, whatever its expand
        # (falcon-mamba-7b's file says expand 16 and intermediate_size 8192 = 2 · 4096)
        found["expand"] = text["intermediate_size"] // found["d_model"]
    return ConfigShape(
        model_type=model_type,
        arch=arch,
        found=found,
        defaults=from_defaults,
        absent=absent,
        departures=departures,
    )


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
# model.type mamba / mamba2 build their own config (hpcds.train.models) from these fields: a folder must agree
BUILT_IN_TYPES = {"mamba": ("mamba",), "mamba2": ("mamba2",)}


def fill_fields(model, shape: ConfigShape, where: str) -> tuple[dict, list[str], list[str]]:
    """(field -> value to set, notes, problems) for a spec's model section and the shape its folder's file gives.

    Fields the spec sets win. For hf a difference is a note (planned as set); for mamba / mamba2, whose trainer
    builds the model from the spec and refuses weights of another shape, it is a problem, as is a folder of another
    model_type.
    """
    update, notes, problems = {}, [], []
    built_in = model.type in BUILT_IN_TYPES
    if built_in and shape.model_type not in BUILT_IN_TYPES[model.type]:
        other = f"a {shape.model_type} model" if shape.model_type else "a config without model_type"
        return {}, [], [f"model.path: {where} describes {other}, not {model.type}; use model.type hf for it"]
    if built_in and shape.departures:
        problems.append(
            f"model.path: {where} sets {', '.join(shape.departures)}, which model.type {model.type} does not build; "
            "use model.type hf for it"
        )
    settable = {**shape.found, **shape.defaults}
    for name, value in settable.items():
        if name not in model.model_fields_set:
            update[name] = value
        elif getattr(model, name) != value:
            origin = where if name in shape.found else f"transformers' default for {shape.model_type}"
            spec_value = getattr(model, name)
            if built_in:
                problems.append(f"model.{name} is {spec_value} in the spec, {value} in {origin}")
            else:
                notes.append(f"model.{name} is {spec_value} in the spec, {value} in {origin}: planned as set")
    if model.type == "hf" and shape.arch and "hf_arch" not in model.model_fields_set:
        update["hf_arch"] = shape.arch
    elif model.type == "hf" and shape.arch and model.hf_arch != shape.arch:
        notes.append(f"model.hf_arch is {model.hf_arch} in the spec, {shape.arch} in {where}: planned as set")
    read = [f"model.{name}" for name in shape.found if name in update]
    read += ["model.hf_arch"] if "hf_arch" in update else []
    if read:
        notes.insert(0, f"read from {where}: " + ", ".join(read))
    defaulted = [f"model.{name} {update[name]}" for name in shape.defaults if name in update]
    unset = [name for name in shape.absent if name not in model.model_fields_set]
    if shape.model_type in HF_DEFAULTS:
        derived = [f"model.{name} {_PLANNED_WITHOUT[name]}" for name in unset if name in _PLANNED_WITHOUT]
        if defaulted or derived:
            notes.append(
                f"not in {where}, so transformers' defaults for model_type {shape.model_type!r}: "
                + ", ".join(defaulted + derived)
            )
    elif unset:
        planned = [f"model.{name} ({_PLANNED_WITHOUT.get(name, f'the spec default {getattr(model, name)}')})"
                   for name in unset]  # fmt: skip
        kind = f"model_type {shape.model_type!r}" if shape.model_type else "a config without model_type"
        notes.append(
            f"{where} gives no {', '.join(f'model.{name}' for name in unset)}, and the planner knows no "
            f"transformers defaults for {kind}: activations planned with " + ", ".join(planned)
        )
    return update, notes, problems


def needs_meta_count(model, shape: ConfigShape) -> bool:
    """An hf model no layout counts: neither the file's model_type nor the spec names one, and no n_params is set."""
    return model.type == "hf" and shape.arch is None and model.hf_arch is None and model.n_params is None


def why_no_layout(shape: ConfigShape, where: str) -> str:
    """One phrase for the notes and errors: why this file is counted on the meta device rather than by a layout."""
    if shape.departures:
        settings = ", ".join(shape.departures)
        return f"{where} has model_type {shape.model_type!r} with {settings}, which its layout does not count"
    if shape.model_type:
        return f"{where} has model_type {shape.model_type!r}, which the planner has no layout for"
    return f"{where} names no model_type"
