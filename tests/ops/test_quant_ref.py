"""The quantization definition (quant_ref) against exact arithmetic, and its layouts
against row quantization (each scaling group is a row of some view of the tensor)."""

import math
from fractions import Fraction

import pytest
import torch

from ep_fp8.ops import quant_ref as R
from tests.ops._helpers import offsets, same_bits


def _floor_log2(q: Fraction) -> int:
    k = q.numerator.bit_length() - q.denominator.bit_length()
    return k - 1 if Fraction(2) ** k > q else k


def _amax_samples(gen):
    a = torch.rand(2000, generator=gen) * 10.0 ** torch.randint(-30, 30, (2000,), generator=gen)
    # Boundaries of the power-of-two rule: 448 / 2^k exactly, and just around it.
    edges = torch.tensor([448.0 * 2.0**-k for k in range(-20, 40)])
    return torch.cat([a, edges, torch.nextafter(edges, torch.zeros(1)), torch.nextafter(edges, edges * 2)]).float()


def test_pow2_scale_is_floor_log2_of_448_over_amax_exactly():
    amax = _amax_samples(torch.Generator().manual_seed(1))
    scale, descale = R.scales_from_amax(amax)
    for a, s, d in zip(amax.tolist(), scale.tolist(), descale.tolist()):
        k = _floor_log2(Fraction(448) / Fraction(max(a, R.AMAX_FLOOR)))
        assert s == 2.0**k and d == 2.0**-k, (a, s, k)


def test_exact_scale_is_correctly_rounded_448_over_amax():
    amax = _amax_samples(torch.Generator().manual_seed(2))
    scale, descale = R.scales_from_amax(amax, exact_scales=True)
    want = (448.0 / amax.clamp_min(R.AMAX_FLOOR).double()).float()  # float64 then float32: correctly rounded
    assert torch.equal(scale, want)
    assert torch.equal(descale, (1.0 / want.double()).float())


def test_rows_round_trip_within_half_an_e4m3_step():
    # Rows spanning 1e-30 .. 1e30: each row keeps ~4 significant bits of its own values.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(61, 257, generator=gen) * torch.logspace(-30, 30, 61)[:, None]
    q, scale, descale = R.quantize_rows_ref(x)
    assert q.dtype == R.FP8_DTYPE and q.shape == x.shape and q.is_contiguous()
    assert torch.equal(scale * descale, torch.ones(61))
    scaled = x.double() * scale.double()[:, None]
    # Pow2 scales put each row's amax in [224, 448]: the top binade of e4m3 is used.
    top = scaled.abs().amax(dim=1)
    assert bool(((top >= 224) & (top <= 448)).all())
    err = (q.double() - scaled).abs()
    normal = scaled.abs() >= 2.0**-6
    assert bool((err[normal] <= scaled.abs()[normal] * 2.0**-4).all())  # half of 3 mantissa bits
    assert bool((err[~normal] <= 2.0**-10).all())  # subnormal step 2^-9


def test_nonfinite_row_gets_nan_scale_and_nan_values_others_untouched():
    x = torch.ones(4, 32)
    x[1, 3], x[2, 5] = float("inf"), float("nan")
    q, scale, descale = R.quantize_rows_ref(x)
    assert scale[1].isnan() and scale[2].isnan() and descale[1].isnan() and descale[2].isnan()
    assert bool(q[1:3].float().isnan().all())
    assert bool(torch.isfinite(q[[0, 3]].float()).all()) and scale[0].item() == 256.0


def test_all_zero_row_quantizes_to_zero_with_finite_scales():
    q, scale, descale = R.quantize_rows_ref(torch.zeros(2, 16))
    assert bool((q.float() == 0).all())
    assert scale.tolist() == [2.0**108] * 2 and descale.tolist() == [2.0**-108] * 2


@pytest.mark.parametrize("exact", [False, True])
def test_weight_copies_are_row_quantization_of_the_two_views(exact):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(3, 40, 24, generator=gen) * torch.logspace(-3, 3, 24)
    w_t = w.transpose(1, 2)  # (G, K, N) = (3, 24, 40), stored (G, N, K)
    q_fwd, d_fwd, q_bwd, d_bwd = R.quantize_weight_ref(w_t, exact)
    assert q_fwd.shape == (3, 40, 24) and q_bwd.shape == (3, 24, 40)
    for g in range(3):
        q, _, d = R.quantize_rows_ref(w_t[g].t(), exact)  # per output column n
        assert same_bits(q_fwd[g], q) and torch.equal(d_fwd[g], d)
        q, _, d = R.quantize_rows_ref(w_t[g], exact)  # per input column k
        assert same_bits(q_bwd[g], q) and torch.equal(d_bwd[g], d)


def test_padded_group_offsets_round_up_to_group_pad_and_give_empty_groups_one_pad():
    pad = R.GROUP_PAD
    assert pad % 16 == 0  # the 2D x 2D float8 GEMM needs 16-byte aligned groups
    offs = offsets([0, 5, pad, pad + 1, 0, 40])
    M = pad + 46 + pad
    assert R.padded_group_offsets_ref(offs, M).tolist() == [pad, 2 * pad, 3 * pad, 5 * pad, 6 * pad, 7 * pad]
    # Ends past M (outside the contract) are clamped to M, as the Triton kernels do.
    assert R.padded_group_offsets_ref(offsets([10, 500]), 20).tolist() == [pad, 2 * pad]
    assert R.padded_length(M=2 * pad + 46, G=6) == 3 * pad + 6 * pad


@pytest.mark.parametrize("exact", [False, True])
def test_cols_grouped_is_row_quantization_of_each_group_transposed(exact):
    gen = torch.Generator().manual_seed(5)
    sizes = [0, 7, 33, 0, 16]
    M = sum(sizes) + 9  # rows past offs[-1] belong to no group
    a = torch.randn(M, 24, generator=gen)
    a[7:40] *= 1e6  # one group a million times larger than its neighbours
    row_descale = torch.rand(M, generator=gen) + 0.5
    for rd in (None, row_descale):
        qT, descale, poffs = R.quantize_cols_grouped_ref(a, offsets(sizes), exact, rd)
        P = R.padded_length(M, len(sizes))
        assert qT.shape == (24, P) and qT.is_contiguous()
        v = a if rd is None else a * rd[:, None]
        start, pstart = 0, 0
        for g, size in enumerate(sizes):
            pend = poffs[g].item()
            assert pend - pstart == max(R.GROUP_PAD, math.ceil(size / R.GROUP_PAD) * R.GROUP_PAD)
            q, _, d = R.quantize_rows_ref(v[start:start + size].t(), exact)
            if size:
                assert torch.equal(descale[g], d)
            else:  # an empty group has amax 0: the floor's scale, finite
                assert torch.equal(descale[g], R.scales_from_amax(torch.zeros(24), exact)[1])
            assert same_bits(qT[:, pstart:pstart + size], q)
            assert bool((qT[:, pstart + size:pend].float() == 0).all())
            start, pstart = start + size, pend
        assert bool((qT[:, pstart:].float() == 0).all())


def test_zero_rows_past_end_reads_offs_on_device_only():
    out = R.zero_rows_past_end_ref(torch.ones(10, 3), offsets([2, 4]))
    assert out[:6].eq(1).all() and out[6:].eq(0).all()


@pytest.mark.parametrize("exact", [False, True])
def test_dequantize_rows_inverts_quantize_rows_within_e4m3_rounding(exact):
    from ep_fp8.ops import dequantize_rows, quantize_rows

    x = torch.randn(33, 80, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 3
    data, scale = quantize_rows(x.float(), exact)
    back = dequantize_rows(data, scale, torch.float32)
    assert back.dtype == torch.float32 and back.shape == x.shape
    # Each value is data * (1 / scale): exact in float64 for power-of-two scales.
    want = data.double() * (1.0 / scale.double())[:, None]
    tol = 0 if not exact else 1e-6
    torch.testing.assert_close(back.double(), want, rtol=tol, atol=0)
    # e4m3 keeps 3 mantissa bits: relative rounding at most 2^-4 for normal values.
    assert ((back.double() - x).abs() <= x.abs() * 2**-4 + 1e-3).all()
