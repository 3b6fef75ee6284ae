"""Corners of ep_fp8.moe that the other files leave open: validation of the sequence
count, the aux gradient scale, the expert-parallel degree and the payload; the bad-id
count in the dispatch error; a topk_idx on another device; the MoE layer forwarding its
options to the router and experts (route_norm=False against a float64 reference); the
shared experts' hidden size; init_weights' standard deviation reaching every weight."""

import math

import pytest
import torch

from ep_fp8.moe import (AllToAllDispatcher, GroupedExperts, LocalDispatcher, MoE, Router,
                        check_ep_divides, set_aux_grad_scale)

B, S, D, H, E, K = 2, 6, 16, 32, 8, 2


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- validation ---------------------------------------------------------------------------

def test_aux_loss_rejects_a_sequence_count_below_one():
    """aux_loss with n_seqs 0 or negative raises the ValueError naming the token and
    sequence counts (not a ZeroDivisionError or a reshape error), even when n_seqs
    divides T."""
    r = Router(D, E, K, aux_loss_coef=0.1)
    idx, _, scores = r.route(torch.randn(12, D, generator=_gen(0)))
    for bad in (0, -1, -3):
        with pytest.raises(ValueError, match=f"12 tokens do not split into {bad} sequences"):
            r.aux_loss(scores, idx, n_seqs=bad)


def test_set_aux_grad_scale_rejects_zero_and_nan_and_leaves_the_routers_alone():
    """A scale of 0 (the aux loss would silently stop training), NaN or inf raises ValueError
    naming the value, and no Router's aux_grad_scale changes."""
    model = torch.nn.ModuleList([Router(D, E, K), Router(D, E, K)])
    set_aux_grad_scale(model, 0.5)
    for bad in (0.0, -0.25, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"aux gradient scale must be finite and > 0, got {bad}"):
            set_aux_grad_scale(model, bad)
        assert [r.aux_grad_scale for r in model] == [0.5, 0.5]


@pytest.mark.parametrize("ep, n_experts", [(0, 8), (-2, 8), (2, 0), (-1, -4), (3, 8)])
def test_check_ep_divides_rejects_sizes_below_one_and_non_divisors(ep, n_experts):
    """check_ep_divides raises the ValueError naming parallel.ep and model.n_experts for
    ep or n_experts < 1 (ep = -2 divides 8, n_experts = 0 is divisible by any ep) and for
    an ep that does not divide n_experts; it accepts the divisors."""
    with pytest.raises(ValueError, match=rf"parallel.ep \({ep}\) must divide model.n_experts \({n_experts}\)"):
        check_ep_divides(ep, n_experts)
    for ok in (1, 2, 4, 8):
        check_ep_divides(ok, 8)


def test_all_to_all_dispatcher_rejects_an_unknown_payload_before_using_the_group():
    """An unknown payload raises the ValueError listing the choices, and a non-bool
    exact_scales a TypeError, checked before the process group is looked at (so also
    without one), not in the middle of a dispatch."""
    with pytest.raises(ValueError, match=r"payload must be one of \('bf16', 'float8'\), got 'fp16'"):
        AllToAllDispatcher(None, E, payload="fp16")
    with pytest.raises(TypeError, match="exact_scales must be a bool, got int"):
        AllToAllDispatcher(None, E, payload="float8", exact_scales=1)


def test_grouped_experts_reject_zero_experts_and_zero_dim():
    """GroupedExperts with n_experts = 0 or dim = 0 raises the ValueError that names the
    three sizes (not an empty module that fails later in the grouped matmul)."""
    with pytest.raises(ValueError, match="dim, hidden_dim and n_experts must be >= 1, got 16, 32, 0"):
        GroupedExperts(D, H, 0)
    with pytest.raises(ValueError, match="dim, hidden_dim and n_experts must be >= 1, got 0, 32, 4"):
        GroupedExperts(0, H, 4)


def test_out_of_range_error_states_how_many_ids_are_bad():
    """The CPU dispatch error counts the out-of-range ids (two here: 5 and -1)."""
    x = torch.randn(3, D, generator=_gen(1))
    with pytest.raises(ValueError, match=r"^topk_idx has 2 entries outside \[0, 4\)$"):
        LocalDispatcher(4).dispatch(x, torch.tensor([[0, 5], [-1, 2], [1, 3]]))


def test_dispatch_rejects_topk_idx_on_another_device_than_x():
    """x on the meta device with topk_idx on the CPU raises the ValueError naming both
    devices, before any row is moved."""
    x = torch.empty(3, D, device="meta")
    with pytest.raises(ValueError, match="topk_idx is on cpu but x is on meta"):
        LocalDispatcher(4).dispatch(x, torch.zeros(3, 2, dtype=torch.int64))


# --- the MoE layer's options ---------------------------------------------------------------

def test_moe_forwards_every_router_and_expert_option():
    """Each non-default MoE option reaches the Router or GroupedExperts it configures."""
    moe = MoE(D, H, E, K, score_func="sigmoid", route_norm=False, route_scale=2.5,
              n_expert_groups=4, n_limited_groups=3, aux_loss_coef=0.05, load_balance_bias=False,
              float8=True, float8_backend="emulated", exact_scales=True)
    r, ex = moe.router, moe.experts
    assert (r.score_func, r.route_norm, r.route_scale) == ("sigmoid", False, 2.5)
    assert (r.n_expert_groups, r.n_limited_groups) == (4, 3)
    assert (r.aux_loss_coef, r.load_balance_bias) == (0.05, False)
    assert (ex.float8, ex.float8_backend, ex.exact_scales) == (True, "emulated", True)


def test_moe_with_route_norm_off_weights_experts_by_the_raw_scores():
    """MoE(route_norm=False) weights each expert output by its raw sigmoid score times
    route_scale: output against a float64 token loop on the layer's weights (float32
    arithmetic: rtol 1e-4). Renormalised weights would differ by a factor 1/sum."""
    torch.manual_seed(0)
    moe = MoE(D, H, E, K, score_func="sigmoid", route_norm=False, route_scale=1.5)
    x = torch.randn(B, S, D, generator=_gen(2))
    y = moe(x)
    x64 = x.double().reshape(-1, D)
    p = {n: t.detach().double() for n, t in moe.named_parameters()}
    scores = (x64 @ p["router.gate.weight"].T).sigmoid()
    idx, _ = moe.router(x.reshape(-1, D))
    w = 1.5 * scores.gather(1, idx)
    (w1, w3), w2 = p["experts.w13"].chunk(2, dim=1), p["experts.w2"]   # gate, up halves
    want = torch.stack([
        sum(w[t, j] * ((torch.nn.functional.silu(w1[e] @ x64[t]) * (w3[e] @ x64[t])) @ w2[e].T)
            for j, e in enumerate(idx[t].tolist()))
        for t in range(x64.shape[0])])
    torch.testing.assert_close(y.detach().double().reshape(-1, D), want, rtol=1e-4, atol=1e-7)


def test_shared_experts_hidden_size_is_n_shared_times_hidden_dim():
    """n_shared_experts = 3 gives one dense SwiGLU of hidden size 3 * hidden_dim."""
    moe = MoE(D, H, E, K, n_shared_experts=3)
    fw = moe.shared_experts
    assert fw.w1.weight.shape == fw.w3.weight.shape == (3 * H, D)
    assert fw.w2.weight.shape == (D, 3 * H)


def test_init_weights_draws_every_weight_with_the_given_std():
    """MoE.init_weights(std) re-draws the gate, the routed and the shared experts' weights
    from a truncated normal of that std: the sample std of each is within 20% of it
    (at least 128 samples, the gate's: the standard error of the std is below 7%). The
    construction default, 0.02, is 25 times smaller."""
    torch.manual_seed(3)
    moe = MoE(D, H, E, K, n_shared_experts=1)
    std = 0.5
    moe.init_weights(std)
    for name, p in moe.named_parameters():
        got = float(p.detach().double().std())
        assert math.isclose(got, std, rel_tol=0.2), (name, got)
