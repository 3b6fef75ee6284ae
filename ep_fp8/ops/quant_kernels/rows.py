"""Row scaling: x (M, K) for the forward GEMM, grad_out (M, N) for grad_x; and the zeroing
of the rows past offs[-1], which belong to no group and which the grouped GEMMs leave
unwritten."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ep_fp8.ops.quant_kernels.common import MAX_ROW_BLOCK, abs_nan_as_inf, scales_from_amax, to_fp8
from ep_fp8.ops.quant_ref import FP8_DTYPE


@triton.jit
def _quant_rows_kernel(a_ptr, stride_am, stride_ac, q_ptr, scale_ptr, descale_ptr, C,
                       BLOCK_C: tl.constexpr, ONE_BLOCK: tl.constexpr, EXACT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * stride_am
    q_row = q_ptr + row * C
    cols = tl.arange(0, BLOCK_C)
    if ONE_BLOCK:
        # The whole row in registers: read once, amax, scale, cast, store.
        mask = cols < C
        v = tl.load(a_row + cols.to(tl.int64) * stride_ac, mask=mask, other=0.0).to(tl.float32)
        scale, descale = scales_from_amax(tl.max(abs_nan_as_inf(v), axis=0), EXACT)
        tl.store(q_row + cols, to_fp8(v * scale), mask=mask)
    else:
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            mask = c0 + cols < C
            v = tl.load(a_row + (c0 + cols).to(tl.int64) * stride_ac, mask=mask, other=0.0).to(tl.float32)
            acc = tl.maximum(acc, abs_nan_as_inf(v))
        scale, descale = scales_from_amax(tl.max(acc, axis=0), EXACT)
        for c0 in range(0, C, BLOCK_C):
            mask = c0 + cols < C
            v = tl.load(a_row + (c0 + cols).to(tl.int64) * stride_ac, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_row + c0 + cols, to_fp8(v * scale), mask=mask)
    tl.store(scale_ptr + row, scale)
    tl.store(descale_ptr + row, descale)


def quantize_rows_triton(a: torch.Tensor, exact_scales: bool = False):
    """Triton twin of quant_ref.quantize_rows_ref: a (M, C) any strides -> (q, scale, descale)."""
    M, C = a.shape
    q = torch.empty((M, C), dtype=FP8_DTYPE, device=a.device)
    scale = torch.empty(M, dtype=torch.float32, device=a.device)
    descale = torch.empty(M, dtype=torch.float32, device=a.device)
    if M == 0:
        return q, scale, descale
    block = min(triton.next_power_of_2(max(C, 1)), MAX_ROW_BLOCK)
    _quant_rows_kernel[(M,)](
        a, a.stride(0), a.stride(1), q, scale, descale, C,
        BLOCK_C=block, ONE_BLOCK=C <= block, EXACT=exact_scales,
        num_warps=4 if block <= 2048 else 8,
    )
    return q, scale, descale


@triton.jit
def _zero_rows_past_end_kernel(out_ptr, s_m, s_n, offs_ptr, G, M, N,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    end = tl.load(offs_ptr + G - 1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mr = (rows >= end) & (rows < M)
    # Blocks entirely inside the groups do nothing: a loop of zero trips.
    n_iters = tl.where(pid * BLOCK_M + BLOCK_M > end, tl.cdiv(N, BLOCK_N), 0)
    zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=out_ptr.dtype.element_ty)
    for i in range(0, n_iters):
        cols = i * BLOCK_N + tl.arange(0, BLOCK_N)
        ptrs = out_ptr + rows[:, None].to(tl.int64) * s_m + cols[None, :].to(tl.int64) * s_n
        tl.store(ptrs, zeros, mask=mr[:, None] & (cols < N)[None, :])


def zero_rows_past_end_triton(out: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Triton twin of quant_ref.zero_rows_past_end_ref, but in place on out (M, N): a copy
    would cost a pass over the GEMM result. Safe where selective activation checkpointing
    keeps that result for the recompute (the reason the reference is out of place): the
    recompute zeroes the same rows of the same tensor again, which changes nothing."""
    M, N = out.shape
    if M and N:
        _zero_rows_past_end_kernel[(triton.cdiv(M, 32),)](
            out, out.stride(0), out.stride(1), offs, offs.shape[0], M, N, BLOCK_M=32, BLOCK_N=128)
    return out
