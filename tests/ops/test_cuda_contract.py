"""The cuda backend's plumbing, on CPU: torch._scaled_grouped_mm replaced by a stand-in
that enforces the contract of torch 2.11's row-wise float8 grouped GEMM (layouts, scale
shapes, alignment, non-empty 16-aligned groups in the 2D x 2D case, bf16 output, rows
past offs[-1] left unwritten) and computes it in float32; the Triton kernels run through
the interpreter. The real GEMM is exercised by test_gpu.py on an H200.
"""

import pytest
import torch

from ep_fp8.ops import backends, scaled_grouped_mm
from tests.ops._helpers import grouped_mm_f64, offsets, rel_err

FP8 = torch.float8_e4m3fn
# The Triton kernels reach CPU tensors only through the interpreter, which conftest.py turns
# on where there is no GPU; on a GPU machine test_gpu.py runs this contract for real.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU stand-in of the GEMM; on a GPU test_gpu.py covers it")


def _row_major(t):
    return t.stride(-1) == 1 and t.stride(-2) % 16 == 0 and t.stride(-2) >= t.shape[-1]


def _col_major(t):
    return t.stride(-2) == 1 and t.stride(-1) % 16 == 0 and t.stride(-1) >= t.shape[-2]


def fake_scaled_grouped_mm(mat_a, mat_b, scale_a, scale_b, offs=None, bias=None, scale_result=None,
                           out_dtype=None, use_fast_accum=False):
    assert mat_a.dtype == FP8 and mat_b.dtype == FP8 and mat_a.dim() == 2
    assert scale_a.dtype == torch.float32 and scale_b.dtype == torch.float32
    assert _row_major(mat_a), f"mat_a must be row-major, strides {mat_a.stride()}"
    assert _col_major(mat_b), f"mat_b must be column-major, strides {mat_b.stride()}"
    assert mat_a.data_ptr() % 16 == 0 and mat_b.data_ptr() % 16 == 0, "data must be 16-byte aligned"
    assert mat_a.shape[-1] % 16 == 0 and mat_b.shape[-2] % 16 == 0 and mat_b.shape[-1] % 16 == 0
    assert out_dtype == torch.bfloat16 and offs.dtype == torch.int32 and bias is None
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    a = mat_a.float()
    if mat_b.dim() == 3:  # 2D x 3D: groups of rows of a
        G, K, N = mat_b.shape
        assert scale_a.shape == (a.shape[0],) and scale_a.is_contiguous()
        assert scale_b.shape == (G, N) and scale_b.stride(-1) == 1
        out = torch.full((a.shape[0], N), float("nan"))  # rows in no group stay unwritten
        for g, (s, e) in enumerate(zip(starts, ends)):
            out[s:e] = (a[s:e] * scale_a[s:e, None]) @ (mat_b[g].float() * scale_b[g])
        return out.to(torch.bfloat16)
    # 2D x 2D: groups along the contracted dimension
    R, S, G = a.shape[0], mat_b.shape[1], len(ends)
    assert scale_a.shape == (G * R,) and scale_b.shape == (G * S,)
    for s, e in zip(starts, ends):
        assert e - s > 0 and (e - s) % 16 == 0, "each group non-empty and 16-aligned"
    b = mat_b.float()
    out = torch.empty(G, R, S)
    for g, (s, e) in enumerate(zip(starts, ends)):
        out[g] = (a[:, s:e] * scale_a[g * R:(g + 1) * R, None]) @ (b[s:e] * scale_b[g * S:(g + 1) * S])
    return out.to(torch.bfloat16)


@pytest.fixture
def cuda_path_on_cpu(monkeypatch):
    monkeypatch.setattr(backends, "_has_scaled_grouped_mm", lambda device_type, index: True)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", fake_scaled_grouped_mm)


@pytest.mark.parametrize("w_layout", ["gnk", "gkn"])
@pytest.mark.parametrize("with_x_fp8", [False, True])
def test_cuda_path_meets_the_gemm_contract_and_matches_emulated(cuda_path_on_cpu, w_layout, with_x_fp8):
    from ep_fp8.ops import quantize_rows

    gen = torch.Generator().manual_seed(0)
    sizes, tail, K, N = [13, 0, 40, 5], 6, 32, 48
    M, G = sum(sizes) + tail, len(sizes)
    offs = offsets(sizes)
    x = torch.randn(M, K, generator=gen).bfloat16()
    w = torch.randn(G, N, K, generator=gen).bfloat16() if w_layout == "gnk" else \
        torch.randn(G, K, N, generator=gen).bfloat16()
    w_t_of = (lambda w: w.transpose(1, 2)) if w_layout == "gnk" else (lambda w: w)
    grad_out = torch.randn(M, N, generator=gen).bfloat16()
    x_fp8 = quantize_rows(x) if with_x_fp8 else None
    results = {}
    for backend in ("cuda", "emulated"):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = scaled_grouped_mm(xl, w_t_of(wl), offs, backend=backend, x_fp8=x_fp8)
        out.backward(grad_out)
        results[backend] = (out, xl.grad, w_t_of(wl.grad))
    ref = grouped_mm_f64(x, w_t_of(w), offs, grad_out)
    for c, e, r in zip(results["cuda"], results["emulated"], ref):
        assert c.dtype == torch.bfloat16 and c.shape == e.shape
        assert rel_err(c, e) < 5e-3  # same float8 operands; bf16 output rounding differs
        assert rel_err(c, r) < 0.06
    end = sum(sizes)
    assert bool((results["cuda"][0][end:] == 0).all()) and bool((results["cuda"][1][end:] == 0).all())
    assert bool((results["cuda"][2][1] == 0).all())  # the empty group's gradient


def test_x_fp8_data_that_starts_off_16_bytes_is_copied_before_the_gemm(cuda_path_on_cpu):
    from ep_fp8.ops import quantize_rows

    gen = torch.Generator().manual_seed(2)
    M, K, N, offs = 32, 32, 48, offsets([12, 20])
    x, w_t = torch.randn(M, K, generator=gen).bfloat16(), torch.randn(2, K, N, generator=gen).bfloat16()
    data, scale = quantize_rows(x)
    buf = torch.zeros(M, 48, dtype=torch.uint8)
    buf[:, 4:4 + K] = data.view(torch.uint8)
    shifted = buf[:, 4:4 + K].view(FP8)  # row stride 48 bytes (fine), start 4 bytes off
    assert shifted.data_ptr() % 16 == 4
    handle = torch.zeros((), dtype=torch.bfloat16).expand(M, K)
    out = scaled_grouped_mm(handle, w_t, offs, backend="cuda", x_fp8=(shifted, scale))
    assert torch.equal(out, scaled_grouped_mm(handle, w_t, offs, backend="cuda", x_fp8=(data, scale)))


def test_auto_with_k_not_multiple_of_16_runs_bf16_and_warns_once(cuda_path_on_cpu, monkeypatch):
    import warnings

    monkeypatch.setattr(backends, "_warned", set())
    gen = torch.Generator().manual_seed(1)
    x, w_t, offs = torch.randn(20, 24, generator=gen), torch.randn(2, 24, 32, generator=gen), offsets([8, 12])
    with pytest.warns(UserWarning, match="K=24, N=32 are not both multiples of 16"):
        out = scaled_grouped_mm(x, w_t, offs)
    assert torch.equal(out, scaled_grouped_mm(x, w_t, offs, backend="bf16"))  # unquantized
    assert not torch.equal(out, scaled_grouped_mm(x, w_t, offs, backend="emulated"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled_grouped_mm(x, w_t, offs)  # said once is enough


def test_auto_falling_back_to_bf16_compiles_fullgraph_and_still_warns(cuda_path_on_cpu, monkeypatch):
    import warnings

    monkeypatch.setattr(backends, "_warned", set())
    gen = torch.Generator().manual_seed(4)
    x, w_t, offs = torch.randn(20, 24, generator=gen), torch.randn(2, 24, 32, generator=gen), offsets([8, 12])
    compiled = torch.compile(lambda a, b: scaled_grouped_mm(a, b, offs), fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x, w_t)
    assert any("K=24, N=32 are not both multiples of 16" in str(w.message) for w in caught)
    assert torch.equal(out, scaled_grouped_mm(x, w_t, offs, backend="bf16"))
