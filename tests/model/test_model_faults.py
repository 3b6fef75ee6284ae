"""Model behaviours the other model tests leave open: a new RMSNorm has weight 1; every MoE layer has the configured shared experts; the float8 options reach every MoE
layer's experts; init_weights(seed) is init_weights_ with that seed and the model's depth,
draws zero-mean matrices and zeroes the router buffers; the rotary tables are checked one
by one; ModelArgs refuses every size out of range with a ValueError naming the field (not
a ZeroDivisionError or a later failure) and takes ints for float fields; the moe_1b preset
is the model the recorded runs in docs/runs trained; swiglu refuses float64 and rounds its
bf16 result once."""

import dataclasses
import glob
import json
import math
import os

import pytest
import torch

from ep_fp8.model import PRESETS, RMSNorm, Transformer, param_counts
from ep_fp8.model.init import init_weights_
from ep_fp8.ops import swiglu, swiglu_packed
from tests.model.test_model import TINY, _tokens
from tests._paths import ROOT


def _scaled(model, factor=4.0):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model.eval()


# --- float8 options ----------------------------------------------------------------------

def test_float8_options_reach_every_moe_layers_experts_and_change_the_logits():
    args = dataclasses.replace(TINY, n_layers=3)
    plain = _scaled(Transformer(args))
    fp8 = _scaled(Transformer(args, float8=True, float8_backend="emulated"))
    exact = _scaled(Transformer(args, float8=True, float8_backend="emulated", exact_scales=True))
    for model, want in ((plain, (False, "auto", False)), (fp8, (True, "emulated", False)),
                        (exact, (True, "emulated", True))):
        experts = [b.moe.experts for b in model.layers if b.moe is not None]
        assert len(experts) == 2
        assert all((e.float8, e.float8_backend, e.exact_scales) == want for e in experts)
    tokens = _tokens(2, 12, args.vocab_size)
    with torch.no_grad():
        a, b, c = plain(tokens), fp8(tokens), exact(tokens)
    # Same weights (seed 0): float8 quantisation moves the logits by ~7e-2, power-of-two
    # scales by as much again; float32 rounding alone is below 1e-5.
    assert (a - b).abs().max() > 1e-2
    assert (b - c).abs().max() > 1e-2


# --- sizes the blocks are built with ------------------------------------------------------

@pytest.mark.parametrize("n_shared", [0, 2, 3])
def test_each_moe_layer_has_the_configured_shared_experts(n_shared):
    """The built model has the parameters param_counts counts, with no shared experts or
    with several (each of expert_hidden_dim)."""
    args = dataclasses.replace(TINY, n_layers=3, n_shared_experts=n_shared)
    model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == param_counts(args)[0]
    shared = [sum(p.numel() for n, p in b.moe.named_parameters() if n.startswith("shared_experts"))
              for b in model.layers if b.moe is not None]
    assert shared == [n_shared * 3 * args.dim * args.expert_hidden_dim] * 2


# --- initialisation ----------------------------------------------------------------------

def test_init_weights_is_init_weights_with_the_given_seed_and_the_models_depth():
    args = dataclasses.replace(TINY, n_layers=3)
    for seed in (0, 1, 5):
        model = Transformer(args)
        model.init_weights(seed)
        direct = Transformer(args)
        init_weights_(direct, seed, args.n_layers)
        for (name, p), q in zip(model.named_parameters(), direct.parameters()):
            assert torch.equal(p, q), (seed, name)


def test_init_draws_zero_mean_matrices():
    args = dataclasses.replace(TINY, dim=64, n_layers=8, n_heads=4, n_kv_heads=4,
                               dense_hidden_dim=128, expert_hidden_dim=64, vocab_size=512)
    model = Transformer(args)
    out_std = 0.02 / math.sqrt(2 * args.n_layers)
    for tensor, std in ((model.tok_embeddings.weight, 0.02), (model.output.weight, 0.02),
                        (model.layers[1].moe.experts.w13, 0.02),
                        (model.layers[1].moe.experts.w2, out_std)):
        # n >= 32k samples: the sample mean's std is std / sqrt(n) <= std / 181; allow 6 of those.
        n = tensor.numel()
        assert abs(tensor.mean().item()) < 6 * std / math.sqrt(n), (tensor.shape, tensor.mean())


def test_init_weights_zeroes_the_router_buffers():
    model = Transformer(TINY)
    for name, buf in model.named_buffers():
        buf.fill_(3)
    model.init_weights(2)
    names = [name for name, _ in model.named_buffers()]
    assert sorted(n.split(".")[-1] for n in names) == ["expert_bias", "tokens_per_expert"]
    for name, buf in model.named_buffers():
        assert not buf.any(), name


# --- RMSNorm ---------------------------------------------------------------------------

def test_a_new_rms_norm_divides_by_the_rms_alone():
    """Weight 1 at construction (RMSNorm is public: a block built outside the Transformer
    gets no init_weights). float32 against float64: relative 1e-6, a few float32 ulps."""
    x = 3 * torch.randn(8, 32, generator=torch.Generator().manual_seed(5))
    norm = RMSNorm(32, eps=1e-2)
    xd = x.double()
    want = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-2)
    torch.testing.assert_close(norm(x).double(), want, rtol=1e-6, atol=0)


# --- rotary tables -----------------------------------------------------------------------

def test_attention_refuses_a_table_pair_of_which_only_one_is_not_float32():
    attn = Transformer(TINY).layers[0].attention
    x = torch.randn(2, 5, TINY.dim)
    cos, sin = attn.rope_tables(5, x.device)
    for bad in ((cos, sin.bfloat16()), (cos.double(), sin)):
        with pytest.raises(ValueError, match="rotary tables must be float32"):
            attn(x, *bad)
    with pytest.raises(ValueError, match=r"of shape \(5, 2\)"):
        attn(x, cos, attn.rope_tables(6, x.device)[1])


# --- argument validation -----------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(n_kv_heads=0), r"model.n_kv_heads must be >= 1, got 0"),
    (dict(n_heads=0), r"model.n_heads must be >= 1, got 0"),
    (dict(n_shared_experts=-1), r"model.n_shared_experts must be >= 0, got -1"),
    (dict(expert_hidden_dim=0), r"model.expert_hidden_dim must be >= 1 when there are MoE"),
    (dict(n_experts=0, top_k=0, route_norm=False), r"model.n_experts must be >= 1"),
    (dict(aux_loss_coef=float("inf")), r"model.aux_loss_coef must be finite and >= 0"),
    (dict(norm_eps=float("inf")), r"model.norm_eps must be finite and > 0"),
    # head_dim 20 // 3 = 6 is even: only the divisibility is wrong.
    (dict(dim=20, n_heads=3, n_kv_heads=1), r"model.n_heads \(3\) must divide model.dim \(20\)"),
    # 8 experts in 3 groups, all 3 kept: 6 reachable >= top_k, only the division fails.
    (dict(n_experts=8, n_expert_groups=3, n_limited_groups=3),
     r"model.n_expert_groups \(3\) must divide model.n_experts \(8\)"),
], ids=["kv_heads_0", "heads_0", "shared_negative", "expert_hidden_0", "experts_0",
        "aux_inf", "eps_inf", "heads_not_dividing_dim", "groups_not_dividing_experts"])
def test_args_out_of_range_raise_value_error_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **change)


def test_float_fields_take_ints():
    args = dataclasses.replace(TINY, rope_theta=10000, route_scale=2, norm_eps=1, aux_loss_coef=0)
    assert (args.rope_theta, args.route_scale, args.norm_eps, args.aux_loss_coef) == (10000, 2, 1, 0)
    with pytest.raises(TypeError, match="model.rope_theta must be float, got str"):
        dataclasses.replace(TINY, rope_theta="1e4")
    with pytest.raises(TypeError, match="model.route_norm must be bool, got int"):
        dataclasses.replace(TINY, route_norm=1)


# --- presets -----------------------------------------------------------------------------

def test_the_moe_1b_preset_is_the_model_of_the_recorded_runs():
    """docs/runs/*moe_1b*.jsonl begin with the config their run used: the moe_1b preset
    with the data's vocabulary."""
    preset = dataclasses.asdict(PRESETS["moe_1b"])
    runs = sorted(glob.glob(os.path.join(ROOT, "docs", "runs", "*moe_1b*.jsonl")))
    assert runs
    for path in runs:
        with open(path) as f:
            model = json.loads(f.readline())["run"]["config"]["model"]
        assert model.pop("name") == "moe_1b"
        model["vocab_size"] = preset["vocab_size"]
        assert model == preset, path


# --- swiglu ------------------------------------------------------------------------------

def test_swiglu_refuses_float64():
    a = torch.randn(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16, got torch.float64"):
        swiglu(a, a, backend="torch")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16, got torch.float64"):
        swiglu_packed(a, backend="torch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_swiglu_of_half_inputs_is_the_float64_value_rounded_once(dtype):
    """silu(a) * b in float32 and one rounding to the output dtype: all but rare near-ties
    equal the float64 value rounded to it (intermediate roundings in bf16/fp16 change
    about a third of them)."""
    gen = torch.Generator().manual_seed(21)
    a, b = (4 * torch.randn(64, 128, generator=gen)).to(dtype), (4 * torch.randn(64, 128, generator=gen)).to(dtype)
    want = torch.nn.functional.silu(a.double()) * b.double()
    for h in (swiglu(a, b, backend="torch"), swiglu_packed(torch.cat([a, b], -1), backend="torch")):
        assert h.dtype == dtype
        assert (h == want.to(dtype)).double().mean().item() >= 0.995
