"""moe.rows: scatter_rows / gather_rows against dense float64 references, and gradcheck."""

import torch

from ep_fp8.moe.rows import gather_rows, scatter_rows

GEN = torch.Generator().manual_seed(0)


def _layout(R, k, n_fill):
    """idx (R, k) and fill (n_fill,) forming a random permutation of R*k + n_fill rows."""
    perm = torch.randperm(R * k + n_fill, generator=GEN)
    return perm[: R * k].view(R, k), perm[R * k :]


def test_scatter_rows_copies_each_row_to_its_k_destinations_and_zeroes_fill():
    R, k, D, n_fill = 5, 3, 4, 7
    idx, fill = _layout(R, k, n_fill)
    src = torch.randn(R, D, generator=GEN, dtype=torch.float64)
    out = scatter_rows(src, idx, fill, R * k + n_fill)
    want = torch.full((R * k + n_fill, D), float("nan"), dtype=torch.float64)
    for r in range(R):
        for j in range(k):
            want[idx[r, j]] = src[r]
    want[fill] = 0
    assert torch.equal(out, want)


def test_gather_rows_weighted_sum_matches_loop_reference():
    R, k, D, n_fill = 6, 2, 3, 4
    idx, fill = _layout(R, k, n_fill)
    rows = torch.randn(R * k + n_fill, D, generator=GEN, dtype=torch.float64)
    w = torch.rand(R, k, generator=GEN, dtype=torch.float64)
    out = gather_rows(rows, idx, fill, w)
    want = torch.stack([sum(w[r, j] * rows[idx[r, j]] for j in range(k)) for r in range(R)])
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_scatter_and_gather_pass_gradcheck_in_float64():
    R, k, D, n_fill = 4, 2, 3, 5
    idx, fill = _layout(R, k, n_fill)
    src = torch.randn(R, D, generator=GEN, dtype=torch.float64, requires_grad=True)
    rows = torch.randn(R * k + n_fill, D, generator=GEN, dtype=torch.float64, requires_grad=True)
    w = torch.rand(R, k, generator=GEN, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: scatter_rows(s, idx, fill, R * k + n_fill), (src,))
    assert torch.autograd.gradcheck(lambda m, ww: gather_rows(m, idx, fill, ww), (rows, w))
    assert torch.autograd.gradcheck(lambda m: gather_rows(m, idx, fill), (rows,))


def test_gather_rows_gradient_is_zero_on_rows_no_token_reads():
    R, k, D, n_fill = 3, 2, 4, 6
    idx, fill = _layout(R, k, n_fill)
    rows = torch.randn(R * k + n_fill, D, generator=GEN).to(torch.bfloat16).requires_grad_()
    w = torch.rand(R, k, generator=GEN)
    gather_rows(rows, idx, fill, w).float().sum().backward()
    assert torch.equal(rows.grad[fill], torch.zeros(n_fill, D, dtype=torch.bfloat16))
    assert bool((rows.grad[idx.flatten()] != 0).all())
