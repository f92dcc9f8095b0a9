"""Keys of other tools' training YAML (Hugging Face TrainingArguments, nanoGPT, Megatron/gpt-neox, the common Mamba
and GPT DeepSpeed scripts) and the spec field that says the same thing, for the hint on an unknown key. No I/O.

A key is looked up by its own name wherever it appears, since such files are mostly flat. `tests/test_spec.py`
checks that every field named here exists in the spec.
"""

from __future__ import annotations

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
}


def foreign_hint(key: str, where: str) -> str:
    """'this spec's field for it is X' for another tool's key found at dotted place `where`, or ''."""
    if key not in FOREIGN_KEYS:
        return ""
    field, note = FOREIGN_KEYS[key]
    if field == where:
        return ""
    return f"hpcds calls this {field}" + (f" ({note})" if note else "")
