"""Models from the job spec's `model` section, all through transformers, built from a config and never downloaded.

`mamba` -> MambaForCausalLM, `mamba2` -> Mamba2ForCausalLM, `gpt2` -> GPT2LMHeadModel, `hf` -> any local causal-LM
folder (its weights, or a fresh init when the folder holds only config.json). Weights are initialised from `seed`
alone, without touching the caller's global RNG. Dropout is off everywhere (LoRA's own dropout excepted). Which
implementation runs Mamba's scan is hpcds.train.kernels' decision; on the reference path Mamba-1 uses the `mambapy`
parallel scan where it can, which is many times faster on CPU than the sequential scan. Input/output embeddings are
tied as in mamba-ssm and GPT-2, except for a mamba / mamba2 spec with `model.tie_embeddings: false` (falcon-mamba's
head is its own matrix).
"""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

from hpcds.errors import HpcdsError


def _no_dropout(config) -> None:
    for key, value in list(config.to_dict().items()):
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)


def model_config(model, *, mambapy: bool | None = None):
    """The transformers config for a mamba / mamba2 / gpt2 spec (hf models bring their own). `mambapy`: Mamba-1's
    reference path uses mambapy's parallel scan (default: when mambapy is installed; the fused kernels ignore it)."""
    from transformers import GPT2Config, Mamba2Config, MambaConfig

    if model.type == "mamba":
        return MambaConfig(
            vocab_size=model.vocab_size,
            hidden_size=model.d_model,
            num_hidden_layers=model.n_layer,
            state_size=model.d_state,
            conv_kernel=model.d_conv,
            expand=model.expand,
            use_mambapy=importlib.util.find_spec("mambapy") is not None if mambapy is None else mambapy,
            tie_word_embeddings=model.tie_embeddings is not False,
        )
    if model.type == "mamba2":
        return Mamba2Config(
            vocab_size=model.vocab_size,
            hidden_size=model.d_model,
            num_hidden_layers=model.n_layer,
            state_size=model.d_state,
            conv_kernel=model.d_conv,
            expand=model.expand,
            head_dim=model.head_dim,
            num_heads=model.expand * model.d_model // model.head_dim,
            n_groups=model.n_groups,
            tie_word_embeddings=model.tie_embeddings is not False,
        )
    if model.type == "gpt2":
        return GPT2Config(
            vocab_size=model.vocab_size,
            n_embd=model.d_model,
            n_layer=model.n_layer,
            n_head=model.n_head,
            n_positions=model.max_seq_len,
            n_inner=model.d_ff,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            # GPT-2's end-of-text id (50256) lies outside smaller vocabularies.
            bos_token_id=min(50256, model.vocab_size - 1),
            eos_token_id=min(50256, model.vocab_size - 1),
        )
    raise ValueError(f"no built-in config for model type {model.type}")


def build_model(
    model, *, seed: int, zero3_config: dict | None = None, pretrained: bool = True, mambapy: bool | None = None
):
    """A fresh (or, for `hf`, loaded) causal LM in fp32 on CPU; LoRA-wrapped when `model.lora` is set.

    With `zero3_config` (the run's DeepSpeed config, ZeRO stage 3) the model is built inside DeepSpeed's `zero.Init`:
    every parameter is partitioned as it is created (and `from_pretrained` loads weights shard by shard), so no rank
    ever holds the whole model, which is what lets a model larger than one GPU's (or one rank's share of host) memory
    start at all. A built-in family with `model.path` starts from those weights; `pretrained=False` (a resume, whose
    checkpoint overwrites every weight) builds it from its config without reading the folder. `mambapy`: as in
    model_config (the trainer passes its kernel choice's).
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model.type != "hf" and model.path and pretrained:
            # Loaded whole on each rank, outside zero.Init: GPT-2's position table may need cutting, which a
            # partitioned tensor does not allow (the built-in families' checkpoints are a few GB at most).
            net = _load_pretrained(model, mambapy)
        else:
            with _zero3_init(zero3_config):
                net = _load_hf(model.path) if model.type == "hf" else _build(model, zero3_config is not None, mambapy)
        if model.lora is not None:
            net = _with_lora(net, model.lora)
    net.train()
    return net


def _build(model, zero3: bool, mambapy: bool | None):
    import transformers

    config = model_config(model, mambapy=mambapy)
    if zero3:
        # from_config, not the class: under ZeRO-3 it builds inside zero.Init and then initialises each module's
        # gathered weights on rank 0 (the class's own init would write into empty shards).
        from transformers.integrations import deepspeed as hf_deepspeed

        if not hasattr(hf_deepspeed, "initialize_weights_zero3"):
            raise HpcdsError(
                f"ZeRO-3 builds of {model.type} models need a newer transformers (this is {transformers.__version__}: "
                "it cannot initialise partitioned weights)\nhint: pip install -U transformers, or use ZeRO 0-2"
            )
        return transformers.AutoModelForCausalLM.from_config(config)
    classes = {
        "mamba": transformers.MambaForCausalLM,
        "mamba2": transformers.Mamba2ForCausalLM,
        "gpt2": transformers.GPT2LMHeadModel,
    }
    return classes[model.type](config)


@contextlib.contextmanager
def _zero3_init(ds_config: dict | None):
    """transformers' HfDeepSpeedConfig: while it lives, from_pretrained / from_config build inside zero.Init."""
    if ds_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    # transformers keeps only a weak reference: this object must stay alive while the model is built.
    hf_config = HfDeepSpeedConfig(ds_config)
    yield
    del hf_config


def _local_config(path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise HpcdsError(
            f"model.path {path!r}: no local model config found ({exc.__class__.__name__})"
            "\nhint: hpcds never downloads models (compute nodes are offline); download on a machine with internet, "
            "e.g. `huggingface-cli download NAME --local-dir DIR`, and set model.path to DIR"
        ) from None


# The config fields that fix a built-in family's weight shapes: pretrained weights must agree with the spec on them
# (hpcds.spec.hf_config fills the spec's unset fields from the same folder, so a spec that leaves them out agrees).
# Mamba-1's mixer is config.intermediate_size wide (a file's own value wins over its expand); Mamba-2's is expand · d.
_SSM_SHAPE = ("vocab_size", "hidden_size", "num_hidden_layers", "state_size", "conv_kernel", "tie_word_embeddings")
SHAPE_FIELDS = {
    "gpt2": ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner"),
    "mamba": (*_SSM_SHAPE, "intermediate_size"),
    "mamba2": (*_SSM_SHAPE, "expand", "head_dim", "num_heads", "n_groups"),
}


def _shape_value(config, key: str):
    if key == "n_inner":  # GPT-2 writes null for the default MLP width
        return config.n_inner or 4 * config.n_embd
    return getattr(config, key, None)


def _load_pretrained(model, mambapy: bool | None = None):
    """A mamba / mamba2 / gpt2 spec started from the pretrained weights in `model.path` (a local folder or a name in
    the local Hugging Face cache). The spec's config is used (no dropout, the CPU kernels), so its shape must be the
    folder's; a difference is an error rather than a model that silently is not the one the spec describes. GPT-2's
    position table is cut to model.max_seq_len rows, so the model is exactly the spec's (as export and the planner
    assume)."""
    import torch
    from transformers import AutoModelForCausalLM

    wanted, found = model_config(model, mambapy=mambapy), _local_config(model.path)
    if found.model_type != wanted.model_type:
        raise HpcdsError(
            f"model.path {model.path!r} holds a {found.model_type} model, not {wanted.model_type}"
            "\nhint: set model.type to match, or use model.type: hf for any Hugging Face causal LM"
        )
    differ = [
        f"{key}: spec {_shape_value(wanted, key)}, folder {_shape_value(found, key)}"
        for key in SHAPE_FIELDS[model.type]
        if _shape_value(found, key) != _shape_value(wanted, key)
    ]
    if model.type == "gpt2":
        wanted.n_positions = found.n_positions
        if found.n_positions < model.max_seq_len:
            differ.append(f"n_positions: folder {found.n_positions}, below model.max_seq_len {model.max_seq_len}")
    if differ:
        raise HpcdsError(
            f"model.path {model.path!r} does not have the spec's shape ({'; '.join(differ)})"
            "\nhint: set the model fields (or the preset) to the folder's config.json"
        )
    net = AutoModelForCausalLM.from_pretrained(model.path, config=wanted, local_files_only=True, dtype="float32")
    if model.type == "gpt2" and found.n_positions > model.max_seq_len:
        rows = net.transformer.wpe.weight.detach()[: model.max_seq_len].clone()
        net.transformer.wpe = torch.nn.Embedding.from_pretrained(rows, freeze=False)
        net.config.n_positions = model.max_seq_len
    return net


def _load_hf(path: str):
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    config = _local_config(path)
    _no_dropout(config)
    weights = ("*.safetensors", "*.bin", "*.pt")
    has_weights = not folder.is_dir() or any(next(folder.glob(pattern), None) for pattern in weights)
    if not has_weights:
        return AutoModelForCausalLM.from_config(config)
    return AutoModelForCausalLM.from_pretrained(path, config=config, local_files_only=True, dtype="float32")


def _with_lora(net, lora):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise HpcdsError("model.lora needs the peft package\nhint: pip install 'hpcds[lora]'") from None
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(net, config)
    except ValueError as exc:
        raise HpcdsError(
            f"model.lora: {exc}\nhint: set model.lora.target_modules to module names of this model"
        ) from None


def enable_activation_checkpointing(net) -> None:
    """Recompute each block's activations in backward (non-reentrant, which works with frozen LoRA bases)."""
    kwargs = {"use_reentrant": False}
    if hasattr(net, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name warns there
        net.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(net, "enable_input_require_grads"):
        net.enable_input_require_grads()
