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
float32 and round once to the row dtype. The kernels are in ep_fp8.ops.permute.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol

from ep_fp8.ops.permute import gather_rows_sum, gather_rows_sum_backward, scatter_rows_into


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

    Differentiable in rows_MD and w_Rk ((R, k), float32). The output has rows' dtype.
    """
    return _GatherRows.apply(rows_MD, idx_Rk, fill_idx, w_Rk)


class _ScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src_RD, idx_Rk, fill_idx, n_out):
        ctx.save_for_backward(idx_Rk)
        return scatter_rows_into(wait_collective(src_RD), idx_Rk, fill_idx, n_out)

    @staticmethod
    def backward(ctx, grad_out):
        (idx_Rk,) = ctx.saved_tensors
        return gather_rows_sum(grad_out.contiguous(), idx_Rk), None, None, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows_MD, idx_Rk, fill_idx, w_Rk):
        rows_MD = wait_collective(rows_MD)
        # rows are needed only for the weight gradient
        ctx.save_for_backward(rows_MD if w_Rk is not None else None, idx_Rk, fill_idx, w_Rk)
        ctx.n_rows = rows_MD.shape[0]
        return gather_rows_sum(rows_MD, idx_Rk, w_Rk)

    @staticmethod
    def backward(ctx, grad_out):
        rows_MD, idx_Rk, fill_idx, w_Rk = ctx.saved_tensors
        grad_rows, grad_w = gather_rows_sum_backward(
            grad_out.contiguous(), rows_MD, idx_Rk, fill_idx, w_Rk, ctx.n_rows,
            need_rows=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[3],
        )
        return grad_rows, None, None, grad_w


def wait_collective(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor of a functional collective's result.

    Eager functional collectives return an AsyncCollectiveTensor, a wrapper without
    storage (Triton kernels cannot read it): wait for it. Traced ones are plain already.
    Not differentiable: call it where autograd is not recording (inside a Function).
    """
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t
