"""Differentiable row movement between token order and the grouped layout.

Two primitives, each the other's backward:

- `scatter_rows(src, idx, fill_idx, n_out)`: out[idx[r, j]] = src[r] for every j,
  out[fill_idx] = 0. Dispatch: a token's row goes to its k destinations.
- `gather_rows(rows, idx, fill_idx, w)`: out[r] = sum_j w[r, j] * rows[idx[r, j]].
  Combine: a token collects its k expert outputs, weighted.

Precondition for both: the entries of idx (all r, j) and fill_idx together are every
row of [0, n_out) exactly once. The dispatchers build them that way, so every grouped
row is written exactly once (no zero-fill of the whole buffer) and gradients of padding
and tail rows are zeros, never stale memory. Sums over the k choices accumulate in
float32 and round once to the row dtype.
"""

from __future__ import annotations

import torch


def scatter_rows(
    src_RD: torch.Tensor, idx_Rk: torch.Tensor, fill_idx: torch.Tensor, n_out: int
) -> torch.Tensor:
    """(R, D) rows -> (n_out, D): row r copied to rows idx[r, :], fill_idx rows zeroed.

    Differentiable in src_RD; its gradient is the sum of the k destination gradients.
    idx_Rk and fill_idx are int64 on src's device (see the module precondition).
    """
    return _ScatterRows.apply(src_RD, idx_Rk, fill_idx, n_out)


def gather_rows(
    rows_MD: torch.Tensor,
    idx_Rk: torch.Tensor,
    fill_idx: torch.Tensor,
    w_Rk: torch.Tensor | None = None,
) -> torch.Tensor:
    """(M, D) rows -> (R, D): out[r] = sum_j w[r, j] * rows[idx[r, j]] (w = 1 if None).

    Differentiable in rows_MD and w_Rk (float32, (R, k)). The output has rows' dtype.
    """
    return _GatherRows.apply(rows_MD, idx_Rk, fill_idx, w_Rk)


def scatter_rows_forward(src_RD, idx_Rk, fill_idx, n_out, fill_value=0):
    """The forward of scatter_rows without autograd (also for uint8 float8 payloads)."""
    out = src_RD.new_empty((n_out, src_RD.shape[1]))
    for j in range(idx_Rk.shape[1]):
        out.index_copy_(0, idx_Rk[:, j], src_RD)
    out.index_fill_(0, fill_idx, fill_value)
    return out


def gather_rows_forward(rows_MD, idx_Rk, w_Rk=None):
    """The forward of gather_rows without autograd."""
    k = idx_Rk.shape[1]
    if k == 1 and w_Rk is None:
        return rows_MD.index_select(0, idx_Rk[:, 0])
    acc_dtype = _acc_dtype(rows_MD.dtype)
    acc = None
    for j in range(k):
        term = rows_MD.index_select(0, idx_Rk[:, j]).to(acc_dtype)
        if w_Rk is not None:
            term = term * w_Rk[:, j : j + 1]
        acc = term if acc is None else acc.add_(term)
    return acc.to(rows_MD.dtype)


class _ScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src_RD, idx_Rk, fill_idx, n_out):
        ctx.save_for_backward(idx_Rk)
        return scatter_rows_forward(src_RD, idx_Rk, fill_idx, n_out)

    @staticmethod
    def backward(ctx, grad_out):
        (idx_Rk,) = ctx.saved_tensors
        return gather_rows_forward(grad_out.contiguous(), idx_Rk), None, None, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_MD, idx_Rk, fill_idx, w_Rk):
        # rows are needed only for the weight gradient
        ctx.save_for_backward(rows_MD if w_Rk is not None else None, idx_Rk, fill_idx, w_Rk)
        ctx.rows_shape = rows_MD.shape
        return gather_rows_forward(rows_MD, idx_Rk, w_Rk)

    @staticmethod
    def backward(ctx, grad_out):
        rows_MD, idx_Rk, fill_idx, w_Rk = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        k = idx_Rk.shape[1]
        grad_rows = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_rows = grad_out.new_empty(ctx.rows_shape)
            for j in range(k):
                g = grad_out
                if w_Rk is not None:
                    g = (grad_out.to(_acc_dtype(g.dtype)) * w_Rk[:, j : j + 1]).to(grad_out.dtype)
                grad_rows.index_copy_(0, idx_Rk[:, j], g)
            grad_rows.index_fill_(0, fill_idx, 0)
        if w_Rk is not None and ctx.needs_input_grad[3]:
            acc_dtype = _acc_dtype(grad_out.dtype)
            grad_acc = grad_out.to(acc_dtype)
            grad_w = torch.stack(
                [(grad_acc * rows_MD.index_select(0, idx_Rk[:, j]).to(acc_dtype)).sum(-1) for j in range(k)],
                dim=1,
            ).to(w_Rk.dtype)
        return grad_rows, None, None, grad_w


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 for bf16/fp16/fp32 rows, float64 stays float64.
    return torch.promote_types(dtype, torch.float32)
