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


HfArch = Literal[
    "llama", "phi3", "qwen2", "qwen3", "gemma2", "gemma3", "phi", "gptj", "gpt_neox", "mixtral", "qwen2_moe",
    "qwen3_moe", "mamba", "mamba2",
]  # fmt: skip
MOE_FIELDS = ("n_experts", "experts_per_token", "expert_d_ff", "shared_expert_d_ff")
# the expert fields each mixture-of-experts layout needs (config.json gives them)
MOE_NEEDS = {
    "mixtral": ("n_experts", "experts_per_token"),
    "qwen3_moe": ("n_experts", "experts_per_token", "expert_d_ff"),
    "qwen2_moe": ("n_experts", "experts_per_token", "expert_d_ff", "shared_expert_d_ff"),
}
MOE_ARCHES = tuple(MOE_NEEDS)
SSM_LAYOUTS = ("mamba", "mamba2")  # state-space layouts: no attention, their own shape fields


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
        description="The output head shares the input embedding's weights. gpt2: always; mamba, mamba2: tied unless "
        "set to false (falcon-mamba's head is untied); hf: config.json's tie_word_embeddings (default: the "
        "hf_arch's, tied for gemma2, gemma3 and mamba, untied otherwise).",
    )
    hf_arch: HfArch | None = Field(
        None,
        description="hf: block layout the planner counts, from config.json's model_type: llama (also mistral; the "
        "default), phi3 (Llama's weights, q/k/v and gate/up fused: the modules LoRA adapts), qwen2 (q/k/v biases), "
        "qwen3 (q/k norms), gemma2 (four norms per block), gemma3 (q/k norms, four norms), phi (phi-2: biases, one "
        "LayerNorm, parallel attention and MLP), gptj (parallel block, MLP and head biases), gpt_neox (fused qkv, "
        "biases), mixtral, qwen2_moe, qwen3_moe (mixture of experts), mamba (also falcon_mamba), mamba2.",
    )
    n_experts: int | None = Field(
        None,
        ge=1,
        description="hf mixture of experts: routed experts per block (config.json's num_local_experts or num_experts).",
    )
    experts_per_token: int | None = Field(
        None, ge=1, description="hf mixture of experts: experts each token is routed to (num_experts_per_tok)."
    )
    expert_d_ff: int | None = Field(
        None,
        ge=1,
        description="hf mixture of experts: MLP width of one expert (moe_intermediate_size; mixtral: default d_ff).",
    )
    shared_expert_d_ff: int | None = Field(
        None,
        ge=1,
        description="hf_arch qwen2_moe: MLP width of the shared expert every token passes "
        "(shared_expert_intermediate_size).",
    )
    n_params: int | None = Field(
        None,
        ge=1,
        description="hf: total parameters (tied weights once, LoRA adapters not included). hpcds sets it from a "
        "count on the meta device (transformers, in a separate process) when model.path's config.json has a "
        "model_type the planner has no layout for; set it yourself to skip that count. When set, the planner "
        "uses it for memory instead of counting the layout.",
    )
    path: SafeStr | None = Field(
        None,
        description="hf: Hugging Face model name (in the local cache) or local folder; a folder's config.json fills "
        "the shape fields the spec leaves unset. mamba / mamba2 / gpt2: optional pretrained weights to start from, "
        "of the spec's shape (e.g. GPT-2 XL's); for mamba / mamba2 a folder's config.json fills the unset shape "
        "fields.",
    )
    lora: LoraSpec | None = Field(None, description="Train LoRA adapters instead of all weights.")
    init_from: SafeStr | None = Field(
        None,
        description="Start from another run's weights: RUN, RUN:best, RUN:final, RUN:latest or RUN:STEP (a run "
        "name or folder; a spec name means its newest run; default final), or a folder written by `hpcds export`. "
        "Weights only: new optimizer state, step 0, a new W&B run; any ZeRO stage and world size (through the "
        "consolidated fp32 weights). With model.lora the base weights come from it and the adapters start fresh. "
        "hpcds submit / run pin the source's path in the run's spec.yaml.",
    )
    kernels: Literal["auto", "fused", "reference"] = Field(
        "auto",
        description="Mamba / Mamba-2: what runs the scan. auto: mamba-ssm's fused CUDA kernels on GPUs (the job fails "
        "at start when mamba-ssm or causal-conv1d does not import there; pip install 'hpcds[gpu]'), reference "
        "PyTorch on CPU; fused: the kernels or fail; reference: transformers' reference PyTorch even on GPUs "
        "(slower, and it needs more GPU memory than the plan shows).",
    )

    @model_validator(mode="after")
    def _check_shape(self, info: ValidationInfo) -> ModelSpec:
        problems = _problems(info)
        # mamba / mamba2 with a folder: its config.json gives the shape (hpcds.model_folder fills it in and says so
        # when it cannot), so only a spec without one must give d_model and n_layer itself.
        needs_shape = self.type == "gpt2" or (self.type in ("mamba", "mamba2") and not self.path)
        if needs_shape:
            for field in ("d_model", "n_layer"):
                if getattr(self, field) is None:
                    problems.append(
                        Problem(
                            f"model.{field}",
                            f"is required for model.type {self.type}",
                            "set it, pick a preset (e.g. preset: 1b_mamba), or point model.path at a folder with "
                            "config.json",
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
        if self.layout == "mamba2" and self.d_model and (self.expand * self.d_model) % self.head_dim:
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
        # hf without hf_arch: the folder's layout is filled in later, and validated again then
        if self.kernels != "auto" and self.layout not in SSM_LAYOUTS and (self.type != "hf" or self.hf_arch):
            problems.append(
                Problem(
                    "model.kernels",
                    f"chooses Mamba's scan kernels, and a {self.layout} model has none",
                    "remove the line (it applies to mamba and mamba2 models)",
                )
            )
        if self.type == "hf":
            if self.hf_arch not in ("mamba", "mamba2"):
                self._check_attention(problems)
            self._check_experts(problems)
        else:
            hf_only = ("n_kv_head", "attn_head_dim", "hf_arch", "n_params", *MOE_FIELDS)
            for field in hf_only:
                if getattr(self, field) is not None:
                    problems.append(Problem(f"model.{field}", f"applies to model.type hf only, not {self.type}"))
            if self.tie_embeddings is False and self.type == "gpt2":
                problems.append(
                    Problem(
                        "model.tie_embeddings",
                        "model.type gpt2 always ties its output head to the embedding",
                        "remove the line (an untied head is available for model.type hf, mamba and mamba2)",
                    )
                )
        return self

    @property
    def layout(self) -> str:
        """The block layout counted: the family for built-in types, hf_arch (default llama) for hf."""
        return (self.hf_arch or "llama") if self.type == "hf" else self.type

    def _check_experts(self, problems: list[Problem]) -> None:
        if self.hf_arch is None:
            return  # the folder's config.json names the layout (hpcds.model_folder fills it in, then checks again)
        arch = self.hf_arch
        if arch not in MOE_ARCHES:
            for field in MOE_FIELDS:
                if getattr(self, field) is not None:
                    problems.append(
                        Problem(
                            f"model.{field}",
                            f"applies to the mixture-of-experts layouts ({', '.join(MOE_ARCHES)}), not hf_arch {arch}",
                            "remove it, or set model.hf_arch to the model's layout",
                        )
                    )
            return
        for field in MOE_NEEDS[arch]:
            if getattr(self, field) is None:
                problems.append(
                    Problem(
                        f"model.{field}", f"is required for hf_arch {arch}", "config.json gives it; see docs/spec.md"
                    )
                )
        if "shared_expert_d_ff" not in MOE_NEEDS[arch] and self.shared_expert_d_ff is not None:
            problems.append(Problem("model.shared_expert_d_ff", f"hf_arch {arch} has no shared expert"))
        if self.n_experts and self.experts_per_token and self.experts_per_token > self.n_experts:
            problems.append(
                Problem(
                    "model.experts_per_token",
                    f"{self.experts_per_token} is more than model.n_experts {self.n_experts}",
                    "config.json's num_experts_per_tok",
                )
            )

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
