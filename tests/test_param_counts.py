"""Parameter counts computed from the architecture equal what transformers (and peft) build, on small shapes."""

from __future__ import annotations

import pytest

from hpcds.plan import count_params
from hpcds.spec import ModelSpec

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def _built(model_cls, config) -> tuple[int, int]:
    """(total, largest layer) exactly as DeepSpeed's model_to_params counts them: shared tensors once."""
    torch.manual_seed(0)
    model = model_cls(config)
    total = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def _check(spec: ModelSpec, model_cls) -> None:
    """Build the model from the trainer's own config for the spec (hpcds.train.models) and compare."""
    from hpcds.train.models import model_config

    total, largest = _built(model_cls, model_config(spec))
    count = count_params(spec)
    assert (count.total, count.largest_layer) == (total, largest)
    assert count.trainable == total and count.frozen == 0


@pytest.mark.parametrize(
    ("d_model", "n_layer", "vocab", "d_state", "d_conv", "expand"),
    [(64, 2, 256, 16, 4, 2), (40, 3, 1000, 8, 3, 2), (17, 1, 50, 4, 2, 3), (96, 2, 32, 16, 4, 1)],
)
def test_mamba(d_model, n_layer, vocab, d_state, d_conv, expand):
    spec = ModelSpec(
        type="mamba", d_model=d_model, n_layer=n_layer, vocab_size=vocab, d_state=d_state, d_conv=d_conv, expand=expand
    )
    _check(spec, transformers.MambaForCausalLM)


@pytest.mark.parametrize(
    ("d_model", "n_layer", "vocab", "d_state", "head_dim", "n_groups"),
    [(64, 2, 256, 16, 32, 1), (64, 1, 100, 8, 16, 2), (96, 2, 512, 32, 64, 1), (32, 3, 77, 4, 8, 4)],
)
def test_mamba2(d_model, n_layer, vocab, d_state, head_dim, n_groups):
    spec = ModelSpec(
        type="mamba2",
        d_model=d_model,
        n_layer=n_layer,
        vocab_size=vocab,
        d_state=d_state,
        head_dim=head_dim,
        n_groups=n_groups,
    )
    _check(spec, transformers.Mamba2ForCausalLM)


@pytest.mark.parametrize(
    ("d_model", "n_layer", "n_head", "d_ff", "vocab", "seq"),
    [(64, 2, 4, None, 256, 128), (48, 3, 3, 100, 1000, 64), (32, 1, 1, 32, 50, 16)],
)
def test_gpt2(d_model, n_layer, n_head, d_ff, vocab, seq):
    spec = ModelSpec(
        type="gpt2", d_model=d_model, n_layer=n_layer, n_head=n_head, d_ff=d_ff, vocab_size=vocab, max_seq_len=seq
    )
    _check(spec, transformers.GPT2LMHeadModel)


def _hf_spec(arch: str, d_model, n_layer, n_head, n_kv_head, head_dim, d_ff, vocab, tied, lora=None) -> ModelSpec:
    return ModelSpec(
        type="hf",
        path=f"some/{arch}",
        hf_arch=arch,
        d_model=d_model,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head,
        attn_head_dim=head_dim,
        d_ff=d_ff,
        vocab_size=vocab,
        tie_embeddings=tied,
        lora=lora,
    )


def _hf_built(spec: ModelSpec):
    """The transformers model for an hf spec: the class and config its hf_arch names, from the spec's shape fields."""
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }[spec.hf_arch]
    config = config_cls(
        hidden_size=spec.d_model,
        num_hidden_layers=spec.n_layer,
        num_attention_heads=spec.n_head,
        num_key_value_heads=spec.n_kv_head or spec.n_head,
        head_dim=spec.attn_head_dim or spec.d_model // spec.n_head,
        intermediate_size=spec.d_ff,
        vocab_size=spec.vocab_size,
        tie_word_embeddings=spec.tie_embeddings,
    )
    return model_cls, config


# (hf_arch, d_model, n_layer, n_head, n_kv_head, head_dim, d_ff, vocab, tied): grouped-query and multi-head
# attention, head sizes that do and do not equal d_model / n_head, tied and untied heads, odd sizes
HF_SHAPES = [
    ("llama", 64, 2, 4, 4, None, 172, 256, False),
    ("llama", 32, 3, 4, 4, None, 128, 99, False),
    ("llama", 64, 2, 8, 2, None, 96, 300, False),
    ("llama", 48, 2, 6, 3, 16, 80, 128, True),
    ("qwen2", 64, 2, 8, 2, None, 96, 300, False),
    ("qwen2", 48, 1, 4, 1, 24, 100, 77, True),
    ("qwen3", 64, 2, 8, 2, 16, 96, 300, True),
    ("qwen3", 64, 2, 8, 2, 16, 96, 300, False),
    ("qwen3", 40, 3, 4, 4, None, 72, 150, False),
    ("gemma3", 48, 2, 4, 2, 16, 96, 262, True),
    ("gemma3", 56, 3, 8, 8, 8, 112, 333, False),
]


@pytest.mark.parametrize(("arch", "d", "n_layer", "n_head", "n_kv", "head_dim", "d_ff", "vocab", "tied"), HF_SHAPES)
def test_hf_blocks_equal_transformers(arch, d, n_layer, n_head, n_kv, head_dim, d_ff, vocab, tied):
    spec = _hf_spec(arch, d, n_layer, n_head, n_kv, head_dim, d_ff, vocab, tied)
    model_cls, config = _hf_built(spec)
    total, largest = _built(model_cls, config)
    count = count_params(spec)
    assert (count.total, count.largest_layer) == (total, largest)
    assert count.trainable == total and count.frozen == 0


def test_hf_tie_default_follows_the_architecture():
    """A spec that does not say takes transformers' default: Gemma 3 ties its head, Llama and Qwen do not."""
    for arch, tied in (("llama", False), ("qwen2", False), ("qwen3", False), ("gemma3", True)):
        spec = _hf_spec(arch, 32, 1, 4, 2, 8, 64, 100, None)
        model_cls, config = _hf_built(spec.model_copy(update={"tie_embeddings": tied}))
        assert type(config)().tie_word_embeddings is tied  # the config class's own default
        assert count_params(spec).total == _built(model_cls, config)[0]


def test_7b_mamba_true_count_on_the_meta_device():
    from hpcds.train.models import model_config

    spec = ModelSpec(type="mamba", d_model=4864, n_layer=45, vocab_size=50257, max_seq_len=4096)
    with torch.device("meta"):
        model = transformers.MambaForCausalLM(model_config(spec))
    assert sum(p.numel() for p in model.parameters()) == count_params(spec).total == 6_922_702_592


@pytest.mark.parametrize(
    ("model_type", "targets", "r"),
    [
        ("gpt2", [], 4),
        ("gpt2", ["c_attn", "c_proj"], 2),
        ("gpt2", ["c_fc"], 8),
        ("hf", [], 4),
        ("hf", ["down_proj"], 2),
    ],
)
def test_lora_trainable_equals_peft(model_type, targets, r):
    peft = pytest.importorskip("peft")
    lora = {"r": r, "target_modules": targets}
    if model_type == "gpt2":
        spec = ModelSpec(type="gpt2", d_model=32, n_layer=2, n_head=2, vocab_size=64, max_seq_len=16, lora=lora)
        from hpcds.train.models import model_config

        base = transformers.GPT2LMHeadModel(model_config(spec))
    else:
        spec = ModelSpec(type="hf", path="x", d_model=32, n_layer=2, n_head=4, d_ff=48, vocab_size=64, lora=lora)
        config = transformers.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=48,
            vocab_size=64,
            tie_word_embeddings=False,
        )
        base = transformers.LlamaForCausalLM(config)
    peft_config = peft.LoraConfig(r=r, lora_alpha=16, target_modules=targets or None, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, peft_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    count = count_params(spec)
    assert (count.trainable, count.total) == (trainable, total)


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    ("arch", "targets", "tied"),
    [("qwen3", ALL_PROJECTIONS, True), ("gemma3", [], True), ("llama", ["k_proj", "o_proj"], False)],
)
def test_lora_on_grouped_query_attention_equals_peft(arch, targets, tied):
    """k_proj and v_proj are n_kv_head · head wide, q_proj and o_proj n_head · head: adapters follow."""
    peft = pytest.importorskip("peft")
    spec = _hf_spec(arch, 48, 2, 6, 2, 16, 80, 128, tied, lora={"r": 4, "target_modules": targets})
    model_cls, config = _hf_built(spec)
    peft_config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets or None, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model_cls(config), peft_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
    count = count_params(spec)
    assert (count.trainable, count.total) == (trainable, total)


# The configs' models, counted by building them on the meta device (no download, no memory): the text model only
REAL_COUNTS = {
    "qwen3-4b-lora-zero2": 4_022_468_096,
    "qwen3-8b-lora-zero3": 8_190_735_360,
    "gemma3-27b-zero3": 27_009_346_304,
}


@pytest.mark.parametrize("config", sorted(REAL_COUNTS))
def test_configs_plan_the_real_parameter_counts(config):
    """Each config's shape fields build (on the meta device) the real model, and the planner counts it exactly."""
    from pathlib import Path

    from hpcds.plan import plan_job
    from hpcds.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "configs" / f"{config}.yaml")
    model_cls, hf_config = _hf_built(spec.model)
    with torch.device("meta"):
        built = model_cls(hf_config)
    base = sum({id(p): p.numel() for p in built.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in built.modules())
    plan = plan_job(spec)
    adapters = plan.params.trainable if spec.model.lora is not None else 0
    assert base == REAL_COUNTS[config] and plan.params.largest_layer == largest
    assert plan.params.total - adapters == base
    if spec.model.lora is not None:
        assert plan.params.frozen == base


def _kept_bytes(model, ids) -> int:
    """Bytes of every tensor autograd keeps for backward in one forward + loss (storages counted once, no weights)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(kept.values())


@pytest.mark.parametrize(
    ("d_model", "n_head", "seq", "precision"),
    [(128, 4, 512, "fp32"), (128, 4, 512, "bf16"), (256, 8, 64, "bf16"), (256, 2, 32, "fp32")],
)
def test_gpt2_activation_estimate_covers_what_transformers_keeps(d_model, n_head, seq, precision):
    """Long sequences: the paper's softmax term dominates; short and wide: GPT-2's own tensors do. Both are covered."""
    from hpcds.plan import activation_bytes
    from hpcds.train.models import model_config

    spec = ModelSpec(type="gpt2", d_model=d_model, n_layer=2, n_head=n_head, vocab_size=300, max_seq_len=seq)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = transformers.GPT2LMHeadModel(model_config(spec)).to(dtype).train()
    kept = _kept_bytes(model, torch.randint(0, 300, (2, seq)))
    planned = activation_bytes(spec, 2, seq, precision, checkpointing=False)
    assert kept <= planned < 2 * kept


def test_lora_tiny_config_equals_the_model_its_folder_builds():
    """configs/lora-tiny.yaml's shape lines against the Qwen3 its model.path folder builds, with peft's adapters."""
    peft = pytest.importorskip("peft")
    from pathlib import Path

    from hpcds.spec import load_spec

    root = Path(__file__).resolve().parents[1]
    spec = load_spec(root / "configs" / "lora-tiny.yaml").model
    config = transformers.AutoConfig.from_pretrained(root / spec.path, local_files_only=True)
    lora = peft.LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, target_modules=spec.lora.target_modules)
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(config), lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    count = count_params(spec)
    assert (count.total, count.trainable) == (sum(p.numel() for p in model.parameters()), trainable)


# Tiny configs of the layouts added for model folders, as config.json would give them (read through the same mapping
# the CLI uses), with a tied and an untied head each: phi-2 and GPT-J keep their LM head's bias when the weight is tied
TINY_LAYOUTS = {
    "phi": {"model_type": "phi", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 48, "vocab_size": 100},
    "gptj": {"model_type": "gptj", "n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "vocab_size": 100},
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 48, "vocab_size": 100},
    "gemma2": {"model_type": "gemma2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 48, "vocab_size": 100},
    "mixtral": {"model_type": "mixtral", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 100, "num_local_experts": 4,
                "num_experts_per_tok": 2},
    "qwen2_moe": {"model_type": "qwen2_moe", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 100, "num_experts": 6,
                  "num_experts_per_tok": 2, "moe_intermediate_size": 24, "shared_expert_intermediate_size": 40},
    "qwen3_moe": {"model_type": "qwen3_moe", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 48, "vocab_size": 100,
                  "num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 24},
    "phi3": {"model_type": "phi3", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 100, "pad_token_id": 0},
    "mamba": {"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 100, "state_size": 8},
    "mamba2": {"model_type": "mamba2", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 100, "state_size": 8,
               "head_dim": 16, "num_heads": 4, "n_groups": 2},
}  # fmt: skip


def _layout_spec(config: dict, lora=None) -> ModelSpec:
    from hpcds.spec.hf_config import read_shape

    shape = read_shape(config)
    assert shape.arch is not None, shape.departures
    return ModelSpec(type="hf", path="x", hf_arch=shape.arch, **shape.found, **shape.defaults, lora=lora)


def _tiny_model(config: dict):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("layout", sorted(TINY_LAYOUTS))
def test_folder_layouts_equal_transformers(layout, tied):
    config = {**TINY_LAYOUTS[layout], "tie_word_embeddings": tied}
    model = _tiny_model(config)
    total = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    count = count_params(_layout_spec(config))
    assert (count.total, count.largest_layer) == (total, largest)


# (layout, targets): peft's defaults where it has them, every adaptable linear layer otherwise
LORA_ON_LAYOUTS = [
    ("phi", []),
    ("phi", ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]),
    ("gptj", []),
    ("gptj", ["out_proj", "fc_in", "fc_out"]),
    ("gpt_neox", []),
    ("gpt_neox", ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
    ("gemma2", []),
    ("mixtral", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("qwen2_moe", ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("qwen3_moe", ["k_proj", "v_proj"]),
    ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),  # fused matrices; peft has no phi3 default
    ("mamba", ["in_proj", "x_proj", "dt_proj"]),  # peft refuses out_proj and conv1d of Mamba models
    ("mamba2", ["in_proj"]),
]


@pytest.mark.parametrize(("layout", "targets"), LORA_ON_LAYOUTS)
def test_lora_on_folder_layouts_equals_peft(layout, targets):
    peft = pytest.importorskip("peft")
    config = TINY_LAYOUTS[layout]
    spec = _layout_spec(config, lora={"r": 4, "target_modules": targets})
    peft_config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets or None, task_type="CAUSAL_LM")
    model = peft.get_peft_model(_tiny_model(config), peft_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())
    count = count_params(spec)
    assert (count.trainable, count.total) == (trainable, total)


def test_lora_without_a_peft_default_asks_for_targets():
    from hpcds.errors import HpcdsError

    with pytest.raises(HpcdsError, match="peft has no default for the qwen3_moe layout"):
        count_params(_layout_spec(TINY_LAYOUTS["qwen3_moe"], lora={"r": 4}))
    with pytest.raises(HpcdsError, match="peft has no default for the phi3 layout"):
        count_params(_layout_spec(TINY_LAYOUTS["phi3"], lora={"r": 4}))


def test_every_layout_ties_its_head_as_its_config_class_does():
    """A spec that names a layout but not tie_embeddings takes the config class's default tie_word_embeddings."""
    from hpcds.plan.params import is_tied
    from hpcds.spec.hf_config import HF_LAYOUTS

    experts = {"n_experts": 4, "experts_per_token": 2, "expert_d_ff": 8, "shared_expert_d_ff": 8}
    for model_type, arch in HF_LAYOUTS.items():
        needed = {"mixtral": 2, "qwen3_moe": 3, "qwen2_moe": 4}.get(arch, 0)  # the first fields each layout needs
        moe = dict(list(experts.items())[:needed])
        spec = ModelSpec(type="hf", path="x", hf_arch=arch, d_model=32, n_layer=1, **moe)
        assert is_tied(spec) is transformers.AutoConfig.for_model(model_type).tie_word_embeddings, model_type
