"""Token groups: x (M, K) and grad_out (M, N) for grad_w, scaled per (group, column) and
written transposed with each group padded (see quant_ref.quantize_cols_grouped_ref).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ep_fp8.ops.quant_kernels.common import abs_nan_as_inf, scales_from_amax, to_fp8
from ep_fp8.ops.quant_ref import FP8_DTYPE, GROUP_PAD, padded_length

_PAD = tl.constexpr(GROUP_PAD)
# The token-group column kernels. Pass 1 (amaxes): rows per program, columns per block,
# blocks per program, warps; pass 2 (cast): columns per program, warps. H200, 16384 x
# 16384 bf16, rows and columns: 491 us for both passes (pass 2 alone 293 us); one block
# per program and 4 warps, the first version, took 634 us.
COLS_PASS1_CONFIG = (128, 64, 8, 2)
COLS_PASS2_CONFIG = (256, 4)


@triton.jit
def _load_rows_tile(a_ptr, s_am, s_ac, row_descale_ptr, rows, mr, cs64, mc, HAS_ROW_DESCALE: tl.constexpr):
    """a[rows, cs] as float32 (0 where masked), times row_descale[rows] for float8 input."""
    v = tl.load(a_ptr + rows[:, None].to(tl.int64) * s_am + cs64[None, :] * s_ac,
                mask=mr[:, None] & mc[None, :], other=0.0).to(tl.float32)
    if HAS_ROW_DESCALE:
        v = v * tl.load(row_descale_ptr + rows, mask=mr, other=0.0)[:, None]
    return v


@triton.jit
def _group_of_block(offs_ptr, p0, M, G, BLOCK_G: tl.constexpr):
    """The token group whose padded columns hold p0 (a multiple of GROUP_PAD), from offs.

    Returns (h, start, size, pstart, psize): h == G when p0 is past the last group.
    Every program scans offs itself (G int32 loads from L2): no prologue launch, no
    host sync, and GROUP_PAD-aligned blocks never straddle two groups.
    """
    gi = tl.arange(0, BLOCK_G)
    live = gi < G
    ends = tl.minimum(tl.maximum(tl.load(offs_ptr + gi, mask=live, other=0), 0), M)
    starts = tl.minimum(tl.maximum(tl.load(offs_ptr + gi - 1, mask=(gi > 0) & live, other=0), 0), M)
    sizes = tl.maximum(ends - starts, 0)
    padded = tl.where(live, tl.maximum((sizes + _PAD - 1) // _PAD * _PAD, _PAD), 0)
    pends = tl.cumsum(padded, axis=0)
    h = tl.sum((live & (pends <= p0)).to(tl.int32), axis=0)
    pick = gi == h
    start = tl.sum(tl.where(pick, starts, 0), axis=0)
    size = tl.sum(tl.where(pick, sizes, 0), axis=0)
    psize = tl.sum(tl.where(pick, padded, 0), axis=0)
    pstart = tl.sum(tl.where(pick, pends, 0), axis=0) - psize
    return h, start, size, pstart, psize


@triton.jit
def _cols_amax_kernel(a_ptr, s_am, s_ac, row_descale_ptr, offs_ptr, amax_ptr, row_amax_ptr, M, C, G,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_G: tl.constexpr,
                      HAS_ROW_DESCALE: tl.constexpr, ROWS: tl.constexpr):
    # Pass 1, one program per BLOCK_R rows of a x CHUNKS blocks of BLOCK_C columns: the
    # column maxima of each block, combined per (group, column) by atomic max, and with
    # ROWS the row maxima over all its blocks (one atomic per row per program). The values
    # are >= 0 (NaN as +inf), for which float max is order-independent: deterministic.
    r0 = tl.program_id(0) * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    mr = rows < M
    # Row r is in group h = #{g : end_g <= r} (ends clamped into [0, M], as quant_ref's
    # group_bounds); h == G past offs[-1].
    gi = tl.arange(0, BLOCK_G)
    live = gi < G
    ends = tl.minimum(tl.maximum(tl.load(offs_ptr + gi, mask=live, other=0), 0), M)
    last_row = tl.minimum(r0 + BLOCK_R, M) - 1
    h_first = tl.sum((live & (ends <= r0)).to(tl.int32), axis=0)
    h_last = tl.minimum(tl.sum((live & (ends <= last_row)).to(tl.int32), axis=0), G - 1)
    # Usually every row of the tile lies in group h_first: its column maxima then need no
    # row selection and no group bounds per block (H200: 10% faster on 16384 x 16384).
    one_group = (h_first == h_last) & (h_first < G) & (tl.sum(tl.where(gi == h_first, ends, 0), axis=0) > last_row)
    acc_r = tl.zeros([BLOCK_R], dtype=tl.float32)
    for i in range(CHUNKS):
        cs = (tl.program_id(1) * CHUNKS + i) * BLOCK_C + tl.arange(0, BLOCK_C)
        mc = cs < C
        va = abs_nan_as_inf(_load_rows_tile(a_ptr, s_am, s_ac, row_descale_ptr, rows, mr, cs.to(tl.int64), mc,
                                             HAS_ROW_DESCALE))
        if ROWS:
            acc_r = tl.maximum(acc_r, tl.max(va, axis=1))
        if one_group:  # rows past M loaded as 0, which no maximum of values >= 0 sees
            tl.atomic_max(amax_ptr + h_first * C + cs, tl.max(va, axis=0), mask=mc, sem="relaxed")
        else:
            for h in range(h_first, h_last + 1):
                start = tl.minimum(tl.maximum(tl.load(offs_ptr + h - 1, mask=h > 0, other=0), 0), M)
                end = tl.minimum(tl.maximum(tl.load(offs_ptr + h), 0), M)
                sel = (rows >= start) & (rows < end)
                tl.atomic_max(amax_ptr + h * C + cs, tl.max(tl.where(sel[:, None], va, 0.0), axis=0), mask=mc,
                              sem="relaxed")
    if ROWS:
        tl.atomic_max(row_amax_ptr + rows, acc_r, mask=mr, sem="relaxed")


@triton.jit
def _cols_cast_kernel(a_ptr, s_am, s_ac, row_descale_ptr, offs_ptr, amax_ptr,
                      qT_ptr, descale_ptr, poffs_ptr, row_amax_ptr, q_ptr, scale_ptr, row_descale_out_ptr,
                      M, C, P, G, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
                      HAS_ROW_DESCALE: tl.constexpr, ROWS: tl.constexpr, EXACT: tl.constexpr):
    # Pass 2, one program per (GROUP_PAD padded columns) x (BLOCK_C columns of a): scale,
    # cast, and write transposed into qT (C, P); with ROWS also the row-scaled copy q (M, C).
    p0 = tl.program_id(0) * _PAD
    pc = tl.program_id(1)
    h, start, size, pstart, psize = _group_of_block(offs_ptr, p0, M, G, BLOCK_G)
    if h < G:  # columns past the last group stay unwritten
        local = p0 - pstart
        rr = tl.arange(0, _PAD)
        mr = local + rr < size
        rows = start + local + rr
        cs = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        mc = cs < C
        cs64 = cs.to(tl.int64)
        h64 = h.to(tl.int64)
        scale, descale = scales_from_amax(tl.load(amax_ptr + h64 * C + cs, mask=mc, other=0.0), EXACT)
        v = _load_rows_tile(a_ptr, s_am, s_ac, row_descale_ptr, rows, mr, cs64, mc, HAS_ROW_DESCALE)
        if ROWS:
            r_scale, r_descale = scales_from_amax(tl.load(row_amax_ptr + rows, mask=mr, other=0.0), EXACT)
            tl.store(q_ptr + rows[:, None].to(tl.int64) * C + cs64[None, :], to_fp8(v * r_scale[:, None]),
                     mask=mr[:, None] & mc[None, :])
            tl.store(scale_ptr + rows, r_scale, mask=mr & (pc == 0))
            tl.store(row_descale_out_ptr + rows, r_descale, mask=mr & (pc == 0))
        v = tl.where(mr[:, None], v * scale[None, :], 0.0)  # padding is 0, even if scale is NaN
        tl.store(qT_ptr + cs64[None, :] * P + (p0 + rr)[:, None], to_fp8(v), mask=mc[None, :])
        first = local == 0  # the group's first tile writes its descale and padded end
        tl.store(descale_ptr + h64 * C + cs, descale, mask=mc & first)
        if first & (pc == 0):
            tl.store(poffs_ptr + h, pstart + psize)


def _cols_grouped(a, offs, exact_scales, row_descale, rows):
    M, C = a.shape
    G = offs.shape[0]
    P = padded_length(M, G)
    dev = a.device
    qT = torch.empty((C, P), dtype=FP8_DTYPE, device=dev)
    descale = torch.empty((G, C), dtype=torch.float32, device=dev)
    poffs = torch.empty(G, dtype=torch.int32, device=dev)
    q = torch.empty((M, C) if rows else (0,), dtype=FP8_DTYPE, device=dev)
    r_scale = torch.empty(M if rows else 0, dtype=torch.float32, device=dev)
    r_descale = torch.empty(M if rows else 0, dtype=torch.float32, device=dev)
    outs = (q, r_scale, r_descale, qT, descale, poffs)
    if G == 0:
        return outs
    amax = torch.zeros(G * C + (M if rows else 0), dtype=torch.float32, device=dev)  # one memset for both
    col_amax, row_amax = amax[: G * C], amax[G * C:]
    rd = row_descale if row_descale is not None else amax  # unread without row_descale
    common = dict(BLOCK_G=triton.next_power_of_2(G), HAS_ROW_DESCALE=row_descale is not None, ROWS=rows)
    if M:
        block_r, block_c, chunks, warps = COLS_PASS1_CONFIG
        block_c = min(block_c, triton.next_power_of_2(max(C, 1)))
        chunks = min(chunks, triton.cdiv(C, block_c))
        _cols_amax_kernel[(triton.cdiv(M, block_r), triton.cdiv(C, block_c * chunks))](
            a, a.stride(0), a.stride(1), rd, offs, col_amax, row_amax, M, C, G,
            BLOCK_R=block_r, BLOCK_C=block_c, CHUNKS=chunks, num_warps=warps, **common)
    block_c, warps = COLS_PASS2_CONFIG
    block_c = min(block_c, triton.next_power_of_2(max(C, 1)))
    _cols_cast_kernel[(P // GROUP_PAD, triton.cdiv(C, block_c))](
        a, a.stride(0), a.stride(1), rd, offs, col_amax, qT, descale, poffs, row_amax, q, r_scale, r_descale,
        M, C, P, G, BLOCK_C=block_c, EXACT=exact_scales, num_warps=warps, **common)
    return outs


def quantize_cols_grouped_triton(a: torch.Tensor, offs: torch.Tensor, exact_scales: bool = False,
                                 row_descale: torch.Tensor | None = None):
    """Triton twin of quant_ref.quantize_cols_grouped_ref: -> (qT (C, P), descale (G, C), poffs (G,)).

    Two launches: column amaxes by atomic max over tiles of source rows, then the cast
    over tiles of GROUP_PAD padded columns, each of which lies in one group by construction.
    """
    return _cols_grouped(a, offs, exact_scales, row_descale, rows=False)[3:]


def quantize_rows_cols_grouped_triton(a: torch.Tensor, offs: torch.Tensor, exact_scales: bool = False):
    """Triton twin of quant_ref.quantize_rows_cols_grouped_ref: the row-scaled and the
    token-group column-scaled copies of a in the same two launches (a read twice, not four
    times). -> (q (M, C), scale (M,), descale (M,), qT (C, P), descale_T (G, C), poffs (G,));
    q, scale and descale are unwritten for rows past offs[-1].
    """
    return _cols_grouped(a, offs, exact_scales, None, rows=True)
