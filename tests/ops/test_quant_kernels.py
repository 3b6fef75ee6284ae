"""Each Triton kernel against its torch reference, bit for bit, at small shapes.

Without a GPU these run through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); on a GPU the same tests run the compiled kernels on CUDA tensors.
"""

import pytest
import torch

from ep_fp8.ops import quant_kernels as K
from ep_fp8.ops import quant_ref as R
from tests.ops._helpers import offsets, same_bits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _specials(t: torch.Tensor) -> torch.Tensor:
    """Put the awkward values in: NaN, +-inf, zeros, e4m3-subnormal and rounding-tie values."""
    t = t.clone()
    flat = t.view(-1)
    flat[:8] = torch.tensor([float("nan"), 0.0, -0.0, 2.0**-10, 3 * 2.0**-10, -1.5 * 2.0**-9, 1e-30, -7.0])
    return t


def _rows_input(gen, M, C, dtype):
    x = torch.randn(M, C, generator=gen) * torch.logspace(-12, 12, M)[:, None]
    x[0] = _specials(x[0])
    x[1, 3] = float("inf")
    x[2] = 0.0
    x[3] = x[3].clamp(-1, 1)
    x[3, 0] = 14.0  # amax = 1.75 * 2^3: the edge of the power-of-two rule (scale 2^5, not 2^4)
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("exact", [False, True])
def test_rows_kernel_matches_reference_bitwise(dtype, exact):
    x = _rows_input(torch.Generator().manual_seed(10), 24, 300, dtype)
    for a in (x, x.t().contiguous().t()):  # row-major and column-major storage
        got, want = K.quantize_rows_triton(a, exact), R.quantize_rows_ref(a, exact)
        for g, w in zip(got, want):
            assert same_bits(g, w)


def test_rows_kernel_two_pass_path_for_rows_longer_than_one_block():
    x = _rows_input(torch.Generator().manual_seed(11), 4, K.MAX_ROW_BLOCK + 77, torch.bfloat16)
    for g, w in zip(K.quantize_rows_triton(x), R.quantize_rows_ref(x)):
        assert same_bits(g, w)


def _weight_halves_match(w_t, exact=False):
    """Both halves of the weight quantization, kernel against reference, bit for bit: the
    forward copy with and without the (g, k) amax, then the backward copy from that amax."""
    got, want = K.quantize_weight_fwd_triton(w_t, exact), R.quantize_weight_fwd_ref(w_t, exact)
    for g, wnt in zip(got, want):
        assert g.shape == wnt.shape and same_bits(g, wnt)
    no_amax = K.quantize_weight_fwd_triton(w_t, exact, bwd_amax=False)
    assert no_amax[2].numel() == 0
    for g, wnt in zip(no_amax[:2], want[:2]):
        assert same_bits(g, wnt)
    for g, wnt in zip(K.quantize_weight_bwd_triton(w_t, got[2], exact), R.quantize_weight_bwd_ref(w_t, want[2], exact)):
        assert g.shape == wnt.shape and same_bits(g, wnt)


@pytest.mark.parametrize("layout", ["gkn", "gnk", "sliced"])
@pytest.mark.parametrize("exact", [False, True])
def test_weight_kernels_match_reference_bitwise(layout, exact):
    gen = torch.Generator().manual_seed(12)
    G, Kd, N = 3, 40, 72  # not multiples of the 64-wide tiles: masked edges
    w = torch.randn(G, Kd, N, generator=gen) * torch.logspace(-6, 6, N)
    w[1, 5, 7], w[2, 0, 3] = float("nan"), float("-inf")
    w[0] = w[0].clamp(-1, 1)
    w[0, 0, 0] = -1.75  # amax at the edge of the power-of-two rule, for a row and a column
    w = w.bfloat16().to(DEVICE)
    if layout == "gnk":
        w = w.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":
        w = torch.cat([w, w], dim=2)[:, :, ::2]
    _weight_halves_match(w, exact)


def test_weight_column_amax_combines_programs_along_n():
    gen = torch.Generator().manual_seed(14)
    G, Kd, N = 2, 150, 301  # 5 programs of 64 rows along n, the last one masked (rows loaded 4 at a time)
    w = (torch.randn(G, Kd, N, generator=gen) * torch.logspace(-3, 3, Kd)[:, None]).bfloat16().to(DEVICE)
    w[1, 140, 290] = 1e6  # the maxima of a row and a column in the last, masked tiles
    _weight_halves_match(w)


def test_weight_fwd_blocks_split_a_row_only_where_it_saves_lanes():
    assert K.weight_fwd_blocks(5120) == (4096, 1024) and K.weight_fwd_blocks(6144) == (4096, 2048)
    assert K.weight_fwd_blocks(7168) == (8192, 0)  # 4096 + 4096 saves nothing
    assert K.weight_fwd_blocks(1408) == (2048, 0)  # rows up to 4096: one block
    assert K.weight_fwd_blocks(K.MAX_ROW_BLOCK + 1) == (K.MAX_ROW_BLOCK, 0)
    for Kd in range(1, K.MAX_ROW_BLOCK + 1, 37):
        head, tail = K.weight_fwd_blocks(Kd)
        assert head + tail >= Kd and head & (head - 1) == 0 and tail & (tail - 1) == 0


# K = 3000: one block of 4096, one row at a time; 5000: a row as a block of 4096 and a
# tail of 1024; 7000: one block of 8192 (a tail would save nothing); K = MAX + 77: rows
# longer than one block (two passes).
@pytest.mark.parametrize("Kd", [3000, 5000, 7000, K.MAX_ROW_BLOCK + 77])
def test_weight_halves_match_reference_for_long_rows(Kd):
    gen = torch.Generator().manual_seed(15)
    G, N = 2, 20
    w = (torch.randn(G, N, Kd, generator=gen) * torch.logspace(-4, 4, N)[:, None]).bfloat16()
    w[1, 3, Kd - 1] = float("nan")  # in the last, masked block of a row: its row and its column are NaN
    _weight_halves_match(w.to(DEVICE).transpose(1, 2))


# 70 and 130 rows span several GROUP_PAD tiles of one group; C = 136 two column blocks;
# [300, 5, 200] has more tiles than one amax program takes (a group across two programs).
# Pass 1 takes tiles of 128 rows: [128, 0, 0, 256, 0, 3] has two tiles inside group 3
# (after two empty groups that end where they start), a group ending on a tile boundary
# and a last tile with rows past offs[-1]; [128, 0, 200] with no rows past offs[-1] ends
# in a partial tile that lies in one group. tail: rows of a past offs[-1].
@pytest.mark.parametrize("sizes,C,tail", [([0, 7, 70, 0, 16], 40, 5), ([33], 40, 5), ([0, 0, 0], 40, 5),
                                          ([130, 1, 64], 136, 5), ([300, 5, 200], 40, 5),
                                          ([128, 0, 0, 256, 0, 3], 40, 10), ([128, 0, 200], 40, 0)])
@pytest.mark.parametrize("exact", [False, True])
def test_cols_grouped_kernel_matches_reference_bitwise(sizes, C, tail, exact):
    gen = torch.Generator().manual_seed(13)
    M = sum(sizes) + tail
    a = torch.randn(M, C, generator=gen)
    a[: min(M, 8)] *= 1e5
    if sizes[0] > 0:
        a[: sizes[0]] = a[: sizes[0]].clamp(-1, 1)
        a[0, 1] = 1.75  # a column amax at the edge of the power-of-two rule
    if sum(sizes):
        a[0, 0] = float("nan")
    a = a.bfloat16().to(DEVICE)
    offs = offsets(sizes, DEVICE)
    a_q, _, a_descale = R.quantize_rows_ref(a)  # float8 rows, as x_fp8 brings them
    for src, rd in ((a, None), (a.t().contiguous().t(), None),
                    (a, torch.rand(M, generator=gen).to(DEVICE) + 0.5), (a_q, a_descale)):
        qT, descale, poffs = K.quantize_cols_grouped_triton(src, offs, exact, rd)
        qT_r, descale_r, poffs_r = R.quantize_cols_grouped_ref(src, offs, exact, rd)
        assert torch.equal(poffs, poffs_r)
        assert same_bits(descale, descale_r)
        end = poffs_r[-1].item()  # the kernel leaves columns past the last group unwritten
        assert qT.shape == qT_r.shape and same_bits(qT[:, :end], qT_r[:, :end])


@pytest.mark.parametrize("sizes", [[3, 0, 9], [4, 8]])
def test_zero_rows_past_end_kernel_matches_reference(sizes):
    out = torch.randn(12, 130).bfloat16().to(DEVICE)
    want = R.zero_rows_past_end_ref(out.clone(), offsets(sizes, DEVICE))
    got = K.zero_rows_past_end_triton(out, offsets(sizes, DEVICE))
    assert torch.equal(got, want)


# C = 1100: more column blocks than one pass-1 program takes; [128, 0, 0, 256, 0, 3]: see
# the test above.
@pytest.mark.parametrize("sizes,C", [([0, 7, 70, 0, 16], 40), ([130, 1, 64], 136), ([0, 0, 0], 24), ([50, 30], 1100),
                                     ([128, 0, 0, 256, 0, 3], 24)])
@pytest.mark.parametrize("exact", [False, True])
def test_rows_and_cols_in_one_kernel_pair_match_both_references(sizes, C, exact):
    gen = torch.Generator().manual_seed(16)
    M = sum(sizes) + 5  # 5 rows past offs[-1]: in no group
    a = torch.randn(M, C, generator=gen) * torch.logspace(-8, 8, M)[:, None]
    if sum(sizes):
        a[0] = _specials(a[0])
        a[min(8, sum(sizes) - 1), 2] = float("-inf")
    a = a.bfloat16().to(DEVICE)
    offs = offsets(sizes, DEVICE)
    for src in (a, a.t().contiguous().t()):
        got = K.quantize_rows_cols_grouped_triton(src, offs, exact)
        want = R.quantize_rows_cols_grouped_ref(src, offs, exact)
        end = sum(sizes)  # rows past the last group: unwritten by the kernel
        for g, wnt in zip(got[:3], want[:3]):
            assert g.shape == wnt.shape and same_bits(g[:end], wnt[:end])
        qT, descale, poffs = got[3:]
        assert torch.equal(poffs, want[5]) and same_bits(descale, want[4])
        pend = want[5][-1].item()
        assert qT.shape == want[3].shape and same_bits(qT[:, :pend], want[3][:, :pend])
