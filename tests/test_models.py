"""Models from specs: every family builds tiny, runs forward and a training step, and depends on the seed alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hpcds.errors import HpcdsError
from hpcds.spec import LoraSpec, ModelSpec
from hpcds.train.kernels import describe_kernels, select_kernels
from hpcds.train.models import build_model, enable_activation_checkpointing

VOCAB = 64
TINY = {
    "mamba": {"type": "mamba", "d_model": 32, "n_layer": 2, "d_state": 8},
    "mamba2": {"type": "mamba2", "d_model": 32, "n_layer": 2, "d_state": 8, "head_dim": 16},
    "gpt2": {"type": "gpt2", "d_model": 32, "n_layer": 2, "n_head": 4, "max_seq_len": 32},
}


def spec(family: str, **extra) -> ModelSpec:
    return ModelSpec(**TINY[family], vocab_size=VOCAB, **extra)


def batch(seed: int = 0, size: int = 2, seq_len: int = 16):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (size, seq_len + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def loss_of(model, x, y):
    logits = model(input_ids=x, labels=None).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("family", TINY)
def test_builds_runs_forward_and_trains(family):
    model = build_model(spec(family), seed=0)
    x, y = batch()
    logits = model(input_ids=x, labels=None).logits
    assert logits.shape == (2, 16, VOCAB) and torch.isfinite(logits).all()
    assert model.training and next(model.parameters()).dtype == torch.float32
    # A few steps on one batch must lower its loss: gradients reach the weights and point downhill.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("family", TINY)
def test_weights_depend_on_the_seed_alone(family):
    state_before = torch.get_rng_state()
    a = build_model(spec(family), seed=3).state_dict()
    torch.manual_seed(999)  # the caller's global RNG state must not matter
    b = build_model(spec(family), seed=3).state_dict()
    c = build_model(spec(family), seed=4).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    torch.set_rng_state(state_before)


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_model(spec("mamba"), seed=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("family", TINY)
def test_no_dropout_in_training_mode(family):
    model = build_model(spec(family), seed=0)
    x, _ = batch()
    assert torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)


def test_shapes_follow_the_spec():
    mamba = build_model(
        ModelSpec(type="mamba", d_model=48, n_layer=3, d_state=4, d_conv=3, expand=3, vocab_size=100), seed=0
    )
    config = mamba.config
    assert (config.hidden_size, config.num_hidden_layers, config.state_size, config.conv_kernel, config.expand) == (
        48,
        3,
        4,
        3,
        3,
    )
    assert mamba.backbone.layers[0].mixer.in_proj.out_features == 2 * 3 * 48
    assert mamba.lm_head.weight is mamba.backbone.embeddings.weight  # tied, as in mamba-ssm
    gpt = build_model(
        ModelSpec(type="gpt2", d_model=32, n_layer=1, n_head=2, d_ff=80, max_seq_len=24, vocab_size=100), seed=0
    )
    assert gpt.transformer.wpe.num_embeddings == 24
    assert gpt.transformer.h[0].mlp.c_fc.nf == 80
    mamba2 = build_model(spec("mamba2"), seed=0)
    assert mamba2.config.num_heads == 2 * 32 // 16


def test_mamba_on_cpu_uses_the_mambapy_scan_and_says_so():
    chosen = select_kernels(spec("mamba"), "fp32")
    assert chosen.path == "reference" and chosen.mambapy and "mambapy" in chosen.detail
    assert describe_kernels(spec("mamba")) == chosen.detail
    model = build_model(spec("mamba"), seed=0, mambapy=chosen.mambapy)
    assert model.config.use_mambapy
    assert select_kernels(spec("mamba2"), "fp32").path == "reference"
    assert "attention" in select_kernels(spec("gpt2"), "fp32").detail
    assert not build_model(
        spec("mamba"), seed=0, mambapy=select_kernels(spec("mamba"), "bf16").mambapy
    ).config.use_mambapy
    # The parallel scan computes what the sequential reference scan computes.
    x, _ = batch(seq_len=32)
    fast = model(input_ids=x).logits
    for layer in model.backbone.layers:
        layer.mixer.use_mambapy = False
    assert torch.allclose(fast, model(input_ids=x).logits, atol=1e-4)


@pytest.mark.parametrize("family", ["mamba", "gpt2"])
def test_activation_checkpointing_gives_the_same_gradients(family):
    plain = build_model(spec(family), seed=0)
    checkpointed = build_model(spec(family), seed=0)
    enable_activation_checkpointing(checkpointed)
    x, y = batch()
    loss_of(plain, x, y).backward()
    loss_of(checkpointed, x, y).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_hf_local_folder_loads_weights_or_builds_from_config(tmp_path):
    source = build_model(spec("gpt2"), seed=11)
    source.save_pretrained(tmp_path / "full")
    loaded = build_model(ModelSpec(type="hf", path=str(tmp_path / "full"), vocab_size=VOCAB), seed=0)
    x, _ = batch()
    assert torch.allclose(loaded(input_ids=x).logits, source(input_ids=x).logits, atol=1e-6)

    source.config.save_pretrained(tmp_path / "config-only")
    fresh = build_model(ModelSpec(type="hf", path=str(tmp_path / "config-only"), vocab_size=VOCAB), seed=0)
    again = build_model(ModelSpec(type="hf", path=str(tmp_path / "config-only"), vocab_size=VOCAB), seed=0)
    assert type(fresh).__name__ == "GPT2LMHeadModel"
    assert torch.equal(fresh(input_ids=x).logits, again(input_ids=x).logits)
    assert not torch.allclose(fresh(input_ids=x).logits, source(input_ids=x).logits)

    with pytest.raises(HpcdsError, match="never downloads"):
        build_model(ModelSpec(type="hf", path=str(tmp_path / "absent")), seed=0)


@pytest.mark.parametrize("family", TINY)
def test_builtin_family_starts_from_pretrained_weights_of_its_shape(family, tmp_path):
    source = build_model(spec(family), seed=11)
    source.config.resid_pdrop = 0.1  # a pretrained folder with dropout: the spec's config (none) must win
    source.save_pretrained(tmp_path / "pretrained")
    started = build_model(spec(family, path=str(tmp_path / "pretrained")), seed=0)
    assert type(started) is type(source)
    for (name, mine), (_, theirs) in zip(started.state_dict().items(), source.state_dict().items(), strict=True):
        assert torch.equal(mine, theirs), name
    assert getattr(started.config, "resid_pdrop", 0.0) == 0.0

    wider = {**TINY[family], "d_model": 64}
    with pytest.raises(HpcdsError, match="does not have the spec's shape") as info:
        build_model(ModelSpec(**wider, vocab_size=VOCAB, path=str(tmp_path / "pretrained")), seed=0)
    assert "64" in str(info.value) and "32" in str(info.value)  # says which field differs, both values
    other = next(f for f in TINY if f != family)
    with pytest.raises(HpcdsError, match="holds a"):
        build_model(spec(other, path=str(tmp_path / "pretrained")), seed=0)

    # A resume builds from the config alone: the checkpoint overwrites every weight, the folder may be gone.
    (tmp_path / "pretrained").rename(tmp_path / "moved")
    resumed = build_model(spec(family, path=str(tmp_path / "pretrained")), seed=0, pretrained=False)
    assert [p.shape for p in resumed.parameters()] == [p.shape for p in started.parameters()]


def test_gpt2_pretrained_position_table_is_cut_to_the_sequence(tmp_path):
    long = build_model(ModelSpec(**{**TINY["gpt2"], "max_seq_len": 64}, vocab_size=VOCAB), seed=3)
    long.save_pretrained(tmp_path / "gpt2-64")
    short = spec("gpt2", path=str(tmp_path / "gpt2-64"), d_ff=4 * 32)  # d_ff 4·d is the folder's null n_inner
    started = build_model(short, seed=0)
    # Exactly the spec's model (what export and the planner assume), with the first 32 pretrained positions.
    assert {k: v.shape for k, v in started.state_dict().items()} == {
        k: v.shape for k, v in build_model(spec("gpt2"), seed=0).state_dict().items()
    }
    assert torch.equal(started.transformer.wpe.weight, long.transformer.wpe.weight[:32])
    assert started.config.n_positions == 32
    with pytest.raises(HpcdsError, match=r"below model\.max_seq_len 128"):
        build_model(
            ModelSpec(**{**TINY["gpt2"], "max_seq_len": 128}, vocab_size=VOCAB, path=str(tmp_path / "gpt2-64")), seed=0
        )


def test_mamba2_pretrained_groups_must_match(tmp_path):
    build_model(spec("mamba2", n_groups=2), seed=0).save_pretrained(tmp_path / "m2")
    with pytest.raises(HpcdsError, match="n_groups: spec 1, folder 2"):
        build_model(spec("mamba2", path=str(tmp_path / "m2")), seed=0)


def test_lora_trains_only_the_adapters():
    model = build_model(spec("gpt2", lora=LoraSpec(r=4, alpha=8)), seed=0)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    x, y = batch()
    loss_of(model, x, y).backward()
    assert all(p.grad is not None for _, p in model.named_parameters() if p.requires_grad)
    again = build_model(spec("gpt2", lora=LoraSpec(r=4, alpha=8)), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_untied_mamba_head_builds_untied_and_its_folder_must_agree(family, tmp_path):
    """falcon-mamba-style heads: tie_embeddings false builds a head of its own; a pretrained folder's tying must be
    the spec's, like every other shape field."""
    untied = build_model(spec(family, tie_embeddings=False), seed=5)
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    tied = build_model(spec(family), seed=5)
    assert tied.lm_head.weight.data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    untied.save_pretrained(tmp_path / "untied")
    started = build_model(spec(family, tie_embeddings=False, path=str(tmp_path / "untied")), seed=0)
    assert torch.equal(started.lm_head.weight, untied.lm_head.weight)
    with pytest.raises(HpcdsError, match="tie_word_embeddings: spec True, folder False"):
        build_model(spec(family, path=str(tmp_path / "untied")), seed=0)
