"""ep_fp8.ops.swiglu and swiglu_packed: silu(a) * b and both gradients against float64,
what they keep for backward, and their errors. Without a GPU the Triton kernels run through the interpreter
(TRITON_INTERPRET=1); on a GPU the same tests run them compiled."""

import pytest
import torch
import torch.nn.functional as F

from ep_fp8.ops import swiglu, swiglu_packed
from tests.ops._helpers import saved_by

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32: float32 arithmetic. bfloat16: one rounding of each output to bf16; the CPU
# interpreter truncates float32 -> bf16 (up to one ulp, 2^-7 relative), a GPU rounds to
# nearest (half an ulp).
TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def _reference(a, b, g):
    a64, b64 = (t.detach().cpu().double().requires_grad_() for t in (a, b))
    h = F.silu(a64) * b64
    h.backward(g.cpu().double())
    return h.detach(), a64.grad, b64.grad


def _rel(got, want):
    return ((got.cpu().double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _check(a, b, g, backend, tol, packed=False):
    """swiglu(a, b), or swiglu_packed of a and b side by side in one tensor, against float64."""
    if packed:
        ab = torch.cat([a, b], dim=-1).requires_grad_()
        h = swiglu_packed(ab, backend=backend)
        h.backward(g)
        assert ab.grad.shape == ab.shape
        grad_a, grad_b = ab.grad.chunk(2, dim=-1)
    else:
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        h = swiglu(a, b, backend=backend)
        h.backward(g)
        grad_a, grad_b = a.grad, b.grad
    assert h.dtype == a.dtype and h.shape == a.shape
    want = _reference(a, b, g)
    for name, got, ref in (("h", h, want[0]), ("grad_a", grad_a, want[1]), ("grad_b", grad_b, want[2])):
        if ref.numel():
            assert _rel(got, ref) < tol, (name, _rel(got, ref))
        else:
            assert got.shape == ref.shape


@pytest.mark.parametrize("packed", [False, True], ids=["two_tensors", "packed"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 100), (3, 2048 + 5), (0, 16), (4, 0), (0,), (2, 5, 7)])
def test_swiglu_and_its_gradients_match_float64(backend, dtype, shape, packed):
    # (3, 2053): rows wider than one tile (1024 columns); (4, 0) and (0,): rows of no
    # columns; (2, 5, 7): more than two dims, rows narrower than a tile (several rows per tile).
    gen = torch.Generator().manual_seed(sum(shape))
    # a spans silu's whole curve: its minimum near -1.28, the saturated tails
    a, b, g = (4 * torch.randn(shape, generator=gen) for _ in range(3))
    _check(*(t.to(DEVICE, dtype) for t in (a, b, g)), backend, TOL[dtype], packed)


def test_non_contiguous_inputs_are_taken():
    gen = torch.Generator().manual_seed(3)
    a, b, g = (torch.randn(64, 24, generator=gen).to(DEVICE) for _ in range(3))
    _check(a.t(), b.t(), g.t(), "triton", TOL[torch.float32])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_only_a_and_b_are_kept_for_backward(backend):
    # Autograd on F.silu(a) * b keeps silu(a) too: one (rows, hidden) tensor more per layer.
    a, b = (torch.randn(8, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    _, saved = saved_by(swiglu, a, b, backend=backend)
    assert sorted(t.data_ptr() for t in saved) == sorted((a.data_ptr(), b.data_ptr()))
    _, saved = saved_by(lambda: F.silu(a) * b)
    assert len(saved) == 3  # what the fused op saves over


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_keeps_only_its_input_and_gives_one_gradient_tensor(backend):
    ab = torch.randn(8, 32, device=DEVICE, requires_grad=True)
    h, saved = saved_by(swiglu_packed, ab, backend=backend)
    assert [t.data_ptr() for t in saved] == [ab.data_ptr()] and h.shape == (8, 16)
    h.sum().backward()
    assert ab.grad.is_contiguous() and ab.grad.shape == ab.shape


def test_bad_input_raises_clear_errors():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        swiglu(a, torch.randn(4, 9))
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        swiglu(a, a.double())
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        swiglu(a.long(), a.long())
    with pytest.raises(ValueError, match="backend must be one of"):
        swiglu(a, a, backend="cuda")


def test_packed_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="even size"):
        swiglu_packed(torch.randn(4, 7))
    with pytest.raises(ValueError, match="even size"):
        swiglu_packed(torch.tensor(1.0))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        swiglu_packed(torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="backend must be one of"):
        swiglu_packed(torch.randn(4, 8), backend="cuda")


def test_triton_backend_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        swiglu(torch.randn(4, 8), torch.randn(4, 8), backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        swiglu_packed(torch.randn(4, 8), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("packed", [False, True], ids=["two_tensors", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_float64(dtype, packed):
    gen = torch.Generator().manual_seed(5)
    a, b, g = (4 * torch.randn(4096, 2816, generator=gen) for _ in range(3))
    tol = 1e-6 if dtype == torch.float32 else 2**-8  # round to nearest on the GPU
    _check(*(t.to(dtype).cuda() for t in (a, b, g)), "auto", tol, packed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("packed", [False, True], ids=["two_tensors", "packed"])
def test_cuda_kernels_take_rows_of_more_than_65535_tiles(packed):
    # 2^16 tiles of 1024 columns in one row: more than CUDA's 65,535 on a grid's y axis.
    cols = 2**26 + 3
    a, b, g = (4 * torch.randn(1, cols, device="cuda", generator=torch.Generator("cuda").manual_seed(i))
               for i in range(3))
    _check(a, b, g, "triton", 1e-6, packed)
