"""Keys of other tools' training YAML (Hugging Face TrainingArguments, LLaMA-Factory, nanoGPT, Megatron/gpt-neox, the
common Mamba and GPT DeepSpeed scripts) and what a spec says instead, for the hint on an unknown key. No I/O.

A key is looked up by its own name wherever it appears, since such files are mostly flat. `tests/test_spec.py`
checks that every field named here exists in the spec.
"""

from __future__ import annotations

from typing import Any

# other tool's key -> (hpcds field, note when the meaning is not one to one)
FOREIGN_KEYS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("learning_rate", "lr", "max_lr"), ("training.lr", "")),
    **dict.fromkeys(("min_learning_rate", "min_lr_ratio"), ("training.min_lr", "an absolute learning rate")),
    **dict.fromkeys(
        ("batch_size", "per_device_train_batch_size", "micro_batch_size", "train_micro_batch_size_per_gpu"),
        ("training.micro_batch_size", "sequences per GPU per forward pass"),
    ),
    **dict.fromkeys(
        ("global_batch_size", "train_batch_size"), ("training.grad_accum_steps", "global = micro x accumulation x GPUs")
    ),
    **dict.fromkeys(
        ("gradient_accumulation_steps", "grad_accum", "accumulate_grad_batches"), ("training.grad_accum_steps", "")
    ),
    **dict.fromkeys(
        ("max_steps", "num_train_steps", "train_iters", "max_iters", "total_steps"), ("training.max_steps", "")
    ),
    **dict.fromkeys(
        ("num_train_epochs", "epochs", "num_epochs"), ("training.max_steps", "hpcds counts optimizer steps")
    ),
    **dict.fromkeys(
        ("warmup_steps", "warmup_iters", "lr_warmup_steps", "lr_warmup_iters"), ("training.warmup_steps", "")
    ),
    **dict.fromkeys(
        ("lr_scheduler_type", "lr_decay_style", "lr_scheduler"), ("training.decay", "cosine, linear or none")
    ),
    **dict.fromkeys(("max_grad_norm", "gradient_clipping", "clip_grad", "grad_clip_norm"), ("training.grad_clip", "")),
    **dict.fromkeys(("adam_beta1", "adam_beta2", "beta1", "beta2", "betas"), ("training.adam_betas", "a pair")),
    **dict.fromkeys(("eval_steps", "eval_interval", "eval_every"), ("training.eval_interval_steps", "")),
    **dict.fromkeys(("logging_steps", "log_interval", "log_every"), ("training.log_interval_steps", "")),
    **dict.fromkeys(("bf16", "fp16", "mixed_precision", "dtype"), ("training.precision", "bf16, fp16 or fp32")),
    **dict.fromkeys(("gradient_checkpointing", "checkpoint_activations"), ("training.activation_checkpointing", "")),
    **dict.fromkeys(("random_seed",), ("training.seed", "")),
    **dict.fromkeys(("model_type", "architecture", "arch"), ("model.type", "mamba, mamba2, gpt2 or hf")),
    **dict.fromkeys(
        ("model_name_or_path", "model_name", "pretrained_model_name_or_path", "model_path", "init_from"),
        ("model.path", "a local folder or a name in the Hugging Face cache"),
    ),
    **dict.fromkeys(("n_layers", "num_layers", "num_hidden_layers", "layers"), ("model.n_layer", "")),
    **dict.fromkeys(("hidden_size", "n_embd", "dim", "d_embed"), ("model.d_model", "")),
    **dict.fromkeys(("num_attention_heads", "n_heads"), ("model.n_head", "")),
    **dict.fromkeys(("intermediate_size", "ffn_hidden_size"), ("model.d_ff", "")),
    **dict.fromkeys(
        (
            "max_seq_length",
            "seq_length",
            "seq_len",
            "block_size",
            "max_length",
            "context_length",
            "max_position_embeddings",
        ),
        ("model.max_seq_len", ""),
    ),
    **dict.fromkeys(("state_size", "ssm_state_size"), ("model.d_state", "")),
    **dict.fromkeys(("conv_kernel", "d_conv_kernel"), ("model.d_conv", "")),
    **dict.fromkeys(("lora_r", "lora_rank"), ("model.lora.r", "")),
    **dict.fromkeys(("lora_alpha",), ("model.lora.alpha", "")),
    **dict.fromkeys(("lora_dropout",), ("model.lora.dropout", "")),
    **dict.fromkeys(("lora_target_modules", "lora_target"), ("model.lora.target_modules", "")),
    **dict.fromkeys(
        ("dataset", "dataset_path", "data_path", "train_data", "train_file", "train_data_paths", "data_dir"),
        ("data.train", "folders made by `hpcds data prepare`"),
    ),
    **dict.fromkeys(("validation_file", "valid_data_paths", "val_data", "eval_data"), ("data.val", "")),
    **dict.fromkeys(
        ("tokenizer_name", "tokenizer_name_or_path", "tokenizer_path", "tokenizer_type"), ("data.tokenizer", "")
    ),
    **dict.fromkeys(("zero_stage", "zero_optimization_stage"), ("deepspeed.zero_stage", "")),
    **dict.fromkeys(
        ("deepspeed_config", "ds_config", "deepspeed_config_path"), ("deepspeed.config", "a mapping or a file")
    ),
    **dict.fromkeys(("offload_optimizer_device", "cpu_offload"), ("deepspeed.offload_optimizer", "none, cpu or nvme")),
    **dict.fromkeys(("output_dir", "save_dir", "checkpoint_dir", "save", "out_dir"), ("checkpoint.dir", "")),
    **dict.fromkeys(
        ("save_steps", "save_interval", "checkpoint_interval", "checkpoint_every"), ("checkpoint.every_steps", "")
    ),
    **dict.fromkeys(("save_total_limit",), ("checkpoint.keep_last", "")),
    **dict.fromkeys(("num_gpus", "n_gpus", "gpus", "nproc_per_node", "num_gpus_per_node"), ("slurm.gpus_per_node", "")),
    **dict.fromkeys(("num_nodes", "nnodes", "n_nodes"), ("slurm.nodes", "")),
    **dict.fromkeys(("wandb_project",), ("wandb.project", "")),
    **dict.fromkeys(("wandb_entity",), ("wandb.entity", "")),
    **dict.fromkeys(("report_to",), ("wandb.mode", "online, offline or disabled")),
    **dict.fromkeys(("cutoff_len",), ("model.max_seq_len", "")),
    **dict.fromkeys(("finetuning_type",), ("model.lora", "a lora: section for LoRA; none for full fine-tuning")),
    **dict.fromkeys(("warmup_ratio", "warmup"), ("training.warmup_steps", "a number of steps, not a share of them")),
    **dict.fromkeys(("lr_decay_iters",), ("training.max_steps", "the decay ends at max_steps")),
    **dict.fromkeys(("checkpoint_factor",), ("checkpoint.every_steps", "")),
    **dict.fromkeys(("keep_last_n_checkpoints",), ("checkpoint.keep_last", "")),
    **dict.fromkeys(("data_impl",), ("data.train", "folders made by `hpcds data prepare`")),
    **dict.fromkeys(("no_weight_tying", "tie_word_embeddings"), ("model.tie_embeddings", "")),
}

# Another tool's keys that say something hpcds decides itself or does not do, and why.
NO_COUNTERPART: dict[str, str] = {
    **dict.fromkeys(
        (
            "pipe_parallel_size",
            "model_parallel_size",
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "sequence_parallel",
            "output_layer_parallelism",
        ),
        "hpcds trains data parallel with ZeRO (deepspeed.zero_stage), without tensor or pipeline parallelism",
    ),
    **dict.fromkeys(
        ("hostfile", "distributed_backend", "ddp_timeout", "master_port", "launcher"),
        "hpcds writes the hostfile, picks the backend (nccl on GPUs, gloo on CPUs) and starts the ranks itself",
    ),
    **dict.fromkeys(
        ("resume_from_checkpoint", "overwrite_output_dir", "save_only_model", "load"),
        "hpcds resumes from the run's newest verified checkpoint by itself; model.path starts from other weights",
    ),
    **dict.fromkeys(
        (
            "template",
            "stage",
            "do_train",
            "max_samples",
            "val_size",
            "preprocessing_num_workers",
            "dataloader_num_workers",
            "dataset_dir",
            "split",
        ),
        "data is prepared before training by `hpcds data prepare` (chat templates: --messages-field); training is "
        "causal-LM loss on the prepared tokens",
    ),
    **dict.fromkeys(
        ("trust_remote_code",),
        "hpcds builds models from transformers' own classes and never runs a model folder's code",
    ),
    **dict.fromkeys(("plot_loss", "steps_per_print", "wall_clock_breakdown"), "hpcds logs to the console and W&B"),
    **dict.fromkeys(
        (
            "norm",
            "pos_emb",
            "gpt_j_residual",
            "init_method",
            "output_layer_init_method",
            "activation",
            "num_kv_heads",
            "bias_gelu_fusion",
            "rope_fusion",
            "layernorm_fusion",
            "scaled_upper_triang_masked_softmax_fusion",
            "hidden_dropout",
            "attention_dropout",
            "synchronize_each_layer",
            "partition_activations",
            "checkpoint_num_layers",
        ),
        "hpcds builds the architecture of model.type (a Hugging Face folder's config.json for model.type hf), "
        "without dropout",
    ),
}

# DeepSpeed's own top-level keys: in a spec they go inside deepspeed.config.
DEEPSPEED_KEYS = frozenset(
    (
        "zero_optimization",
        "fp16",
        "bf16",
        "optimizer",
        "scheduler",
        "zero_allow_untested_optimizer",
        "activation_checkpointing",
        "flops_profiler",
        "tensorboard",
        "comms_logger",
        "aio",
        "amp",
        "data_efficiency",
        "communication_data_type",
        "prescale_gradients",
        "gradient_predivide_factor",
        "sparse_gradients",
        "zero_force_ds_cpu_optimizer",
        "elasticity",
        "compile",
        "csv_monitor",
    )
)


def foreign_hint(key: str, where: str) -> str:
    """What the spec says instead of another tool's key found at dotted place `where`, or ''."""
    if key in FOREIGN_KEYS and FOREIGN_KEYS[key][0] != where:
        field, note = FOREIGN_KEYS[key]
        return f"hpcds calls this {field}" + (f" ({note})" if note else "")
    if key in DEEPSPEED_KEYS:
        return f"a DeepSpeed setting: it goes inside deepspeed.config (your DeepSpeed JSON or a mapping): {key}: ..."
    if key in NO_COUNTERPART:
        return f"no counterpart in hpcds: {NO_COUNTERPART[key]}"
    return ""


_PRECISIONS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "no": "fp32", "fp32": "fp32"}
_DECAYS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
_MODEL_TYPES = ("mamba", "mamba2", "gpt2")


def _converted(key: str, value: Any, field: str, foreign: dict) -> tuple[str, Any] | None:
    """(field, value) in the spec's terms for one of another tool's settings, or None where it cannot be said."""
    if key in ("bf16", "fp16"):
        return (field, key) if value is True else None
    if field == "training.precision":
        return (field, _PRECISIONS[str(value).lower()]) if str(value).lower() in _PRECISIONS else None
    if field == "training.decay":
        return (field, _DECAYS[value]) if value in _DECAYS else None
    if field == "model.type":
        return (field, value if value in _MODEL_TYPES else "hf")
    if field == "wandb.mode":
        return {"wandb": (field, "online"), "none": (field, "disabled")}.get(str(value))
    if field == "model.lora":
        return (field, {}) if value == "lora" else None
    if key == "no_weight_tying":
        return (field, not value) if isinstance(value, bool) else None
    if field == "model.lora.target_modules":
        names = value.split(",") if isinstance(value, str) else value
        return (field, names) if isinstance(names, list) and "all" not in names else None
    if field == "training.warmup_steps" and isinstance(value, float) and value < 1:
        steps = foreign.get("max_steps") or foreign.get("train_iters")
        return (field, round(value * steps)) if isinstance(steps, int) and steps > 0 else None
    if field == "training.max_steps" and (not isinstance(value, int) or value <= 0 or "epoch" in key):
        return None  # epochs, or -1 for "run the epochs"
    if field in ("data.train", "data.val", "training.adam_betas", "training.min_lr", "deepspeed.config"):
        return None  # other tools' dataset names and ratios mean something else; the file is resolved by the caller
    return field, value


def import_tree(foreign: dict) -> tuple[dict, list[str]]:
    """A spec tree from another tool's flat training YAML, and one note per key it could not carry over (with why).

    The tree is not validated: the caller does, and reports what is left to fill in. A DeepSpeed file named by
    `deepspeed: FILE` is kept as written (the caller resolves it).
    """
    from hpcds.spec.doc import spec_fields
    from hpcds.spec.tree import get_path, set_path

    by_leaf = {field.rsplit(".", 1)[-1]: field for field, _ in spec_fields() if "." in field and "[" not in field}
    tree: dict = {}
    notes = []
    for key, value in foreign.items():
        found: tuple[str, Any] | None = None
        if key == "deepspeed" and isinstance(value, str):
            found = ("deepspeed.config", value)
        elif key in DEEPSPEED_KEYS and (isinstance(value, dict) or key not in FOREIGN_KEYS):
            tree.setdefault("deepspeed", {}).setdefault("config", {})[key] = value
            continue
        elif key in ("adam_beta1", "adam_beta2") and {"adam_beta1", "adam_beta2"} <= set(foreign):
            found = ("training.adam_betas", [foreign["adam_beta1"], foreign["adam_beta2"]])
        elif key in FOREIGN_KEYS:
            found = _converted(key, value, FOREIGN_KEYS[key][0], foreign)
        elif key in by_leaf:  # the spec's own name, written outside its section
            found = (by_leaf[key], value)
        if found is None:
            notes.append(f"{key}: {value!r}  # {foreign_hint(key, '') or 'no counterpart in hpcds'}")
            continue
        field, new = found
        current = get_path(tree, field)
        if current is None:
            set_path(tree, field, new)
        elif current != new and not (field == "model.lora" and new == {}):  # `finetuning_type: lora` after lora_rank
            notes.append(f"{key}: {value!r}  # {field} is already {current!r}, from an earlier key")
    return tree, notes
