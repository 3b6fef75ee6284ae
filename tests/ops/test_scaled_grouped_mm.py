"""scaled_grouped_mm on CPU: the emulated and bf16 backends against float64 references.

Tolerances: e4m3 keeps 3 mantissa bits, so each quantized operand carries a relative
rounding error of at most 2^-4 (RMS about 0.02); a product of two such operands summed
over K lands at about 0.035-0.04 relative Frobenius error on random data. We allow
E4M3_TOL = 0.06. Where both sides use the same float8 operands the only difference left
is float32 accumulation: EXACT_TOL = 1e-5.
"""

import pytest
import torch

from ep_fp8.ops import quant_ref as R
from ep_fp8.ops import quantize_rows, resolve_backend, scaled_grouped_mm
from tests.ops._helpers import grouped_mm_f64, offsets, rel_err, saved_by

E4M3_TOL = 0.06
EXACT_TOL = 1e-5
BF16_TOL = 0.01  # bf16 inputs and outputs: 8 bits of mantissa

SHAPES = {  # name: (group sizes, rows past offs[-1], K, N)
    "uneven_with_empty": ([5, 0, 37, 22], 0, 32, 48),
    "one_group": ([48], 0, 16, 32),
    "rows_past_end": ([10, 20], 15, 48, 16),
    "empty_first_and_last": ([0, 30, 0], 3, 16, 16),
    "odd_sizes": ([9, 0, 14], 2, 18, 10),  # K, N not multiples of 16 bytes
}


def _inputs(sizes, tail, K, N, dtype, w_layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    M, G = sum(sizes) + tail, len(sizes)
    x = torch.randn(M, K, generator=gen).to(dtype)
    if w_layout == "gnk":  # expert weights stored (G, N, K), passed transposed
        w = torch.randn(G, N, K, generator=gen).to(dtype)
        w_t = w.transpose(1, 2)
    elif w_layout == "strided":  # neither row- nor column-major
        w = torch.randn(G, K, 2 * N, generator=gen).to(dtype)[:, :, ::2]
        w_t = w
    else:
        w = torch.randn(G, K, N, generator=gen).to(dtype)
        w_t = w
    grad_out = torch.randn(M, N, generator=gen).to(dtype)
    return x, w, w_t, offsets(sizes), grad_out


def _run(x, w, w_t_of, offs, grad_out, **kw):
    """Forward and backward; returns (out, grad_x, grad_w_t) with the leaves' grads."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = scaled_grouped_mm(x, w_t_of(w), offs, **kw)
    out.backward(grad_out)
    return out, x.grad, w_t_of(w.grad)


def _w_t_of(w_layout):
    return (lambda w: w.transpose(1, 2)) if w_layout == "gnk" else (lambda w: w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("w_layout", ["gnk", "gkn", "strided"])
@pytest.mark.parametrize("backend", ["emulated", "bf16"])
def test_forward_and_both_grads_match_float64(shape, dtype, w_layout, backend):
    sizes, tail, K, N = SHAPES[shape]
    x, w, w_t, offs, grad_out = _inputs(sizes, tail, K, N, dtype, w_layout)
    out, gx, gw = _run(x, w, _w_t_of(w_layout), offs, grad_out, backend=backend)
    ref_out, ref_gx, ref_gw = grouped_mm_f64(x, w_t, offs, grad_out)
    assert out.dtype == dtype and gx.dtype == dtype and gw.dtype == dtype
    # The bf16 backend is torch._grouped_mm: only the input dtype's rounding remains.
    tol = E4M3_TOL if backend == "emulated" else (BF16_TOL if dtype == torch.bfloat16 else EXACT_TOL)
    assert rel_err(out, ref_out) < tol
    assert rel_err(gx, ref_gx) < tol
    assert rel_err(gw, ref_gw) < tol
    end = sum(sizes)
    assert bool((out[end:] == 0).all()) and bool((gx[end:] == 0).all())  # rows in no group
    for g, size in enumerate(sizes):
        if size == 0:
            assert bool((gw[g] == 0).all())  # an empty group has no gradient


@pytest.mark.parametrize("exact", [False, True])
def test_emulated_is_float64_math_on_its_own_float8_operands(exact):
    # Pins down which scales meet which operand: any mix-up shows as a ~4% difference.
    sizes, tail, K, N = SHAPES["uneven_with_empty"]
    x, w, w_t, offs, grad_out = _inputs(sizes, 7, K, N, torch.float32, "gnk", seed=1)
    out, gx, gw = _run(x, w, _w_t_of("gnk"), offs, grad_out, backend="emulated", exact_scales=exact)

    def deq_rows(a):
        q, _, d = R.quantize_rows_ref(a, exact)
        return q.double() * d.double()[:, None]

    q_fwd, d_fwd, q_bwd, d_bwd = R.quantize_weight_ref(w_t, exact)
    w_fwd = (q_fwd.double() * d_fwd.double()[:, :, None]).transpose(1, 2)  # (G, K, N)
    w_bwd = q_bwd.double() * d_bwd.double()[:, :, None]  # (G, K, N)
    assert rel_err(out, grouped_mm_f64(deq_rows(x), w_fwd, offs)) < EXACT_TOL
    ref_gx = torch.zeros_like(gx, dtype=torch.float64)
    ref_gw = torch.zeros_like(gw, dtype=torch.float64)
    gq = deq_rows(grad_out)
    start = 0
    for g, end in enumerate(offs.tolist()):
        ref_gx[start:end] = gq[start:end] @ w_bwd[g].T
        rows = slice(start, end)
        xq, _, xd = R.quantize_rows_ref(x[rows].t(), exact)  # per (group, k) over the group's tokens
        oq, _, od = R.quantize_rows_ref(grad_out[rows].t(), exact)
        ref_gw[g] = (xq.double() * xd.double()[:, None]) @ (oq.double() * od.double()[:, None]).T
        start = end
    assert rel_err(gx, ref_gx) < EXACT_TOL
    assert rel_err(gw, ref_gw) < EXACT_TOL


@pytest.mark.parametrize("shape", ["uneven_with_empty", "rows_past_end"])
def test_emulated_agrees_with_bf16_backend(shape):
    sizes, tail, K, N = SHAPES[shape]
    x, w, w_t, offs, grad_out = _inputs(sizes, tail, K, N, torch.bfloat16, "gnk", seed=2)
    fp8 = _run(x, w, _w_t_of("gnk"), offs, grad_out, backend="emulated")
    bf16 = _run(x, w, _w_t_of("gnk"), offs, grad_out, backend="bf16")
    ref = grouped_mm_f64(x, w_t, offs, grad_out)
    for a, b, r in zip(fp8, bf16, ref):
        assert rel_err(b, r) < BF16_TOL  # the bf16 backend is plain torch._grouped_mm
        assert rel_err(a, b) < E4M3_TOL
    end = sum(sizes)
    assert bool((bf16[0][end:] == 0).all()) and bool((bf16[1][end:] == 0).all())


@pytest.mark.parametrize("backend", ["emulated", "bf16"])
def test_groups_a_million_apart_keep_their_own_precision(backend):
    # Token group 0 holds values ~1e-3, group 1 ~1e+3: a ratio of 1e6 is beyond e4m3's
    # range (448 / 2^-9 ~ 2e5), so any scale shared across groups would zero group 0.
    sizes, K, N = [40, 24], 32, 16
    x, w, w_t, offs, grad_out = _inputs(sizes, 0, K, N, torch.float32, "gnk", seed=3)
    mag = torch.cat([torch.full((40, 1), 1e-3), torch.full((24, 1), 1e3)])
    x, grad_out = x * mag, grad_out * mag
    out, gx, gw = _run(x, w, _w_t_of("gnk"), offs, grad_out, backend=backend)
    ref_out, ref_gx, ref_gw = grouped_mm_f64(x, w_t, offs, grad_out)
    for rows in (slice(0, 40), slice(40, 64)):
        assert rel_err(out[rows], ref_out[rows]) < E4M3_TOL
        assert rel_err(gx[rows], ref_gx[rows]) < E4M3_TOL
    for g in range(2):
        assert rel_err(gw[g], ref_gw[g]) < E4M3_TOL


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("backend", ["emulated", "bf16"])
def test_x_fp8_gives_the_plain_output_and_grad_x_reaches_the_handle(exact, backend):
    sizes, tail, K, N = SHAPES["rows_past_end"]
    x, w, w_t, offs, grad_out = _inputs(sizes, tail, K, N, torch.bfloat16, "gnk", seed=4)
    M = x.shape[0]
    data, scale = quantize_rows(x, exact_scales=exact)
    assert data.dtype == torch.float8_e4m3fn and scale.shape == (M,)
    plain = _run(x, w, _w_t_of("gnk"), offs, grad_out, backend=backend, exact_scales=exact)
    handle = torch.zeros((), dtype=torch.bfloat16, requires_grad=True)
    w_leaf = w.detach().requires_grad_()
    out = scaled_grouped_mm(handle.expand(M, K), w_leaf.transpose(1, 2), offs, backend=backend,
                            exact_scales=exact, x_fp8=(data, scale))
    out.backward(grad_out)
    if backend == "emulated":
        assert torch.equal(out, plain[0])  # the same float8 x, so the same bits
    else:  # bf16 runs on x dequantized from float8
        assert rel_err(out, plain[0]) < E4M3_TOL
    # grad_x does not depend on x: the handle receives the plain grad_x summed by expand's
    # backward, in float32 and rounded once to bfloat16. Its error: one bf16 rounding
    # (2^-9 relative) plus float32 summation, both within 2^-8 of the sum of magnitudes.
    grad_x = plain[1].double()
    tol = 2**-8 * grad_x.abs().sum()
    assert abs(grad_x.sum()) > 4 * tol   # these inputs' sum is far from 0: a lost gradient fails
    assert abs(handle.grad.double() - grad_x.sum()) <= tol
    # grad_w from float8 x (quantized per row, then per token group) is still close.
    assert rel_err(w_leaf.grad.transpose(1, 2), grouped_mm_f64(x, w_t, offs, grad_out)[2]) < E4M3_TOL


def test_quantize_rows_matches_the_reference():
    x = torch.randn(9, 48, dtype=torch.bfloat16)
    data, scale = quantize_rows(x)
    q, s, _ = R.quantize_rows_ref(x)
    assert torch.equal(data.view(torch.uint8), q.view(torch.uint8)) and torch.equal(scale, s)


def test_nonfinite_input_makes_its_own_group_nonfinite_and_leaves_others_finite():
    sizes, K, N = [12, 20], 16, 32
    x, w, w_t, offs, grad_out = _inputs(sizes, 4, K, N, torch.float32, "gnk", seed=5)
    x[3, 5] = float("nan")  # row 3 of group 0
    w[1, 7, 2] = float("inf")  # expert 1, output column 7
    grad_out[15, 0] = float("inf")  # row 15 of group 1
    out, gx, gw = _run(x, w, _w_t_of("gnk"), offs, grad_out, backend="emulated")
    assert bool(out[3].isnan().all())
    assert bool(out[12:32, 7].isnan().all())  # group 1 meets expert 1's bad column
    finite_out = torch.ones_like(out, dtype=torch.bool)
    finite_out[3], finite_out[12:32, 7] = False, False
    assert bool(out[finite_out].isfinite().all())
    assert bool(gx[15].isnan().all())  # grad_out's bad row
    # grad_x uses w scaled per input column k: expert 1's inf poisons its column k=2.
    assert bool(gx[12:32, 2].isnan().all())
    finite_gx = torch.ones_like(gx, dtype=torch.bool)
    finite_gx[15], finite_gx[12:32, 2] = False, False
    assert bool(gx[finite_gx].isfinite().all()) and bool(gx[32:].eq(0).all())
    # grad_w (G, K, N): expert 0 sees x's NaN (group 0, k=5), expert 1 grad_out's inf
    # (group 1, n=0); each stays in its own expert and its own row or column.
    assert bool(gw[0][5].isnan().all()) and bool(gw[1][:, 0].isnan().all())
    finite_gw = torch.ones_like(gw, dtype=torch.bool)
    finite_gw[0, 5], finite_gw[1, :, 0] = False, False
    assert bool(gw[finite_gw].isfinite().all())

def test_saved_for_backward_is_the_weight_itself_float8_copies_and_scales():
    sizes, tail, K, N = SHAPES["uneven_with_empty"]
    x, w, w_t, offs, grad_out = _inputs(sizes, tail, K, N, torch.bfloat16, "gnk", seed=6)
    x.requires_grad_()
    w.requires_grad_()
    out, saved = saved_by(scaled_grouped_mm, x, w.transpose(1, 2), offs, backend="emulated")
    G = len(sizes)
    high = [t for t in saved if t.dtype == torch.bfloat16]
    # The weight, not a copy (under FSDP2 its storage is re-gathered for backward anyway);
    # no high-precision activation: x is kept only as its float8 token-group copy.
    assert len(high) == 1 and high[0].untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    rest = [t for t in saved if t.dtype != torch.bfloat16]
    assert {t.dtype for t in rest} <= {torch.float8_e4m3fn, torch.float32, torch.int32}
    assert all(t.numel() <= G * max(K, N) for t in rest if t.dtype == torch.float32)  # scales and amaxes only
    assert any(t.dtype == torch.float8_e4m3fn and t.shape[0] == K for t in rest)  # x per token group, for grad_w
    out.backward(grad_out)
    assert x.grad is not None and w.grad is not None


def test_grads_only_for_what_requires_grad_and_no_grad_forward_matches():
    sizes, tail, K, N = SHAPES["uneven_with_empty"]
    x, w, w_t, offs, grad_out = _inputs(sizes, tail, K, N, torch.float32, "gkn", seed=7)
    full = _run(x, w, _w_t_of("gkn"), offs, grad_out, backend="emulated")
    with torch.no_grad():
        assert torch.equal(scaled_grouped_mm(x, w, offs, backend="emulated"), full[0])
    x_leaf = x.clone().requires_grad_()
    scaled_grouped_mm(x_leaf, w, offs, backend="emulated").backward(grad_out)  # w frozen
    assert torch.equal(x_leaf.grad, full[1])
    w_leaf = w.clone().requires_grad_()
    scaled_grouped_mm(x, w_leaf, offs, backend="emulated").backward(grad_out)  # x frozen
    assert torch.equal(w_leaf.grad, full[2])


def test_out_dtype_float32_from_bf16_inputs_keeps_grads_in_input_dtype():
    sizes, tail, K, N = SHAPES["one_group"]
    x, w, w_t, offs, grad_out = _inputs(sizes, tail, K, N, torch.bfloat16, "gnk", seed=8)
    for backend in ("emulated", "bf16"):
        out, gx, gw = _run(x, w, _w_t_of("gnk"), offs, grad_out.float(), backend=backend, out_dtype=torch.float32)
        assert out.dtype == torch.float32 and gx.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
        assert rel_err(out, grouped_mm_f64(x, w_t, offs)) < E4M3_TOL


def test_auto_resolves_to_emulated_without_cuda():
    assert resolve_backend("auto", torch.device("cpu"), 64, 64) == "emulated"
    assert resolve_backend("bf16", torch.device("cpu"), 64, 64) == "bf16"
    x, w, w_t, offs, _ = _inputs([8, 8], 0, 16, 16, torch.float32, "gkn", seed=9)
    assert torch.equal(scaled_grouped_mm(x, w, offs), scaled_grouped_mm(x, w, offs, backend="emulated"))



@pytest.mark.parametrize("backend", ["emulated", "bf16"])
def test_no_tokens_at_all_gives_empty_output_and_zero_weight_grad(backend):
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(2, 16, 32, requires_grad=True)
    out = scaled_grouped_mm(x, w, offsets([0, 0]), backend=backend)
    out.sum().backward()
    assert out.shape == (0, 32) and x.grad.shape == (0, 16)
    assert bool((w.grad == 0).all())


def test_backward_order_is_chosen_by_size_and_does_not_change_the_result(monkeypatch):
    from ep_fp8.ops import fp8_ops

    bf16 = torch.bfloat16
    # grad_x first where the weight dominates, grad_w first where grad_out's copies do.
    assert not fp8_ops.grad_w_first(16384, 8, 5120, 16384, bf16, bf16)
    assert fp8_ops.grad_w_first(65536, 4, 4096, 14336, bf16, bf16)
    sizes, tail, K, N = SHAPES["rows_past_end"]
    x, w, w_t, offs, grad_out = _inputs(sizes, tail, K, N, bf16, "gnk", seed=8)
    results = []
    for first in (False, True):
        monkeypatch.setattr(fp8_ops, "grad_w_first", lambda *args, first=first: first)
        results.append(_run(x, w, _w_t_of("gnk"), offs, grad_out, backend="emulated"))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", ["uneven_with_empty", "odd_sizes"])
@pytest.mark.parametrize("backend", ["emulated", "bf16"])
def test_grad_of_a_gnk_weight_comes_back_in_the_weights_own_layout(shape, backend):
    # A weight stored (G, N, K) and passed as w.transpose(1, 2): the gradient the op itself
    # returns for w_t must be the transpose of a contiguous (G, N, K) buffer, so autograd
    # has nothing to copy into the parameter's strides. (w.grad keeps the parameter's
    # strides either way, so the layout is read from the gradient w.r.t. w_t itself.)
    # Values as in test_forward_and_both_grads_match_float64: E4M3_TOL for emulated,
    # BF16_TOL for bf16 in bfloat16.
    sizes, tail, K, N = SHAPES[shape]
    x, w, _, offs, grad_out = _inputs(sizes, tail, K, N, torch.bfloat16, "gnk", seed=10)
    w = w.requires_grad_()
    w_t = w.transpose(1, 2)
    out = scaled_grouped_mm(x, w_t, offs, backend=backend)
    (gw_t,) = torch.autograd.grad(out, w_t, grad_out)
    assert gw_t.shape == (len(sizes), K, N) and gw_t.dtype == torch.bfloat16
    assert gw_t.transpose(1, 2).is_contiguous()
    tol = E4M3_TOL if backend == "emulated" else BF16_TOL
    assert rel_err(gw_t, grouped_mm_f64(x, w_t.detach(), offs, grad_out)[2]) < tol
    # A (G, K, N) weight passed as it is gets its gradient in (G, K, N) row-major.
    w_kn = w.detach().transpose(1, 2).contiguous().requires_grad_()
    (gw_kn,) = torch.autograd.grad(scaled_grouped_mm(x, w_kn, offs, backend=backend), w_kn, grad_out)
    assert gw_kn.is_contiguous()


@pytest.mark.parametrize("backend", ["emulated", "bf16"])
def test_grad_of_a_gnk_weight_keeps_its_layout_with_no_tokens(backend):
    # No token rows (a rank that received none): the zero gradient still comes back as the
    # transpose of a contiguous (G, N, K) buffer.
    w = torch.randn(2, 32, 16, requires_grad=True)  # (G, N, K)
    w_t = w.transpose(1, 2)
    out = scaled_grouped_mm(torch.randn(0, 16), w_t, offsets([0, 0]), backend=backend)
    (gw_t,) = torch.autograd.grad(out, w_t, torch.zeros(0, 32))
    assert gw_t.shape == (2, 16, 32) and bool((gw_t == 0).all())
    assert gw_t.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("backend", ["emulated", "bf16"])
def test_a_float32_master_weight_with_bf16_x_matches_float64_with_a_float32_gradient(backend):
    """w_t float32 with x bfloat16 (experts whose weights FSDP2 does not cast): the float8
    backend quantizes the float32 weight as it is, the bf16 backend casts it; the weight's
    gradient comes back float32, x's and the output bf16."""
    sizes, tail, K, N = SHAPES["uneven_with_empty"]
    x, _, _, offs, grad_out = _inputs(sizes, tail, K, N, torch.bfloat16, "gnk", seed=9)
    w = torch.randn(len(sizes), N, K, generator=torch.Generator().manual_seed(10))   # float32
    out, gx, gw = _run(x, w, _w_t_of("gnk"), offs, grad_out, backend=backend)
    assert (out.dtype, gx.dtype, gw.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    ref_out, ref_gx, ref_gw = grouped_mm_f64(x, w.transpose(1, 2), offs, grad_out)
    tol = E4M3_TOL if backend == "emulated" else BF16_TOL
    assert rel_err(out, ref_out) < tol and rel_err(gx, ref_gx) < tol and rel_err(gw, ref_gw) < tol
    if backend == "bf16":   # the cast, then torch._grouped_mm: bit for bit the bf16 weight's
        bf = _run(x, w.bfloat16(), _w_t_of("gnk"), offs, grad_out, backend="bf16")
        assert torch.equal(out, bf[0]) and torch.equal(gx, bf[1])
        assert torch.equal(gw, bf[2].float())


def test_a_float32_master_weight_is_quantized_as_it_is_and_saved_without_a_copy():
    """The float8 path's forward is float64 math on the quantization of the float32 weight
    itself (not of a bf16 rounding of it), and it keeps that weight, not a bf16 copy, for
    backward: no high-precision tensor but the weight is saved."""
    sizes, tail, K, N = SHAPES["uneven_with_empty"]
    x, _, _, offs, grad_out = _inputs(sizes, tail, K, N, torch.bfloat16, "gnk", seed=11)
    w = torch.randn(len(sizes), N, K, generator=torch.Generator().manual_seed(12)).requires_grad_()
    out, saved = saved_by(scaled_grouped_mm, x.requires_grad_(), w.transpose(1, 2), offs,
                          backend="emulated")
    high = [t for t in saved if t.dtype in (torch.bfloat16, torch.float32) and t.numel() == w.numel()]
    assert len(high) == 1 and high[0].untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    q_fwd, d_fwd, _, _ = R.quantize_weight_ref(w.detach().transpose(1, 2), False)
    w_fwd = (q_fwd.double() * d_fwd.double()[:, :, None]).transpose(1, 2)
    q, _, d = R.quantize_rows_ref(x.detach(), False)
    want = grouped_mm_f64((q.double() * d.double()[:, None]), w_fwd, offs)
    assert rel_err(out, want) < BF16_TOL   # only the output's bf16 rounding
    # Not vacuous: quantizing the bf16 rounding instead differs somewhere.
    q_bf, _, _, _ = R.quantize_weight_ref(w.detach().bfloat16().transpose(1, 2), False)
    assert not torch.equal(q_bf.view(torch.uint8), q_fwd.view(torch.uint8))
