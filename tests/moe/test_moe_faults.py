"""Behaviours of ep_fp8.moe that the other moe tests leave open: the router's argument
checks at their edges (top_k = n_experts, group counts below one, input that is not one
row per token), two groups and groups of a single expert, route_norm dividing by the
selected sum and nothing else (also when every selected score underflows to 0),
last_aux_loss holding no graph, the balancing buffers following a device move that also
casts, gather_rows' gradient for the one input that needs it (a frozen expert still trains
the router), the unweighted gather keeping no rows for backward, the dispatcher's check of
x's rank, and padding rows written as zeros in dispatch and combine's backward even over
reused memory."""

import copy

import pytest
import torch

from ep_fp8.moe import LocalDispatcher, MoE, Router
from ep_fp8.moe.rows import gather_rows
from tests.ops._helpers import saved_by

B, S, D, H, E, K = 2, 6, 16, 32, 8, 2


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _scores64(router, x):
    logits = x.double() @ router.gate.weight.detach().double().T
    return logits.softmax(-1) if router.score_func == "softmax" else logits.sigmoid()


def _layout(R, k, n_fill, gen):
    """idx (R, k) and fill (n_fill,) forming a random permutation of R*k + n_fill rows."""
    perm = torch.randperm(R * k + n_fill, generator=gen)
    return perm[: R * k].view(R, k), perm[R * k :]


# --- router --------------------------------------------------------------------------------

def test_top_k_equal_to_n_experts_picks_every_expert_weighted_by_its_score():
    """top_k = n_experts is allowed: every token gets all E experts, and the normalised
    softmax weights are the scores themselves (float32 against float64: rtol 1e-5)."""
    torch.manual_seed(0)
    r = Router(D, E, E)
    x = torch.randn(20, D, generator=_gen(0))
    idx, w = r(x)
    assert torch.equal(idx.sort(-1).values, torch.arange(E).expand(20, E))
    torch.testing.assert_close(w.double(), _scores64(r, x).gather(1, idx), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("groups, limited, match", [
    (0, 1, r"n_expert_groups \(0\) must divide n_experts \(8\)"),
    (-2, 1, r"n_expert_groups \(-2\) must divide n_experts \(8\)"),   # -2 divides 8
    (2, 0, r"need 1 <= n_limited_groups <= n_expert_groups, got n_limited_groups=0"),
])
def test_group_counts_below_one_raise_the_error_naming_them(groups, limited, match):
    """n_expert_groups < 1 (0 would be a ZeroDivisionError, -2 divides 8) and
    n_limited_groups = 0 (the capacity check would otherwise blame top_k) raise the
    ValueError that names the group counts."""
    with pytest.raises(ValueError, match=match):
        Router(D, E, 2, n_expert_groups=groups, n_limited_groups=limited)


def test_router_rejects_input_that_is_not_one_row_per_token():
    """A (B, S, D) input to the router raises its ValueError, not an indexing error later."""
    with pytest.raises(ValueError, match=r"router input must be \(tokens, 16\), got shape \(2, 3, 16\)"):
        Router(D, E, 2)(torch.randn(2, 3, D))


def test_groups_of_one_expert_route_like_plain_top_k_of_the_biased_scores():
    """n_expert_groups = n_experts: a group's biased score is its one expert's (there is no
    second best to add), so keeping the 2 best groups and taking the top-2 inside them is
    the plain top-2 of scores + bias (float64 reference, expert sets compared exactly)."""
    torch.manual_seed(2)
    r = Router(D, E, 2, score_func="sigmoid", n_expert_groups=E, n_limited_groups=2)
    r.expert_bias.copy_(torch.linspace(-0.1, 0.1, E))
    x = torch.randn(32, D, generator=_gen(9))
    idx, _ = r(x)
    choice = _scores64(r, x) + r.expert_bias.double()
    assert torch.equal(idx.sort(-1).values, choice.topk(2, -1).indices.sort(-1).values)


def test_two_expert_groups_limit_the_choice_to_the_best_group():
    """n_expert_groups = 2, n_limited_groups = 1, no bias: both picks come from the group
    holding the token's best expert (a group scores its best score without bias), against
    float64 scores; the plain top-2 crosses the groups for some tokens."""
    torch.manual_seed(5)
    r = Router(D, E, 2, score_func="sigmoid", n_expert_groups=2, n_limited_groups=1,
               load_balance_bias=False)
    x = torch.randn(64, D, generator=_gen(12))
    idx, _ = r(x)
    s = _scores64(r, x)
    best_group = s.argmax(-1) // (E // 2)
    in_group = (torch.arange(E) // (E // 2))[None, :] == best_group[:, None]
    want = s.masked_fill(~in_group, float("-inf")).topk(2, -1).indices.sort(-1).values
    assert torch.equal(idx.sort(-1).values, want)
    assert not torch.equal(s.topk(2, -1).indices.sort(-1).values, want)


def test_route_norm_divides_by_the_selected_sum_and_nothing_else():
    """With 64 experts the two selected softmax scores sum to about 1/32; the normalised
    weights still sum to 1 within float32 rounding (1e-6; a regulariser of 1e-6 in the
    denominator would be off by 3e-5). When every selected score underflows to 0 (sigmoid
    of -200 in float32) the weights are 0, not 0/0."""
    torch.manual_seed(4)
    r = Router(D, 64, 2)
    _, w = r(torch.randn(32, D, generator=_gen(10)))
    assert float((w.detach().double().sum(-1) - 1).abs().max()) < 1e-6
    r = Router(E, E, 2, score_func="sigmoid")
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(E))
    _, w = r(torch.full((3, E), -200.0))
    assert torch.equal(w, torch.zeros(3, 2))


def test_last_aux_loss_is_a_detached_copy_that_holds_no_graph():
    """aux_loss returns a loss that trains the gate; router.last_aux_loss has its value but
    no grad_fn (a logged value must not keep the forward's graph alive), also after a
    MoE forward."""
    torch.manual_seed(3)
    r = Router(D, E, 2, aux_loss_coef=0.1)
    idx, _, scores = r.route(torch.randn(12, D, generator=_gen(3)))
    loss = r.aux_loss(scores, idx, n_seqs=3)
    assert loss.requires_grad
    assert torch.equal(r.last_aux_loss, loss.detach())
    assert not r.last_aux_loss.requires_grad and r.last_aux_loss.grad_fn is None
    moe = MoE(D, H, E, K, aux_loss_coef=0.1)
    moe(torch.randn(B, S, D, generator=_gen(4)))
    assert moe.router.last_aux_loss.grad_fn is None


def test_balancing_buffers_follow_a_device_move_that_also_casts():
    """router.to(device, bfloat16) keeps expert_bias and tokens_per_expert float32 and moves
    them to the device with the gate (the meta device stands in for a GPU)."""
    r = Router(D, E, 2).to("meta", torch.bfloat16)
    assert r.gate.weight.device.type == "meta" and r.gate.weight.dtype == torch.bfloat16
    for buf in (r.expert_bias, r.tokens_per_expert):
        assert buf.device.type == "meta" and buf.dtype == torch.float32


# --- rows and dispatch ----------------------------------------------------------------------

def test_gather_rows_gives_each_input_its_gradient_when_only_that_one_needs_it():
    """gather_rows(rows, idx, fill, w) with only w requiring grad gives w its gradient
    sum_d g[r, d] rows[idx[r, j], d]; with only rows requiring grad, rows get w[r, j] g[r]
    at idx[r, j] and 0 on fill rows (float64 both sides: 1e-12)."""
    gen = _gen(5)
    R, k, Dm, n_fill = 5, 3, 6, 4
    idx, fill = _layout(R, k, n_fill, gen)
    rows = torch.randn(R * k + n_fill, Dm, generator=gen, dtype=torch.float64)
    w = torch.rand(R, k, generator=gen, dtype=torch.float64)
    g = torch.randn(R, Dm, generator=gen, dtype=torch.float64)
    want_w = (g[:, None, :] * rows[idx]).sum(-1)
    want_rows = torch.zeros_like(rows).index_put_((idx.flatten(),),
                                                  (w[..., None] * g[:, None, :]).reshape(-1, Dm))
    w_leaf = w.clone().requires_grad_()
    gather_rows(rows, idx, fill, w_leaf).backward(g)
    torch.testing.assert_close(w_leaf.grad, want_w, rtol=1e-12, atol=1e-12)
    rows_leaf = rows.clone().requires_grad_()
    gather_rows(rows_leaf, idx, fill, w).backward(g)
    torch.testing.assert_close(rows_leaf.grad, want_rows, rtol=1e-12, atol=1e-12)


def test_router_trains_when_the_routed_experts_are_frozen():
    """Frozen routed experts and an input without gradient: the gate's gradient still comes
    back through combine, equal to the one of the same layer with trainable experts
    (the same float32 arithmetic: rtol 1e-6)."""
    torch.manual_seed(1)
    moe = MoE(D, H, E, K)
    frozen = copy.deepcopy(moe)
    frozen.experts.requires_grad_(False)
    x = torch.randn(B, S, D, generator=_gen(6))
    grad = torch.randn(B, S, D, generator=_gen(7))
    moe(x).backward(grad)
    frozen(x).backward(grad)
    assert frozen.experts.w13.grad is None
    assert frozen.router.gate.weight.grad is not None
    torch.testing.assert_close(frozen.router.gate.weight.grad, moe.router.gate.weight.grad, rtol=1e-6, atol=0)


def test_unweighted_gather_keeps_no_reference_to_its_rows_for_backward():
    """The rows are needed only for the weights' gradient: the unweighted gather (combine's
    regrouping under expert parallelism, on the largest activation of the layer) saves
    them not, the weighted one does; the unweighted backward still gives the rows theirs."""
    gen = _gen(8)
    idx, fill = _layout(4, 1, 5, gen)
    rows = torch.randn(9, 6, generator=gen, requires_grad=True)
    out, saved = saved_by(gather_rows, rows, idx, fill)
    assert rows.data_ptr() not in [t.data_ptr() for t in saved]
    w = torch.rand(4, 1, generator=gen, requires_grad=True)
    _, saved_w = saved_by(gather_rows, rows, idx, fill, w)
    assert rows.data_ptr() in [t.data_ptr() for t in saved_w]
    out.sum().backward()
    want = torch.zeros(9, 6).index_put_((idx.flatten(),), torch.ones(4, 6))
    assert torch.equal(rows.grad, want)


def test_dispatch_rejects_x_that_is_not_one_row_per_token():
    """A 3-D x raises the dispatcher's ValueError naming the shape (not an index_copy error)."""
    with pytest.raises(ValueError, match=r"x must be \(tokens, dim\), got shape \(3, 2, 16\)"):
        LocalDispatcher(4).dispatch(torch.randn(3, 2, D), torch.zeros(3, 2, dtype=torch.int64))


def _junk(shape, n=8):
    # Freed NaN blocks of the size the next buffers get: memory a fresh tensor may reuse.
    blocks = [torch.full(shape, float("nan")) for _ in range(n)]
    del blocks


def test_padding_rows_are_written_as_zeros_in_dispatch_and_in_combines_backward():
    """x_grouped's padding and tail rows, and the gradient combine writes into them, are
    zeros even where the buffers reuse freed memory full of NaN (unwritten rows would feed
    NaN into the experts' weight gradients)."""
    gen = _gen(11)
    T, k, Ex, Dx = 23, 2, 5, 4
    M = T * k + Ex * 15
    x = torch.randn(T, Dx, generator=gen)
    idx = torch.stack([torch.randperm(Ex, generator=gen)[:k] for _ in range(T)])
    d = LocalDispatcher(Ex)
    _junk((M, Dx))
    xg, _, state = d.dispatch(x, idx)
    assert xg.shape == (M, Dx) and state.fill_idx.numel() > 0
    assert torch.equal(xg[state.fill_idx], torch.zeros(state.fill_idx.numel(), Dx))
    yg = torch.randn(M, Dx, generator=gen, requires_grad=True)
    w = torch.rand(T, k, generator=gen)
    y = d.combine(yg, w, state)
    _junk((M, Dx))
    y.backward(torch.randn(T, Dx, generator=gen))
    assert torch.equal(yg.grad[state.fill_idx], torch.zeros(state.fill_idx.numel(), Dx))
    assert bool(torch.isfinite(yg.grad).all())
