"""LocalDispatcher (EP = 1): layout of x_grouped, combine, gradients, bad input."""

import pytest
import torch

from ep_fp8.moe import LocalDispatcher

ALIGN = 16


def _routing(kind, T, k, E, gen):
    if kind == "uniform":
        return torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    if kind == "skewed":  # most choices land on expert 1, some experts get nothing
        idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
        idx[: (3 * T) // 4, 0] = 1
        idx[: (3 * T) // 4, 1:] = torch.where(idx[: (3 * T) // 4, 1:] == 1, 2, idx[: (3 * T) // 4, 1:])
        return idx
    if kind == "one_expert":
        return torch.full((T, k), E - 1, dtype=torch.int64)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["uniform", "skewed", "one_expert"])
def test_grouped_rows_are_expert_major_in_token_order_with_zero_padding(kind):
    gen = torch.Generator().manual_seed(0)
    T, k, E, D = 23, 2 if kind != "one_expert" else 3, 5, 4
    x = torch.randn(T, D, generator=gen)
    idx = _routing(kind, T, k, E, gen)
    xg, offs, state = LocalDispatcher(E).dispatch(x, idx)
    assert offs.dtype == torch.int32 and offs.shape == (E,)
    start = 0
    for e, end in enumerate(offs.tolist()):
        tokens = [t for t in range(T) for j in range(k) if idx[t, j] == e]
        assert (end - start) % ALIGN == 0 and end - start >= len(tokens)
        assert torch.equal(xg[start : start + len(tokens)], x[tokens])
        assert torch.equal(xg[start + len(tokens) : end], torch.zeros(end - start - len(tokens), D))
        start = end
    assert torch.equal(xg[start:], torch.zeros(xg.shape[0] - start, D))  # tail beyond the last group
    # every (token, choice) pair occupies exactly one grouped row, every other row is fill
    rows = torch.cat([state.idx_Tk.flatten(), state.fill_idx]).sort().values
    assert torch.equal(rows, torch.arange(xg.shape[0]))


def _per_expert_scale(xg, offs, scale_E):
    # a stand-in for the experts: row i of group e is multiplied by scale_E[e]
    sizes = torch.diff(offs.long(), prepend=offs.new_zeros(1).long())
    row_scale = torch.repeat_interleave(scale_E, sizes)
    row_scale = torch.cat([row_scale, row_scale.new_full((xg.shape[0] - row_scale.shape[0],), float("nan"))])
    return xg * row_scale[:, None]  # NaN in the tail: combine must never read it


@pytest.mark.parametrize("kind", ["uniform", "skewed", "one_expert"])
def test_combine_and_gradients_match_float64_dense_reference(kind):
    gen = torch.Generator().manual_seed(1)
    T, k, E, D = 17, 3, 6, 5
    x = torch.randn(T, D, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, generator=gen, dtype=torch.float64, requires_grad=True)
    scale_E = torch.randn(E, generator=gen, dtype=torch.float64)
    idx = _routing(kind, T, k, E, gen)
    d = LocalDispatcher(E)
    xg, offs, state = d.dispatch(x, idx)
    y = d.combine(_per_expert_scale(xg, offs, scale_E), w, state)
    grad_y = torch.randn(T, D, generator=gen, dtype=torch.float64)
    y.backward(grad_y)

    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = (w_ref[..., None] * scale_E[idx][..., None] * x_ref[:, None, :]).sum(1)
    y_ref.backward(grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)


def test_no_tokens_gives_empty_groups():
    d = LocalDispatcher(4)
    x = torch.zeros(0, 8, requires_grad=True)
    xg, offs, state = d.dispatch(x, torch.zeros(0, 2, dtype=torch.int64))
    assert torch.equal(offs, torch.zeros(4, dtype=torch.int32))
    y = d.combine(xg * 2, torch.zeros(0, 2), state)
    y.sum().backward()
    assert y.shape == (0, 8) and x.grad.shape == (0, 8)


def test_bad_dispatch_input_raises_clear_errors():
    d = LocalDispatcher(4)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        d.dispatch(x, torch.tensor([[0, 1], [2, 4], [1, 3]]))
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        d.dispatch(x, torch.tensor([[0, 1], [-1, 2], [1, 3]]))
    with pytest.raises(TypeError, match="int64"):
        d.dispatch(x, torch.tensor([[0, 1], [2, 3], [1, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match="tokens"):
        d.dispatch(x, torch.zeros(2, 2, dtype=torch.int64))
    xg, offs, state = d.dispatch(x, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="rows"):
        d.combine(xg[:-1], torch.ones(3, 2), state)
    with pytest.raises(ValueError, match="topk_w"):
        d.combine(xg, torch.ones(3, 1), state)
    with pytest.raises(TypeError, match="topk_w must be a floating-point tensor"):  # topk_idx passed by mistake
        d.combine(xg, torch.zeros(3, 2, dtype=torch.int64), state)
    with pytest.raises(ValueError, match="share a device"):
        d.combine(xg, torch.ones(3, 2, device="meta"), state)
    with pytest.raises(ValueError, match="n_experts"):
        LocalDispatcher(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_local_dispatch_matches_cpu_and_never_syncs():
    gen = torch.Generator().manual_seed(2)
    T, k, E, D = 512, 8, 64, 128
    x = torch.randn(T, D, generator=gen).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=gen)
    d = LocalDispatcher(E)
    xg_cpu, offs_cpu, st_cpu = d.dispatch(x, idx)
    y_cpu = d.combine(xg_cpu, w, st_cpu)
    x_d, idx_d, w_d = x.cuda().requires_grad_(), idx.cuda(), w.cuda().requires_grad_()
    xg, _, st = d.dispatch(x_d, idx_d)  # compiles the kernels outside the checked region
    d.combine(xg, w_d, st)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        xg, offs, st = d.dispatch(x_d, idx_d)
        y = d.combine(xg, w_d, st)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(offs.cpu(), offs_cpu) and torch.equal(xg.detach().cpu(), xg_cpu)
    # the GPU kernel may fuse multiply-adds: one bf16 rounding step apart at most
    torch.testing.assert_close(y.detach().cpu(), y_cpu, rtol=2**-7, atol=1e-6)
    want_grad_x = w.sum(1, keepdim=True).expand(T, D)  # identity experts: d y / d x = sum_j w_j
    torch.testing.assert_close(x_d.grad.float().cpu(), want_grad_x, rtol=2**-6, atol=1e-6)
