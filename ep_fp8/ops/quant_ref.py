"""The float8 quantization definition, in plain torch.

Every backend and every Triton kernel implements exactly this arithmetic; the kernels in
`quant_kernels/` have the same signatures and are tested against these functions
bit for bit. For each scaling group (a row, a column within one expert, or a column
within one token group):

    amax    = max |v| over the group, in float32 (a NaN counts as +inf)
    scale   = 2^floor(log2(448 / max(amax, AMAX_FLOOR)))       (default)
            = 448 / max(amax, AMAX_FLOOR)                       (exact_scales=True)
    q       = float8_e4m3fn(clamp(v * scale, -448, 448))        (round to nearest even)
    descale = 1 / scale                                         (v ~= q * descale)

A group whose amax is not finite gets scale = descale = NaN, so every value quantized
with it, and every product that uses it, is NaN: an inf or NaN never turns into finite
garbage. `descale` is what the scaled GEMM multiplies its accumulator by.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Floor on amax: an all-zero group gets a large finite power-of-two scale (2^108) whose
# reciprocal is still a normal float32, so q = 0 and 0 * descale = 0.
AMAX_FLOOR = 2.0**-100
# A group of tokens occupies a multiple of this many columns in the transposed float8
# copies for the 2D x 2D weight-gradient GEMM, and at least this many, because the GEMM
# cannot take an empty group there. The GEMM needs a multiple of 16 (16 bytes of float8,
# TMA alignment); 64 lets the column kernels tile the padded copy in 64-column blocks
# that each lie in exactly one group (<= 63 zero columns per group: <1% more GEMM work
# at training sizes).
GROUP_PAD = 64


def padded_length(M: int, G: int) -> int:
    """Columns of the transposed, group-padded float8 copy of an (M, C) tensor.

    An upper bound on `padded_group_offsets(offs)[-1]` known on the host without reading
    offs: each of the G groups grows by at most GROUP_PAD, and the total is kept a
    multiple of GROUP_PAD as the GEMM requires.
    """
    return (M + GROUP_PAD - 1) // GROUP_PAD * GROUP_PAD + GROUP_PAD * G


def abs_nan_as_inf(v: torch.Tensor) -> torch.Tensor:
    """|v| with NaN mapped to +inf, so a max over it is non-finite iff the group is."""
    return torch.where(torch.isnan(v), torch.inf, v.abs())


def scales_from_amax(amax: torch.Tensor, exact_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, descale), both float32 with amax's shape; NaN where amax is not finite."""
    amax = amax.float()
    finite = torch.isfinite(amax)
    a = torch.where(finite, amax.clamp_min(AMAX_FLOOR), 1.0)
    if exact_scales:
        # Tensor / tensor: a correctly rounded division on CPU and CUDA alike
        # (python's `448 / t` would multiply by a reciprocal instead).
        scale = torch.div(torch.full_like(a, FP8_MAX), a)
        descale = torch.reciprocal(scale)
    else:
        # floor(log2(448 / a)) from the bits of a = m * 2^e, m in [1, 2): 448 = 1.75 * 2^8,
        # so 448 / a = (1.75 / m) * 2^(8 - e), and 1.75 / m >= 1 iff m <= 1.75.
        # Integer arithmetic only: no rounding can move the result across a power of two.
        bits = a.view(torch.int32)
        e = (bits >> 23) - 127
        k = 8 - e - ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
        scale = ((k + 127) << 23).view(torch.float32)
        descale = ((127 - k) << 23).view(torch.float32)
    nan = torch.full_like(a, float("nan"))
    return torch.where(finite, scale, nan), torch.where(finite, descale, nan)


def scaled_to_fp8(v_scaled: torch.Tensor) -> torch.Tensor:
    """clamp(v * scale, +-448) (already multiplied, float32) cast to float8_e4m3fn."""
    return v_scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_rows(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """data (M, C) float8_e4m3fn, scale (M,) float32 from quantize_rows -> (M, C) in dtype:
    data * descale with descale = 1 / scale, the inverse this module defines."""
    return (data.float() * torch.reciprocal(scale)[:, None]).to(dtype)


def quantize_rows_ref(a: torch.Tensor, exact_scales: bool = False):
    """Per-row quantization of a (M, C) -> (q (M, C) e4m3 contiguous, scale (M,), descale (M,))."""
    v = a.float()
    amax = abs_nan_as_inf(v).amax(dim=1) if v.shape[1] else v.new_zeros(v.shape[0])
    scale, descale = scales_from_amax(amax, exact_scales)
    return scaled_to_fp8(v * scale[:, None]).contiguous(), scale, descale


def quantize_weight_fwd_ref(w_t: torch.Tensor, exact_scales: bool = False, bwd_amax: bool = True):
    """The forward half of quantize_weight_ref: the float8 copy for x @ w_t, and (for the
    backward copy, made later by quantize_weight_bwd_ref) the per-(expert, k) amax.

    w_t (G, K, N), any strides -> (q_fwd (G, N, K) contiguous, descale_fwd (G, N),
    amax_bwd (G, K) float32 with NaN counted as +inf, or an empty tensor if not bwd_amax).
    """
    v = w_t.float()
    vabs = abs_nan_as_inf(v)
    scale, d_fwd = scales_from_amax(vabs.amax(dim=1), exact_scales)  # (G, N)
    q_fwd = scaled_to_fp8((v * scale[:, None, :]).transpose(1, 2).contiguous())
    if not bwd_amax:
        return q_fwd, d_fwd, torch.empty(0, dtype=torch.float32, device=w_t.device)
    return q_fwd, d_fwd, vabs.amax(dim=2)


def quantize_weight_bwd_ref(w_t: torch.Tensor, amax_bwd: torch.Tensor, exact_scales: bool = False):
    """The backward half of quantize_weight_ref: w_t (G, K, N) scaled per (expert, k) with
    the amax (G, K) the forward half measured -> (q_bwd (G, K, N) contiguous, descale_bwd (G, K))."""
    scale, d_bwd = scales_from_amax(amax_bwd, exact_scales)
    return scaled_to_fp8((w_t.float() * scale[:, :, None]).contiguous()), d_bwd


def quantize_weight_ref(w_t: torch.Tensor, exact_scales: bool = False):
    """Both float8 copies of an expert weight w_t (G, K, N), any strides.

    Returns (q_fwd (G, N, K), descale_fwd (G, N), q_bwd (G, K, N), descale_bwd (G, K)),
    q tensors contiguous. q_fwd is scaled per (expert, output column n) for the forward
    x @ w_t; q_bwd per (expert, input column k) for grad_x = grad_out @ w_t^T. The op
    makes them in two halves (quantize_weight_fwd_ref in forward, quantize_weight_bwd_ref
    in backward).
    """
    q_fwd, d_fwd, amax_bwd = quantize_weight_fwd_ref(w_t, exact_scales)
    return (q_fwd, d_fwd) + quantize_weight_bwd_ref(w_t, amax_bwd, exact_scales)


def group_bounds(offs: torch.Tensor, M: int):
    """(starts (G,), ends (G,)) int64 of the token groups, clamped into [0, M]."""
    ends = offs.long().clamp(0, M)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    return starts, ends


def padded_group_offsets_ref(offs: torch.Tensor, M: int) -> torch.Tensor:
    """Cumulative group ends (G,) int32 after padding every group (its ends clamped into
    [0, M], as the kernels do) to a multiple of GROUP_PAD, at least GROUP_PAD."""
    starts, ends = group_bounds(offs, M)
    sizes = (ends - starts).clamp_min(0)
    padded = ((sizes + GROUP_PAD - 1) // GROUP_PAD * GROUP_PAD).clamp_min(GROUP_PAD)
    return padded.cumsum(0).to(torch.int32)


def quantize_cols_grouped_ref(a: torch.Tensor, offs: torch.Tensor, exact_scales: bool = False,
                              row_descale: torch.Tensor | None = None):
    """Per-group column quantization of a (M, C) into a transposed, group-padded copy.

    Token group g is rows [offs[g-1], offs[g]) of a; every column of every group gets its
    own scale, computed from that group's rows only. With row_descale (M,) the values are
    a.float() * row_descale[:, None] (a float8 input dequantized per row first).

    Returns (qT (C, P) e4m3 contiguous, descale (G, C) float32, poffs (G,) int32) where
    P = padded_length(M, G) and group g occupies columns [poffs[g-1], poffs[g]) of qT: its
    rows in order, then zeros up to the padded size. Columns past poffs[-1] are zero here;
    the kernel leaves them unwritten (no GEMM reads them).
    """
    M, C = a.shape
    G = offs.shape[0]
    P = padded_length(M, G)
    v = a.float()
    if row_descale is not None:
        v = v * row_descale[:, None]
    starts, ends = group_bounds(offs, M)
    rows = torch.arange(M, device=a.device)
    # Group of each row; rows past offs[-1] get G and are left out.
    gid = torch.searchsorted(ends, rows, right=True)
    amax = torch.zeros(G + 1, C, device=a.device)
    amax.scatter_reduce_(0, gid[:, None].expand(M, C), abs_nan_as_inf(v), "amax")
    scale, descale = scales_from_amax(amax[:G], exact_scales)  # (G, C)
    # Gather: padded column p belongs to group h and holds row starts[h] + (p - pstart[h]).
    poffs = padded_group_offsets_ref(offs, M)
    pends = poffs.long()
    pstarts = torch.cat([pends.new_zeros(1), pends[:-1]])
    p = torch.arange(P, device=a.device)
    h = torch.searchsorted(pends, p, right=True).clamp_max(G - 1)
    local = p - pstarts[h]
    src = starts[h] + local
    valid = (p < pends[-1]) & (local < ends[h] - starts[h])
    v_src = v[src.clamp(0, max(M - 1, 0))] if M else v.new_zeros(P, C)
    vq = torch.where(valid[:, None], v_src * scale[h], 0.0)  # (P, C)
    return scaled_to_fp8(vq.t().contiguous()), descale, poffs


def quantize_rows_cols_grouped_ref(a: torch.Tensor, offs: torch.Tensor, exact_scales: bool = False):
    """Both float8 copies of one tensor that feeds two GEMMs (x in forward, grad_out in
    backward): quantize_rows_ref(a) + quantize_cols_grouped_ref(a, offs), as one tuple
    (q, scale, descale, qT, descale_T, poffs). The kernel reads a twice for both instead
    of four times, and leaves q, scale and descale of rows past offs[-1] unwritten.
    """
    return quantize_rows_ref(a, exact_scales) + quantize_cols_grouped_ref(a, offs, exact_scales)


def zero_rows_past_end_ref(out: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """out with out[offs[-1]:] = 0 (rows in no group), without reading offs on the host.
    A new tensor, not in place: out may be a GEMM result that selective activation
    checkpointing keeps for the recompute, and torch raises if a tensor it cached is
    mutated (the Triton twin writes in place unseen by torch, which is safe: see there)."""
    rows = torch.arange(out.shape[0], device=out.device)
    return out.masked_fill((rows >= offs[-1])[:, None], 0)
