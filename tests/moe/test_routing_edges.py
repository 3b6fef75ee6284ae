"""Router and LocalDispatcher corner cases against float64 loop references: group scores of
groups larger than two, negative biased scores, bfloat16 inputs, the cross-rank count
reduction of the bias update, the aux-loss gradient scale, worst-case group padding."""

import copy

import pytest
import torch
import torch.distributed as dist

from ep_fp8.moe import LocalDispatcher, MoE
from ep_fp8.moe.router import Router, balance_routers, set_aux_grad_scale

ALIGN = 16


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _scores64(router, x):
    logits = x.double() @ router.gate.weight.double().T
    return logits.softmax(-1) if router.score_func == "softmax" else logits.sigmoid()


def _group_limited_topk64(choice, G, L, k, sum_two_best):
    """Per token, in float64: score each of G contiguous groups (sum of its two best
    choices, or its best), keep the L best groups, then the k best experts inside them."""
    T, E = choice.shape
    size = E // G
    picked = []
    for t in range(T):
        group_scores = []
        for g in range(G):
            vals = sorted(choice[t, g * size : (g + 1) * size].tolist(), reverse=True)
            group_scores.append(vals[0] + vals[1] if sum_two_best else vals[0])
        kept = sorted(range(G), key=lambda g: group_scores[g], reverse=True)[:L]
        candidates = [e for g in kept for e in range(g * size, (g + 1) * size)]
        best = sorted(candidates, key=lambda e: choice[t, e].item(), reverse=True)[:k]
        picked.append(sorted(best))
    return picked


def _grouped_router(seed, bias):
    torch.manual_seed(seed)
    E, G, L, k = 16, 4, 2, 4  # groups of four experts: more than the two best count
    r = Router(12, E, k, score_func="sigmoid", route_scale=2.0,
               n_expert_groups=G, n_limited_groups=L, load_balance_bias=True)
    r.expert_bias.copy_(bias(E))
    return r, G, L, k


def _check_group_limited_routing(r, G, L, k, x):
    idx, w = r(x)
    s = _scores64(r, x)
    choice = s + r.expert_bias.double()
    want_idx = _group_limited_topk64(choice, G, L, k, sum_two_best=True)
    assert idx.sort(-1).values.tolist() == want_idx
    want_w = s.gather(1, idx)
    want_w = 2.0 * want_w / want_w.sum(-1, keepdim=True)
    torch.testing.assert_close(w.double(), want_w, rtol=1e-5, atol=1e-7)  # float32 scores


def test_biased_group_score_sums_only_the_two_best_of_a_four_expert_group():
    r, G, L, k = _grouped_router(0, lambda E: (torch.rand(E, generator=_gen(1)) - 0.5) * 0.4)
    x = torch.randn(96, 12, generator=_gen(2))
    _check_group_limited_routing(r, G, L, k, x)


def test_dropped_groups_lose_even_when_every_biased_score_is_negative():
    # A long run of bias updates can push every bias below -1: the kept groups' choices
    # are then all negative, and the dropped groups must still never be picked.
    r, G, L, k = _grouped_router(3, lambda E: -3.0 + torch.rand(E, generator=_gen(4)) * 0.5)
    x = torch.randn(64, 12, generator=_gen(5))
    _check_group_limited_routing(r, G, L, k, x)
    idx, _ = r(x)
    choice = _scores64(r, x) + r.expert_bias.double()
    assert bool((choice.gather(1, idx) < 0).all())  # the scenario really is all-negative


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_bfloat16_input_gives_float32_scores_and_weights(score_func):
    # Identity gate: the bf16 logits are exactly the bf16 inputs, so the float64 reference
    # sees the same logits; float32 scores then agree to ~1e-7 relative, bf16 ones to ~4e-3.
    E, k = 8, 3
    r = Router(E, E, k, score_func=score_func)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(E))
    r = r.to(torch.bfloat16)
    x = torch.randn(40, E, generator=_gen(6)).to(torch.bfloat16)
    idx, w = r(x)
    assert w.dtype == torch.float32
    logits = x.double()
    s = logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()
    assert torch.equal(idx.sort(-1).values, s.topk(k, -1).indices.sort(-1).values)
    want = s.gather(1, idx)
    want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(w.double(), want, rtol=1e-5, atol=1e-7)  # float32 arithmetic


def test_bias_update_uses_counts_summed_over_the_group_for_every_layer(monkeypatch):
    model = torch.nn.ModuleList([Router(8, 4, 2), Router(8, 4, 2)])
    local = [[4.0, 0, 2, 2], [1.0, 1, 1, 5]]
    other_rank = [[0.0, 4, 2, 2], [3.0, 3, 3, 1]]
    for r, c in zip(model, local):
        r.tokens_per_expert.copy_(torch.tensor(c))
    group = object()
    calls = []

    def fake_all_reduce(tensor, op=None, group=None):
        calls.append((op, group))
        tensor += torch.tensor(other_rank[0] + other_rank[1])

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    rate = 0.125
    imbalance = balance_routers(model, rate, group=group)
    assert len(calls) == 1 and calls[0][1] is group and calls[0][0] == dist.ReduceOp.SUM
    want_imbalance = []
    for r, a, b in zip(model, local, other_rank):
        total = [ai + bi for ai, bi in zip(a, b)]
        mean = sum(total) / len(total)
        want_imbalance.append(max(total) / mean)
        want_bias = [rate * ((mean > c) - (mean < c)) for c in total]
        assert r.expert_bias.tolist() == want_bias  # exact: 0.125 * (-1, 0, 1)
        assert not r.tokens_per_expert.any()
    assert imbalance.tolist() == pytest.approx(want_imbalance, rel=1e-6)  # float32 division
    assert model[0].expert_bias.tolist() == [0.0] * 4  # balanced overall, though not locally


def _aux64(gate_w64, x_TD, idx, n_seqs, coef):
    """coef * mean over sequences of sum_i f_i P_i, in float64, by loops over sequences."""
    T, E = x_TD.shape[0], gate_w64.shape[0]
    S, k = T // n_seqs, idx.shape[1]
    s = (x_TD.double() @ gate_w64.T).softmax(-1)
    total = 0.0
    for b in range(n_seqs):
        seq = slice(b * S, (b + 1) * S)
        f = torch.bincount(idx[seq].flatten(), minlength=E).double() * E / (k * S)
        p = (s[seq] / s[seq].sum(-1, keepdim=True)).mean(0)
        total = total + (f * p).sum()
    return coef * total / n_seqs


def test_aux_grad_scale_reaches_every_moe_layer_and_scales_only_the_aux_gradient():
    B, S, D, H, E, K, coef, scale = 2, 5, 16, 24, 8, 2, 0.3, 0.25
    torch.manual_seed(7)
    layers = torch.nn.ModuleList([MoE(D, H, E, K, aux_loss_coef=coef) for _ in range(2)])
    plain = copy.deepcopy(layers)
    for m in plain:
        m.router.aux_loss_coef = 0.0
    set_aux_grad_scale(layers, scale)
    assert [m.router.aux_grad_scale for m in layers] == [scale, scale]
    x = torch.randn(B, S, D, generator=_gen(8))
    grad = torch.randn(B, S, D, generator=_gen(9))
    for model in (layers, plain):
        sum(m(x) for m in model).backward(grad)
    for m, p in zip(layers, plain):
        idx, _ = m.router(x.reshape(-1, D))
        w64 = m.router.gate.weight.detach().double().requires_grad_()
        _aux64(w64, x.reshape(-1, D), idx, B, coef).backward()
        got = m.router.gate.weight.grad - p.router.gate.weight.grad
        # float32 gradients against float64: a few float32 roundings of the total gradient
        torch.testing.assert_close(got.double(), scale * w64.grad, rtol=1e-4, atol=1e-6)
        assert float(w64.grad.abs().max()) > 1e-3  # the aux gradient is not negligible


def test_worst_case_padding_fills_exactly_the_documented_row_bound():
    # Every expert gets 1 mod 16 rows, so every group needs 15 padding rows: the padded
    # groups fill M = T*k + E*(16-1) exactly, with no tail.
    E, D = 4, 6
    pairs = [(1, 2)] * 16 + [(0, 3), (2, 1)]  # counts 1, 17, 17, 1
    gen = _gen(10)
    idx = torch.tensor(pairs)[torch.randperm(len(pairs), generator=gen)]
    swap = torch.rand(len(pairs), generator=gen) < 0.5
    idx[swap] = idx[swap].flip(1)
    T, k = idx.shape
    x = torch.randn(T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, generator=gen, dtype=torch.float64)
    scale_E = torch.randn(E, generator=gen, dtype=torch.float64)
    d = LocalDispatcher(E)
    xg, offs, state = d.dispatch(x, idx)
    assert xg.shape[0] == T * k + E * (ALIGN - 1)
    assert offs.tolist() == [16, 48, 80, 96]
    start = 0
    for e, end in enumerate(offs.tolist()):
        tokens = [t for t in range(T) for j in range(k) if idx[t, j] == e]
        assert torch.equal(xg[start : start + len(tokens)], x[tokens].detach())
        assert not xg[start + len(tokens) : end].any()
        start = end
    sizes = torch.diff(offs.long(), prepend=torch.zeros(1, dtype=torch.long))
    y = d.combine(xg * torch.repeat_interleave(scale_E, sizes)[:, None], w, state)
    want = torch.stack([sum(w[t, j] * scale_E[idx[t, j]] * x[t].detach() for j in range(k))
                        for t in range(T)])
    torch.testing.assert_close(y.detach(), want, rtol=1e-12, atol=1e-12)  # float64 both sides
    y.sum().backward()
    want_grad = (w * scale_E[idx]).sum(1, keepdim=True).expand(T, D)
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-12, atol=1e-12)
