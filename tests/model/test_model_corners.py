"""Corners of the model: bf16 paths, rotary tables, init seeding, validation boundaries,
and the preset sizes the docs state."""

import dataclasses

import pytest
import torch

from ep_fp8.model import PRESETS, Attention, RMSNorm, Transformer, flops_per_token
from tests.model.test_model import TINY, _tokens

# --- RMSNorm in bf16 ------------------------------------------------------------------

def test_rms_norm_of_bf16_input_is_the_float64_result_rounded_once_to_bf16():
    gen = torch.Generator().manual_seed(11)
    D, eps = 256, 1e-3
    x = (torch.randn(64, D, generator=gen) * 3).bfloat16()
    norm = RMSNorm(D, eps)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=gen) + 0.5)
    out = norm(x)
    assert out.dtype == torch.bfloat16

    xd = x.double()
    want = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + eps) * norm.weight.double()
    # Statistics and the weight product in float32, then one rounding to bf16: every
    # element is within half a bf16 ulp (2^-8 relative) of the float64 value, and all but
    # rare near-ties round to the same bf16 number. Any intermediate bf16 rounding breaks both.
    rel = ((out.double() - want).abs() / want.abs()).max().item()
    assert rel <= 2 ** -8 * (1 + 1e-3)
    assert (out == want.bfloat16()).double().mean().item() >= 0.995


def test_bf16_model_still_returns_float32_logits():
    model = Transformer(TINY).to(torch.bfloat16)
    logits = model(_tokens(2, 7, TINY.vocab_size))
    assert logits.dtype == torch.float32
    assert logits.shape == (2, 7, TINY.vocab_size)
    assert torch.isfinite(logits).all()


# --- Rotary tables ---------------------------------------------------------------------

@pytest.mark.parametrize("head_dim, theta", [(8, 10000.0), (16, 500000.0), (6, 3.0)])
def test_rotary_tables_are_cos_and_sin_of_position_times_frequency(head_dim, theta):
    S = 40
    attn = Attention(dim=2 * head_dim, n_heads=2, n_kv_heads=1, rope_theta=theta)
    cos, sin = attn.rope_tables(S, torch.device("cpu"))
    assert cos.dtype == sin.dtype == torch.float32
    assert cos.shape == sin.shape == (S, head_dim // 2)
    angle = torch.zeros(S, head_dim // 2, dtype=torch.float64)
    for s in range(S):                   # positions 0 .. S-1
        for i in range(head_dim // 2):
            angle[s, i] = s * theta ** (-2.0 * i / head_dim)
    # Angles up to 40 rad formed in float32: absolute error about 40 * 6e-8 = 2.4e-6.
    torch.testing.assert_close(cos.double(), angle.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin.double(), angle.sin(), rtol=0, atol=1e-5)
    # Position 0 is not rotated at all.
    assert torch.equal(cos[0], torch.ones(head_dim // 2))
    assert torch.equal(sin[0], torch.zeros(head_dim // 2))


# --- Initialisation --------------------------------------------------------------------

def test_parameters_of_the_same_shape_are_drawn_independently():
    # n_kv_heads == n_heads: wq, wk, wv, wo share a shape; w1 and w3 share one; so do the
    # blocks' attention matrices across layers.
    args = dataclasses.replace(TINY, dim=32, n_heads=4, n_kv_heads=4, n_layers=3,
                               dense_hidden_dim=32, expert_hidden_dim=32)
    model = Transformer(args)
    matrices = [(n, p.detach().flatten().double()) for n, p in model.named_parameters()
                if p.ndim > 1 and p.numel() >= 1024]
    pairs = 0
    for i, (na, a) in enumerate(matrices):
        for nb, b in matrices[i + 1:]:
            if a.numel() != b.numel():
                continue
            pairs += 1
            corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
            # >= 1024 independent samples: |corr| has std <= 1/32; 0.2 is 6.4 of those.
            assert abs(corr) < 0.2, (na, nb, corr)
    assert pairs >= 20


def test_init_weights_without_a_seed_is_seed_zero_as_at_construction():
    built = Transformer(TINY)
    model = Transformer(TINY)
    model.init_weights(5)
    model.init_weights()
    for (name, p), q in zip(model.named_parameters(), built.parameters()):
        assert torch.equal(p, q), name
    model.init_weights(0)
    for (name, p), q in zip(model.named_parameters(), built.parameters()):
        assert torch.equal(p, q), name


# --- Sequence length -------------------------------------------------------------------

def test_a_sequence_of_exactly_max_seq_len_is_accepted():
    model = Transformer(TINY)
    logits = model(_tokens(1, TINY.max_seq_len, TINY.vocab_size))
    assert logits.shape == (1, TINY.max_seq_len, TINY.vocab_size)


def test_flops_per_token_rejects_a_bool_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(TINY, True)


# --- Validation boundaries -------------------------------------------------------------

@pytest.mark.parametrize("change", [
    # 8 experts in 4 groups of 2, 2 groups kept: exactly 4 experts reachable.
    dict(n_experts=8, n_expert_groups=4, n_limited_groups=2, top_k=4),
    dict(n_experts=6, n_expert_groups=3, n_limited_groups=3, top_k=6),
    # dense hidden size is irrelevant without dense layers
    dict(n_dense_layers=0, dense_hidden_dim=0),
    dict(max_seq_len=1, n_dense_layers=0),
    dict(dim=20, n_heads=2, n_kv_heads=1),   # head_dim 10: even
], ids=["top_k_equals_reachable", "top_k_equals_all_groups", "no_dense_layers", "seq_len_1",
        "even_head_dim"])
def test_args_at_the_boundary_are_accepted(change):
    args = dataclasses.replace(TINY, **change)
    for key, value in change.items():
        assert getattr(args, key) == value


@pytest.mark.parametrize("change, key", [
    (dict(dim=12, n_heads=4, n_kv_heads=2), "must be even for rotary"),   # head_dim 3
    (dict(n_expert_groups=1, n_limited_groups=2), "model.n_limited_groups"),
    (dict(n_experts=8, n_expert_groups=2, n_limited_groups=3, top_k=2), "model.n_limited_groups"),
    (dict(dense_hidden_dim=0), "model.dense_hidden_dim"),
    (dict(max_seq_len=0), "model.max_seq_len"),
    (dict(n_dense_layers=-1), "model.n_dense_layers"),
    (dict(vocab_size=0), "model.vocab_size"),
], ids=["odd_head_dim", "limited_above_groups", "limited_above_groups_8",
        "dense_hidden_0", "max_seq_len_0", "negative_dense_layers", "vocab_0"])
def test_args_past_the_boundary_raise_naming_the_field(change, key):
    with pytest.raises(ValueError, match=key):
        dataclasses.replace(TINY, **change)


# --- Presets ---------------------------------------------------------------------------

def _sizes(a):
    """(total, active) parameters, counted matrix by matrix."""
    hd = a.dim // a.n_heads
    attention = (a.dim * a.n_heads * hd          # wq
                 + 2 * a.dim * a.n_kv_heads * hd  # wk, wv
                 + a.n_heads * hd * a.dim)       # wo

    def swiglu(hidden):                          # w1, w3, w2
        return 3 * a.dim * hidden

    block_norms = 2 * a.dim
    n_moe = a.n_layers - a.n_dense_layers
    dense = a.n_dense_layers * (attention + block_norms + swiglu(a.dense_hidden_dim))
    moe_shared = n_moe * (attention + block_norms + a.n_experts * a.dim
                          + a.n_shared_experts * swiglu(a.expert_hidden_dim))
    embed_head_norm = a.vocab_size * a.dim + a.dim * a.vocab_size + a.dim
    total = embed_head_norm + dense + moe_shared + n_moe * a.n_experts * swiglu(a.expert_hidden_dim)
    active = embed_head_norm + dense + moe_shared + n_moe * a.top_k * swiglu(a.expert_hidden_dim)
    return total, active


def test_presets_have_the_parameter_counts_docs_config_states():
    # docs/config.md: debug 0.5M; moe_1b ~1.2B, 0.48B active; moe_16b ~15.8B, 2.7B active.
    total, _ = _sizes(PRESETS["debug"])
    assert round(total / 1e6, 1) == 0.5
    assert sum(p.numel() for p in Transformer(PRESETS["debug"]).parameters()) == total
    total, active = _sizes(PRESETS["moe_1b"])
    assert (round(total / 1e9, 1), round(active / 1e9, 2)) == (1.2, 0.48)
    total, active = _sizes(PRESETS["moe_16b"])
    assert (round(total / 1e9, 1), round(active / 1e9, 1)) == (15.8, 2.7)
