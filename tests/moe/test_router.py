"""moe.router: selection, weights, group-limited routing, bias balancing, sequence loss."""

import copy

import pytest
import torch

from ep_fp8.moe.router import Router, balance_routers, update_router_biases

D, E = 16, 8


def _x(T, seed=0):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(seed))


def _scores64(router, x, score_func):
    logits = x.double() @ router.gate.weight.double().T
    return logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("route_norm", [True, False])
def test_topk_and_weights_match_float64_reference(score_func, route_norm):
    torch.manual_seed(0)
    r = Router(D, E, 3, score_func=score_func, route_norm=route_norm, route_scale=2.5)
    x = _x(32)
    idx, w = r(x)
    s = _scores64(r, x, score_func)
    want_idx = s.topk(3, dim=-1).indices
    assert torch.equal(idx.sort(-1).values, want_idx.sort(-1).values)
    want_w = s.gather(1, idx)
    if route_norm:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    want_w = want_w * 2.5
    assert w.dtype == torch.float32 and idx.dtype == torch.int64
    torch.testing.assert_close(w.double(), want_w, rtol=1e-5, atol=1e-6)  # float32 scores


def test_bias_steers_selection_but_not_weights():
    torch.manual_seed(0)
    r = Router(D, E, 2, score_func="sigmoid", route_norm=False)
    x = _x(64)
    _, w_before = r(x)
    r.expert_bias[5] = 10.0  # expert 5 now always wins a slot
    idx, w = r(x)
    assert bool((idx == 5).any(-1).all())
    s = _scores64(r, x, "sigmoid")
    torch.testing.assert_close(w.double(), s.gather(1, idx), rtol=1e-5, atol=1e-6)
    r_off = Router(D, E, 2, score_func="sigmoid", route_norm=False, load_balance_bias=False)
    r_off.load_state_dict(r.state_dict())
    idx_off, _ = r_off(x)
    assert not bool((idx_off == 5).any(-1).all())  # the bias is ignored when disabled


@pytest.mark.parametrize("bias", [False, True])
def test_group_limited_routing_picks_only_from_the_best_groups(bias):
    torch.manual_seed(1)
    G, L, k = 4, 2, 3
    r = Router(D, E, k, score_func="sigmoid", n_expert_groups=G, n_limited_groups=L, load_balance_bias=bias)
    if bias:
        r.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    x = _x(40, seed=2)
    idx, _ = r(x)
    choice = _scores64(r, x, "sigmoid") + (r.expert_bias.double() if bias else 0)
    grouped = choice.view(-1, G, E // G)
    group_score = grouped.topk(2, -1).values.sum(-1) if bias else grouped.amax(-1)
    best_groups = group_score.topk(L, -1).indices
    allowed = torch.zeros(x.shape[0], G, dtype=torch.bool).scatter_(1, best_groups, True)
    want = choice.masked_fill(~allowed.repeat_interleave(E // G, 1), float("-inf")).topk(k, -1).indices
    assert torch.equal(idx.sort(-1).values, want.sort(-1).values)
    assert bool(allowed.gather(1, idx // (E // G)).all())


def test_tokens_per_expert_accumulate_and_bias_update_follows_sign_rule():
    torch.manual_seed(0)
    r = Router(D, E, 2)
    x = _x(50)
    idx1, _ = r(x)
    idx2, _ = r(x[:20])
    counts = torch.bincount(torch.cat([idx1.flatten(), idx2.flatten()]), minlength=E).float()
    assert torch.equal(r.tokens_per_expert, counts)
    stats = update_router_biases(r, rate=0.01)
    assert stats["load_imbalance_max"] == pytest.approx(float(counts.max() / counts.mean()))
    assert torch.equal(r.expert_bias, 0.01 * torch.sign(counts.mean() - counts))
    assert torch.equal(r.tokens_per_expert, torch.zeros(E))


def test_eval_mode_routes_alike_but_counts_nothing():
    torch.manual_seed(0)
    r = Router(D, E, 2)
    x = _x(40)
    idx_train, w_train = r(x)
    counts = r.tokens_per_expert.clone()
    r.eval()
    idx_eval, w_eval = r(x)
    assert torch.equal(idx_eval, idx_train) and torch.equal(w_eval, w_train)
    assert torch.equal(r.tokens_per_expert, counts) and counts.sum() == 40 * 2


def test_balance_routers_updates_alike_and_returns_the_imbalances_unread():
    torch.manual_seed(3)
    model = torch.nn.ModuleList([Router(D, E, 2), Router(D, E, 2)])
    twin = copy.deepcopy(model)
    for routers in (model, twin):
        for r, counts in zip(routers, ([6.0, 2, 2, 2, 2, 2, 2, 2], [3.0, 3, 3, 3, 1, 1, 1, 1])):
            r.tokens_per_expert.copy_(torch.tensor(counts))   # imbalances 6 / 2.5, 3 / 2
    imbalance = balance_routers(model, rate=0.01)
    stats = update_router_biases(twin, rate=0.01)
    assert isinstance(imbalance, torch.Tensor)
    assert imbalance.tolist() == pytest.approx([2.4, 1.5], rel=1e-6)
    assert stats == pytest.approx({"load_imbalance_max": 2.4, "load_imbalance_mean": 1.95}, rel=1e-6)
    for r, t in zip(model, twin):
        assert torch.equal(r.expert_bias, t.expert_bias) and not r.tokens_per_expert.any()
    assert balance_routers(torch.nn.Linear(2, 2), rate=0.01).numel() == 0
    bias = [r.expert_bias.clone() for r in model]
    for rate in (-0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"rate must be finite and >= 0, got {rate}"):
            balance_routers(model, rate=rate)
    assert all(torch.equal(r.expert_bias, b) for r, b in zip(model, bias))   # nothing moved


def test_init_weights_zeroes_the_balancing_state_of_a_module_built_on_meta():
    """to_empty() gives the buffers whatever memory was there: the layer's own
    init_weights must leave bias and counts at zero (the Transformer's does too)."""
    from ep_fp8.moe import MoE

    with torch.device("meta"):
        layer = MoE(D, 32, E, 2)
    layer.to_empty(device="cpu")
    layer.router.expert_bias.fill_(4.4e30)              # what such memory may hold
    layer.router.tokens_per_expert.fill_(7.0)
    layer.init_weights()
    assert not layer.router.expert_bias.any() and not layer.router.tokens_per_expert.any()
    assert layer.router.gate.weight.abs().max() < 0.1   # and the gate drawn


def test_the_aux_loss_is_float32_arithmetic_whatever_the_default_dtype():
    torch.manual_seed(0)
    r = Router(D, E, 2, aux_loss_coef=0.01)
    scores = torch.rand(12, E)
    idx = scores.topk(2, dim=-1).indices
    want = r.aux_loss(scores, idx, 2)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = r.aux_loss(scores, idx, 2)
    finally:
        torch.set_default_dtype(before)
    assert torch.equal(got, want)


def test_update_router_biases_leaves_bias_alone_without_rate_or_when_disabled():
    torch.manual_seed(0)
    model = torch.nn.ModuleList([Router(D, E, 2), Router(D, E, 2, load_balance_bias=False)])
    for r in model:
        r(_x(30))
    update_router_biases(model, rate=0.0)
    assert all(torch.equal(r.expert_bias, torch.zeros(E)) for r in model)
    for r in model:
        r(_x(30))
    stats = update_router_biases(model, rate=0.1)
    assert not torch.equal(model[0].expert_bias, torch.zeros(E))
    assert torch.equal(model[1].expert_bias, torch.zeros(E))
    assert stats["load_imbalance_max"] >= stats["load_imbalance_mean"] >= 1.0
    assert update_router_biases(model, rate=0.1)["load_imbalance_max"] == 1.0  # nothing routed



def test_load_imbalance_is_max_over_mean_per_layer_then_max_and_mean_over_layers():
    model = torch.nn.ModuleList([Router(D, 4, 2), Router(D, 4, 2), Router(D, 4, 2)])
    for r, counts in zip(model, ([8.0, 0, 0, 0], [2.0, 2, 2, 2], [3.0, 1, 0, 0])):
        r.tokens_per_expert.copy_(torch.tensor(counts))   # imbalances 4, 1 and 3
    stats = update_router_biases(model, rate=0.0)
    assert stats == {"load_imbalance_max": 4.0, "load_imbalance_mean": pytest.approx(8 / 3)}

def test_expert_bias_is_checkpointed_and_counts_are_not():
    r = Router(D, E, 2)
    assert "expert_bias" in r.state_dict() and "tokens_per_expert" not in r.state_dict()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_sequence_aux_loss_matches_float64_formula(score_func):
    torch.manual_seed(0)
    B, S, k = 3, 10, 2
    r = Router(D, E, k, score_func=score_func, aux_loss_coef=0.1)
    x = _x(B * S)
    idx, _, scores = r.route(x)
    loss = r.aux_loss(scores, idx, n_seqs=B)
    s = _scores64(r, x, score_func)
    p = (s / s.sum(-1, keepdim=True)).view(B, S, E).mean(1)
    f = torch.stack([torch.bincount(idx.view(B, -1)[b], minlength=E) for b in range(B)]).double() * E / (k * S)
    want = 0.1 * (f * p).sum(-1).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    assert torch.equal(r.last_aux_loss, loss.detach())
    loss.backward()
    assert r.gate.weight.grad.abs().sum() > 0


def test_bad_router_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="score_func"):
        Router(D, E, 2, score_func="relu")
    with pytest.raises(ValueError, match="top_k"):
        Router(D, E, 9)
    with pytest.raises(ValueError, match="n_expert_groups"):
        Router(D, E, 2, n_expert_groups=3)
    with pytest.raises(ValueError, match="n_limited_groups"):
        Router(D, E, 2, n_expert_groups=2, n_limited_groups=3)
    with pytest.raises(ValueError, match="top_k"):
        Router(D, E, 3, n_expert_groups=4, n_limited_groups=1)
    with pytest.raises(ValueError, match="route_norm=True with top_k=1"):
        Router(D, E, 1)
    Router(D, E, 1, route_norm=False)  # top-1 with the raw score as its weight trains the gate
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"route_scale must be finite and > 0, got {bad}"):
            Router(D, E, 2, route_scale=bad)
    for bad in (-1.0, float("nan"), float("inf")):  # nan > 0 is False: it would turn the loss off
        with pytest.raises(ValueError, match=f"aux_loss_coef must be finite and >= 0, got {bad}"):
            Router(D, E, 2, aux_loss_coef=bad)
    r = Router(D, E, 2)
    with pytest.raises(ValueError, match="sequences"):
        idx, _, scores = r.route(_x(10))
        r.aux_loss(scores, idx, n_seqs=3)
    with pytest.raises(ValueError, match="rate"):
        update_router_biases(r, rate=-1.0)


def test_balancing_buffers_stay_float32_when_the_module_is_cast():
    r = Router(D, E, 2).to(torch.bfloat16)
    assert r.gate.weight.dtype == torch.bfloat16
    assert r.expert_bias.dtype == torch.float32 and r.tokens_per_expert.dtype == torch.float32
    for _ in range(300):  # 600 counts on one expert: exact in float32, not in bfloat16
        r.tokens_per_expert[0] += 2
    assert r.tokens_per_expert[0].item() == 600


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("bias", [False, True])
def test_group_score_is_sum_of_two_best_with_bias_and_best_without(score_func, bias):
    # Hand-made scores, three groups of two experts, one group kept, top-2 inside it:
    #   A = (0.9, 0.05): best 0.90, two best 0.95
    #   B = (0.6, 0.6):  best 0.60, two best 1.20
    #   C = (0.1, 0.1)
    # With load_balance_bias the group score is the sum of its two best biased scores
    # (DeepSeek-V3) and B wins; without bias it is the group's best score and A wins.
    # Row 1 mirrors row 0 (A and B swapped) so that no group index is favoured. An identity
    # gate and x = logit(s) (sigmoid) or log(s) (softmax, which rescales every score alike
    # and so keeps both rankings) make the router see exactly these scores; the answer is
    # a set of expert ids, compared exactly.
    s = torch.tensor([[0.9, 0.05, 0.6, 0.6, 0.1, 0.1],
                      [0.6, 0.6, 0.05, 0.9, 0.1, 0.1]], dtype=torch.float64)
    E6 = s.shape[1]
    r = Router(E6, E6, 2, score_func=score_func, n_expert_groups=3, n_limited_groups=1,
               load_balance_bias=bias)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(E6))
    x = (s.logit() if score_func == "sigmoid" else s.log()).float()
    idx, _ = r(x)
    want = [[2, 3], [0, 1]] if bias else [[0, 1], [2, 3]]
    assert idx.sort(-1).values.tolist() == want
    if bias:  # the biased scores decide: +0.5 on expert 1 lifts group (0, 1) above the others
        r.expert_bias[1] = 0.5  # in both rows (row 0 sigmoid: 0.9 + 0.55 = 1.45 > 1.2)
        idx, _ = r(x)
        assert idx.sort(-1).values.tolist() == [[0, 1], [0, 1]]
