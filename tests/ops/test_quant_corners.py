"""Corners of the quantization definition and of the emulated backend that the other ops
tests leave open: zero-width rows, dequantize_rows' exact arithmetic, and exact_scales on
the backward paths that quantize only one gradient operand and on the x_fp8 path."""

import math

import pytest
import torch

from ep_fp8.ops import dequantize_rows, quantize_rows, scaled_grouped_mm
from ep_fp8.ops import quant_ref as R
from tests.ops._helpers import offsets, rel_err

# Both sides below use the same float8 operands, so only float32 accumulation in the
# emulated GEMM separates them (relative error ~1e-7); a float8 operand rounded on another
# grid (power-of-two instead of exact scales) differs by ~1e-2.
EXACT_TOL = 1e-5


@pytest.mark.parametrize("exact", [False, True])
def test_zero_width_rows_get_the_finite_scale_of_an_all_zero_row(exact):
    # A row with no elements has amax 0, floored to 2^-100: never a NaN scale.
    floor = 2.0**-100
    if exact:
        want = torch.tensor(448.0 / floor, dtype=torch.float64).float().item()
    else:
        want = 2.0 ** math.floor(math.log2(448.0 / floor))  # 2^108
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.zeros(5, 0, dtype=dtype)
        q, scale, descale = R.quantize_rows_ref(x, exact)
        assert q.shape == (5, 0) and q.dtype == R.FP8_DTYPE
        assert scale.tolist() == [want] * 5
        assert bool(torch.isfinite(descale).all())
        data, pub_scale = quantize_rows(x, exact)
        assert data.shape == (5, 0) and pub_scale.tolist() == [want] * 5


def test_dequantize_rows_is_data_times_the_rounded_reciprocal_exactly():
    # Exact scales are not powers of two, so data / scale and data * (1 / scale) differ in
    # the last bit for some values. The definition is the latter: descale = 1 / scale
    # rounded to float32 (what the float8 GEMM multiplies by), times data. An e4m3 value has
    # 4 significant bits and descale 24, so their float64 product is exact and rounding it
    # to float32 once gives the expected bits: tolerance 0.
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(64, 96, generator=gen) * torch.logspace(-4, 4, 64)[:, None]
    data, scale = quantize_rows(x, exact_scales=True)
    descale = (1.0 / scale.double()).float().double()
    want = (data.double() * descale[:, None]).float()
    got = dequantize_rows(data, scale, torch.float32)
    assert torch.equal(got, want)


def _q_exact(v: torch.Tensor, dim: int) -> torch.Tensor:
    """Float64 values of v quantized with exact scales per slice along dim (finite v):
    scale = 448 / max(amax, 2^-100) rounded to float32, q = e4m3(v * scale) with the product
    in float32, value = q * (1 / scale rounded to float32)."""
    v = v.float()
    amax = v.double().abs().amax(dim=dim, keepdim=True)
    scale = (448.0 / amax.clamp_min(2.0**-100)).float()
    q = (v * scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.double() * (1.0 / scale.double()).float().double()


def _case(seed):
    gen = torch.Generator().manual_seed(seed)
    sizes, tail, K, N = [5, 0, 37, 22], 7, 32, 48
    M, G = sum(sizes) + tail, len(sizes)
    x = torch.randn(M, K, generator=gen) * torch.logspace(-2, 2, K)
    w = torch.randn(G, N, K, generator=gen)  # stored (G, N, K), passed transposed
    grad_out = torch.randn(M, N, generator=gen) * torch.logspace(-2, 2, N)
    return sizes, x, w, offsets(sizes), grad_out


def _groups(sizes):
    start = 0
    for g, size in enumerate(sizes):
        yield g, slice(start, start + size)
        start += size


def test_exact_scales_reach_grad_x_when_only_x_requires_grad():
    sizes, x, w, offs, grad_out = _case(22)
    x = x.requires_grad_()
    w_t = w.transpose(1, 2)  # frozen: only grad_x is computed
    out = scaled_grouped_mm(x, w_t, offs, backend="emulated", exact_scales=True)
    (gx,) = torch.autograd.grad(out, x, grad_out)
    gq = _q_exact(grad_out, dim=1)  # per row
    w_bwd = _q_exact(w_t, dim=2)  # per (expert, k)
    ref = torch.zeros(x.shape, dtype=torch.float64)
    for g, rows in _groups(sizes):
        ref[rows] = gq[rows] @ w_bwd[g].T
    assert rel_err(gx, ref) < EXACT_TOL
    assert bool((gx[sum(sizes):] == 0).all())


@pytest.mark.parametrize("with_x_fp8", [False, True])
def test_exact_scales_reach_grad_w_when_only_w_requires_grad(with_x_fp8):
    sizes, x, w, offs, grad_out = _case(23)
    w = w.requires_grad_()
    w_t = w.transpose(1, 2)
    if with_x_fp8:
        data, scale = quantize_rows(x, exact_scales=True)
        # The op's token-group copy starts from x dequantized per row, in float32.
        x_val = data.float() * (1.0 / scale.double()).float()[:, None]
        out = scaled_grouped_mm(x, w_t, offs, backend="emulated", exact_scales=True, x_fp8=(data, scale))
    else:
        x_val = x
        out = scaled_grouped_mm(x, w_t, offs, backend="emulated", exact_scales=True)
    (gw,) = torch.autograd.grad(out, w_t, grad_out)
    ref = torch.zeros(w_t.shape, dtype=torch.float64)
    for g, rows in _groups(sizes):
        if rows.stop > rows.start:  # per (group, column) over the group's tokens
            ref[g] = _q_exact(x_val[rows], dim=0).T @ _q_exact(grad_out[rows], dim=0)
    assert rel_err(gw, ref) < EXACT_TOL
    assert bool((gw[1] == 0).all())  # the empty group
