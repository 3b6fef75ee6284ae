"""The expert weights: w_t (G, K, N) -> the forward copy scaled per (g, n), made in
forward, and the backward copy scaled per (g, k), made in backward from the (g, k) amax
the forward measured. The experts store w as (G, N, K), so each (g, n) is a contiguous
row of K: the forward kernel is a row kernel (read once, amax, cast from registers) that
also gathers the column maxima for the backward copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ep_fp8.ops.quant_kernels.common import MAX_ROW_BLOCK, abs_nan_as_inf, scales_from_amax, to_fp8
from ep_fp8.ops.quant_ref import FP8_DTYPE

# The forward weight kernel: (g, n) rows per program; then, by row length, rows loaded at
# once and warps. H200, with the next rows' load issued ahead and the maxima taken in
# bf16: (8, 16384, 5120) 716 us, (8, 5120, 8192) 298 us (without either: 887 and 356 us;
# 16 rows per program: 970 us on the first).
WEIGHT_FWD_ROWS = 64
# Rows up to 2048 long: four at once, 4 warps. H200, against two at once: (8, 7168, 2048)
# 119 -> 110 us, (16, 2816, 2048) 103 -> 88 us, (32, 768, 2048) 60 -> 51 us, (16, 2048,
# 1408) 63 -> 59 us, but (16, 2048, 2048) 70 -> 74 us.
WEIGHT_FWD_SHORT_ROWS = (4, 4)
# Rows of 2049 to 4096: one at a time, 4 warps ((8, 14336, 4096): 421 us two at a time,
# 405 us one at a time).
WEIGHT_FWD_MID_ROWS = (1, 4)
WEIGHT_FWD_LONG_ROWS = (1, 8)  # longer rows: one at a time (two spill registers), 8 warps
# Rows longer than 4096 that a power-of-two block would pad by much are held as a block
# and a tail (weight_fwd_blocks), one row at a time with 4 warps: (8, 16384, 5120) 711 ->
# 639 us (8 warps: 704 us; two rows at a time: 1.4-1.7 ms). Shorter rows gain nothing
# from it ((16, 2048, 1408): 62 us as one block, 72 us at best as two).
WEIGHT_FWD_SPLIT_ROWS = (1, 4)


@triton.jit
def _weight_fwd_kernel(w_ptr, s_g, s_k, s_n, q_ptr, d_ptr, amax_bwd_ptr, K, N,
                       ROWS: tl.constexpr, AT_ONCE: tl.constexpr, BLOCK_K: tl.constexpr, TAIL_K: tl.constexpr,
                       ONE_BLOCK: tl.constexpr, BWD: tl.constexpr, EXACT: tl.constexpr):
    # ROWS consecutive n of one expert, AT_ONCE rows at a time. The |w| maxima per k over
    # them build up in registers and take one atomic per k per program (values >= 0, NaN as
    # +inf: atomic max is order-independent, hence deterministic). Fewer rows per program
    # means more atomics: H200, (8, 16384, 5120), 64 rows 0.89 ms, 4 rows 1.46 ms, 1 row 4.3 ms
    # (before the prefetch below).
    g = tl.program_id(0).to(tl.int64)
    n0 = tl.program_id(1) * ROWS
    ks = tl.arange(0, BLOCK_K)
    if ONE_BLOCK:
        # A row is held as a block of BLOCK_K columns plus, when TAIL_K > 0, a second block
        # of TAIL_K columns after it (K = 5120 as 4096 + 1024 rather than one block of 8192).
        mk = ks < K
        w_g = w_ptr + g * s_g + ks[None, :].to(tl.int64) * s_k
        ns = n0 + tl.arange(0, AT_ONCE)
        # The next rows' load is issued before this row's work: two row loads in flight
        # per program. Kept in w's dtype until used.
        v_next = tl.load(w_g + ns[:, None].to(tl.int64) * s_n, mask=(ns < N)[:, None] & mk[None, :], other=0.0)
        acc_k = tl.max(abs_nan_as_inf(v_next), axis=0)  # in w's dtype; the first rows count again below
        if TAIL_K > 0:
            kt = BLOCK_K + tl.arange(0, TAIL_K)
            mkt = kt < K
            w_gt = w_ptr + g * s_g + kt[None, :].to(tl.int64) * s_k
            vt_next = tl.load(w_gt + ns[:, None].to(tl.int64) * s_n, mask=(ns < N)[:, None] & mkt[None, :],
                              other=0.0)
            acc_t = tl.max(abs_nan_as_inf(vt_next), axis=0)
        for r in range(0, ROWS, AT_ONCE):
            ns = n0 + r + tl.arange(0, AT_ONCE)
            live = ns < N
            v = v_next
            ns_next = ns + AT_ONCE
            live_next = ((ns_next < N) & (r + AT_ONCE < ROWS))[:, None]
            v_next = tl.load(w_g + ns_next[:, None].to(tl.int64) * s_n, mask=live_next & mk[None, :], other=0.0)
            # Maxima in w's own dtype (exact: |v| and max round nothing): half the registers
            # of float32 for bf16 weights.
            va = abs_nan_as_inf(v)
            row_amax = tl.max(va, axis=1)
            if TAIL_K > 0:
                vt = vt_next
                vt_next = tl.load(w_gt + ns_next[:, None].to(tl.int64) * s_n, mask=live_next & mkt[None, :],
                                  other=0.0)
                vta = abs_nan_as_inf(vt)
                row_amax = tl.maximum(row_amax, tl.max(vta, axis=1))
            scale, descale = scales_from_amax(row_amax.to(tl.float32), EXACT)
            q_rows = q_ptr + (g * N + ns[:, None]) * K
            tl.store(q_rows + ks[None, :], to_fp8(v.to(tl.float32) * scale[:, None]), mask=live[:, None] & mk[None, :])
            tl.store(d_ptr + g * N + ns, descale, mask=live)
            acc_k = tl.maximum(acc_k, tl.max(va, axis=0))
            if TAIL_K > 0:
                tl.store(q_rows + kt[None, :], to_fp8(vt.to(tl.float32) * scale[:, None]),
                         mask=live[:, None] & mkt[None, :])
                acc_t = tl.maximum(acc_t, tl.max(vta, axis=0))
        if BWD:
            tl.atomic_max(amax_bwd_ptr + g * K + ks, acc_k.to(tl.float32), mask=mk, sem="relaxed")
            if TAIL_K > 0:
                tl.atomic_max(amax_bwd_ptr + g * K + kt, acc_t.to(tl.float32), mask=mkt, sem="relaxed")
    else:  # rows longer than one block, one at a time: amax, then cast (and column atomics) per block
        for r in range(ROWS):
            n = n0 + r
            live = n < N
            w_row = w_ptr + g * s_g + n.to(tl.int64) * s_n
            q_row = q_ptr + (g * N + n) * K
            acc = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mk = (k0 + ks < K) & live
                v = tl.load(w_row + (k0 + ks).to(tl.int64) * s_k, mask=mk, other=0.0).to(tl.float32)
                acc = tl.maximum(acc, abs_nan_as_inf(v))
            scale, descale = scales_from_amax(tl.max(acc, axis=0), EXACT)
            for k0 in range(0, K, BLOCK_K):
                mk = (k0 + ks < K) & live
                v = tl.load(w_row + (k0 + ks).to(tl.int64) * s_k, mask=mk, other=0.0).to(tl.float32)
                tl.store(q_row + k0 + ks, to_fp8(v * scale), mask=mk)
                if BWD:
                    tl.atomic_max(amax_bwd_ptr + g * K + k0 + ks, abs_nan_as_inf(v), mask=mk, sem="relaxed")
            tl.store(d_ptr + g * N + n, descale, mask=live)


@triton.jit
def _weight_bwd_cast_kernel(w_ptr, s_g, s_k, s_n, amax_ptr, q_ptr, d_ptr, K, N,
                            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EXACT: tl.constexpr):
    # Tiles of 64 k x 64 n: scaled per k, written (G, K, N) contiguous (transposed, the
    # column-major (G, N, K) operand of grad_x = grad_out @ w_t^T).
    g = tl.program_id(0).to(tl.int64)
    pk, pn = tl.program_id(1), tl.program_id(2)
    ks = pk * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    mk, mn = ks < K, ns < N
    mask = mk[:, None] & mn[None, :]
    ks64, ns64 = ks.to(tl.int64), ns.to(tl.int64)
    v = tl.load(w_ptr + g * s_g + ks64[:, None] * s_k + ns64[None, :] * s_n, mask=mask, other=0.0).to(tl.float32)
    scale, descale = scales_from_amax(tl.load(amax_ptr + g * K + ks, mask=mk, other=0.0), EXACT)
    tl.store(q_ptr + g * K * N + ks64[:, None] * N + ns64[None, :], to_fp8(v * scale[:, None]), mask=mask)
    tl.store(d_ptr + g * K + ks, descale, mask=mk & (pn == 0))


def weight_fwd_blocks(K: int) -> tuple[int, int]:
    """(BLOCK_K, TAIL_K): how the forward weight kernel holds a row of K. Up to
    MAX_ROW_BLOCK, one power-of-two block; rows longer than 4096 as two (4096 and a
    power-of-two tail) when that leaves fewer lanes idle: 5120 -> (4096, 1024), 7168 ->
    (8192, 0), 1408 -> (2048, 0). Longer rows: (MAX_ROW_BLOCK, 0), walked block by block."""
    full = min(triton.next_power_of_2(K), MAX_ROW_BLOCK)
    if K > full or full <= 4096:
        return full, 0
    head = full // 2
    tail = triton.next_power_of_2(K - head)
    return (head, tail) if head + tail < full else (full, 0)


def quantize_weight_fwd_triton(w_t: torch.Tensor, exact_scales: bool = False, bwd_amax: bool = True):
    """Triton twin of quant_ref.quantize_weight_fwd_ref: -> (q_fwd (G, N, K), descale_fwd (G, N), amax_bwd (G, K)).

    Fast when w_t's k stride is 1 (w stored (G, N, K), as the experts keep it); any
    strides work.
    """
    G, K, N = w_t.shape
    dev = w_t.device
    q_fwd = torch.empty((G, N, K), dtype=FP8_DTYPE, device=dev)
    d_fwd = torch.empty((G, N), dtype=torch.float32, device=dev)
    amax_bwd = torch.zeros((G, K) if bwd_amax else (0,), dtype=torch.float32, device=dev)
    if w_t.numel() == 0:
        return q_fwd, d_fwd, amax_bwd
    block_k, tail_k = weight_fwd_blocks(K)
    if tail_k:
        at_once, warps = WEIGHT_FWD_SPLIT_ROWS
    elif block_k <= 2048:
        at_once, warps = WEIGHT_FWD_SHORT_ROWS
    else:
        at_once, warps = WEIGHT_FWD_MID_ROWS if block_k <= 4096 else WEIGHT_FWD_LONG_ROWS
    _weight_fwd_kernel[(G, triton.cdiv(N, WEIGHT_FWD_ROWS))](
        w_t, w_t.stride(0), w_t.stride(1), w_t.stride(2), q_fwd, d_fwd, amax_bwd, K, N,
        ROWS=WEIGHT_FWD_ROWS, AT_ONCE=at_once, BLOCK_K=block_k, TAIL_K=tail_k, ONE_BLOCK=K <= block_k + tail_k,
        BWD=bwd_amax, EXACT=exact_scales, num_warps=warps)
    return q_fwd, d_fwd, amax_bwd


def quantize_weight_bwd_triton(w_t: torch.Tensor, amax_bwd: torch.Tensor, exact_scales: bool = False):
    """Triton twin of quant_ref.quantize_weight_bwd_ref: -> (q_bwd (G, K, N), descale_bwd (G, K))."""
    G, K, N = w_t.shape
    dev = w_t.device
    q_bwd = torch.empty((G, K, N), dtype=FP8_DTYPE, device=dev)
    d_bwd = torch.empty((G, K), dtype=torch.float32, device=dev)
    if w_t.numel() == 0:
        return q_bwd, d_bwd
    block_k, block_n = min(64, triton.next_power_of_2(K)), min(64, triton.next_power_of_2(N))
    _weight_bwd_cast_kernel[(G, triton.cdiv(K, block_k), triton.cdiv(N, block_n))](
        w_t, w_t.stride(0), w_t.stride(1), w_t.stride(2), amax_bwd, q_bwd, d_bwd, K, N,
        BLOCK_K=block_k, BLOCK_N=block_n, EXACT=exact_scales)
    return q_bwd, d_bwd
