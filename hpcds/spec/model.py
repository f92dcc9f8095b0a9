"""The spec's `model` section: architecture family, shape, pretrained weights and LoRA (in `hpcds.spec.JobSpec`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from hpcds.errors import Problem
from hpcds.spec.types import SafeStr, Strict, _problems


class LoraSpec(Strict):
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[SafeStr] = Field(
        default=[], description="Module names to adapt; empty = peft's default for the model."
    )


class ModelSpec(Strict):
    type: Literal["mamba", "mamba2", "gpt2", "hf"] = Field(description="Architecture family.")
    d_model: int | None = Field(None, ge=1, description="Hidden size.")
    n_layer: int | None = Field(None, ge=1, description="Number of blocks.")
    vocab_size: int = Field(50257, ge=2, description="Vocabulary size (the tokenizer's, or larger).")
    max_seq_len: int = Field(1024, ge=2, description="Training sequence length in tokens.")
    d_state: int = Field(16, ge=1, description="Mamba: SSM state size per channel.")
    d_conv: int = Field(4, ge=1, description="Mamba: depthwise convolution width.")
    expand: int = Field(2, ge=1, description="Mamba: inner width = expand * d_model.")
    head_dim: int = Field(64, ge=1, description="Mamba-2: head size (heads = expand * d_model / head_dim).")
    n_groups: int = Field(1, ge=1, description="Mamba-2: number of B/C groups.")
    n_head: int | None = Field(None, ge=1, description="GPT-2 / hf: attention (query) heads.")
    n_kv_head: int | None = Field(
        None, ge=1, description="hf: key/value heads, fewer than n_head for grouped-query attention (default n_head)."
    )
    attn_head_dim: int | None = Field(
        None, ge=1, description="hf: size of one attention head, config.json's head_dim (default d_model / n_head)."
    )
    d_ff: int | None = Field(None, ge=1, description="GPT-2 / hf: MLP width (default 4 * d_model).")
    tie_embeddings: bool | None = Field(
        None,
        description="The output head shares the input embedding's weights. mamba, mamba2, gpt2: always (the trainer "
        "builds them tied); hf: config.json's tie_word_embeddings (default: tied for gemma3, untied otherwise).",
    )
    hf_arch: Literal["llama", "qwen2", "qwen3", "gemma3"] | None = Field(
        None,
        description="hf: block layout the planner counts, config.json's model_type: llama (also mistral; default), "
        "qwen2 (q/k/v biases), qwen3 (q/k norms), gemma3 (q/k norms, four norms per block).",
    )
    path: SafeStr | None = Field(
        None,
        description="hf: Hugging Face model name (in the local cache) or local folder. mamba / mamba2 / gpt2: "
        "optional pretrained weights to start from, of the spec's shape (e.g. GPT-2 XL's).",
    )
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters instead of all weights.")

    @model_validator(mode="after")
    def _check_shape(self, info: ValidationInfo) -> ModelSpec:
        problems = _problems(info)
        if self.type in ("mamba", "mamba2", "gpt2"):
            for field in ("d_model", "n_layer"):
                if getattr(self, field) is None:
                    problems.append(
                        Problem(
                            f"model.{field}",
                            f"is required for model.type {self.type}",
                            "set it, or pick a preset (e.g. preset: 1b_mamba)",
                        )
                    )
        if self.type == "gpt2":
            if self.n_head is None:
                problems.append(Problem("model.n_head", "is required for model.type gpt2", "e.g. n_head: 12"))
            elif self.d_model and self.d_model % self.n_head:
                problems.append(
                    Problem(
                        "model.n_head",
                        f"d_model {self.d_model} is not divisible by n_head {self.n_head}",
                        "choose n_head dividing d_model",
                    )
                )
        if self.type == "mamba2" and self.d_model and (self.expand * self.d_model) % self.head_dim:
            problems.append(
                Problem(
                    "model.head_dim",
                    f"expand * d_model = {self.expand * self.d_model} is not divisible by head_dim {self.head_dim}",
                    "e.g. head_dim: 64",
                )
            )
        if self.type == "hf" and not self.path:
            problems.append(
                Problem(
                    "model.path",
                    "is required for model.type hf",
                    "a Hugging Face model name or a local folder with config.json",
                )
            )
        if self.type == "hf":
            self._check_attention(problems)
        else:
            for field in ("n_kv_head", "attn_head_dim", "hf_arch"):
                if getattr(self, field) is not None:
                    problems.append(Problem(f"model.{field}", f"applies to model.type hf only, not {self.type}"))
            if self.tie_embeddings is False:
                problems.append(
                    Problem(
                        "model.tie_embeddings",
                        f"model.type {self.type} always ties its output head to the embedding",
                        "remove the line (an untied head is available for model.type hf only)",
                    )
                )
        return self

    def _check_attention(self, problems: list[Problem]) -> None:
        # Spec dumps carry Mamba-2's head_dim default (64) for every type, so only another value is a likely mix-up.
        if self.head_dim != 64:
            problems.append(
                Problem(
                    "model.head_dim",
                    "is Mamba-2's SSM head size and means nothing for model.type hf",
                    f"for the attention head size write model.attn_head_dim: {self.head_dim}",
                )
            )
        if self.n_head is None:
            given = [f"model.{f}" for f in ("n_kv_head", "attn_head_dim") if getattr(self, f) is not None]
            if given:
                problems.append(Problem("model.n_head", f"is required with {' and '.join(given)}", "e.g. n_head: 32"))
            return
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            problems.append(
                Problem(
                    "model.n_kv_head",
                    f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}",
                    "config.json's num_key_value_heads; it divides num_attention_heads",
                )
            )
        if self.attn_head_dim is None and self.d_model and self.d_model % self.n_head:
            problems.append(
                Problem(
                    "model.attn_head_dim",
                    f"d_model {self.d_model} is not divisible by n_head {self.n_head}, so the head size is unknown",
                    "set model.attn_head_dim (config.json's head_dim)",
                )
            )
