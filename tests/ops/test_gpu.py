"""CUDA-only checks of the cuda backend (skipped without a GPU of compute capability 9.0/10.0):
float8 operands identical to the emulated oracle, outputs close to it, no host-device
synchronisation in forward + backward, and torch.compile(fullgraph=True) with inductor.

The Triton kernels' bit-exactness on the GPU is tested by test_quant_kernels.py, which
runs on CUDA tensors when a GPU is present.
"""

import pytest
import torch

from ep_fp8.ops import backends, quantize_rows, resolve_backend, scaled_grouped_mm
from tests.ops._helpers import grouped_mm_f64, offsets, rel_err

HAS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() in ((9, 0), (10, 0))
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_SM90, reason="needs a CUDA GPU of compute capability 9.0 or 10.0")]

# Same float8 operands on both sides; what differs is the GEMM's accumulation order and
# the cuda backend's bfloat16 output rounding (2^-9 relative).
CUDA_VS_EMULATED_TOL = 5e-3
E4M3_TOL = 0.06

SIZES = {  # uneven, empty groups, rows past offs[-1]; sizes not multiples of 16
    "uneven": ([13, 0, 200, 77, 0, 300, 5, 163], 40),
    "one_group": ([512], 0),
}


def _inputs(sizes, tail, K=256, N=384, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    M, G = sum(sizes) + tail, len(sizes)
    x = torch.randn(M, K, generator=gen, device="cuda").to(dtype)
    w = torch.randn(G, N, K, generator=gen, device="cuda").to(dtype)  # stored (G, N, K)
    grad_out = torch.randn(M, N, generator=gen, device="cuda").to(dtype)
    return x, w, offsets(sizes, "cuda"), grad_out


def _fwd_bwd(x, w, offs, grad_out, **kw):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = scaled_grouped_mm(x, w.transpose(1, 2), offs, **kw)
    out.backward(grad_out)
    return out, x.grad, w.grad


def test_auto_picks_cuda_here():
    assert resolve_backend("auto", torch.device("cuda"), 256, 384) == "cuda"


@pytest.mark.parametrize("case", SIZES)
@pytest.mark.parametrize("exact", [False, True])
def test_cuda_backend_matches_emulated_forward_and_grads(case, exact):
    sizes, tail = SIZES[case]
    x, w, offs, grad_out = _inputs(sizes, tail)
    cuda = _fwd_bwd(x, w, offs, grad_out, backend="cuda", exact_scales=exact)
    emulated = _fwd_bwd(x, w, offs, grad_out, backend="emulated", exact_scales=exact)
    ref = grouped_mm_f64(x.cpu(), w.transpose(1, 2).cpu(), offs.cpu(), grad_out.cpu())
    for name, c, e, r in zip(("out", "grad_x", "grad_w"), cuda, emulated, ref):
        assert c.dtype == e.dtype and c.shape == e.shape and c.stride() == e.stride(), name
        assert rel_err(c.cpu(), e.cpu()) < CUDA_VS_EMULATED_TOL, name
        if name == "grad_w":
            r = r.transpose(1, 2)
        assert rel_err(c.cpu(), r) < E4M3_TOL, name
    end = sum(sizes)
    assert bool((cuda[0][end:] == 0).all()) and bool((cuda[1][end:] == 0).all())


def test_cuda_backend_float32_weight_with_bf16_x_matches_emulated_and_keeps_no_copy():
    """A float32 master weight with bf16 rows (experts outside FSDP2): the cuda backend's
    float8 operands are the emulated backend's (so its results match), the weight's
    gradient is float32, and backward keeps the weight itself, no bf16 copy of it."""
    from ep_fp8.ops import quant_ref as R
    from ep_fp8.ops.quant_kernels import quantize_weight_fwd_triton
    from tests.ops._helpers import saved_by

    x, _, offs, grad_out = _inputs(*SIZES["uneven"])
    w = _inputs(*SIZES["uneven"], seed=1, dtype=torch.float32)[1]
    cuda = _fwd_bwd(x, w, offs, grad_out, backend="cuda")
    emulated = _fwd_bwd(x, w, offs, grad_out, backend="emulated")
    assert [t.dtype for t in cuda] == [torch.bfloat16, torch.bfloat16, torch.float32]
    for name, c, e in zip(("out", "grad_x", "grad_w"), cuda, emulated):
        assert c.dtype == e.dtype and rel_err(c.cpu(), e.cpu()) < CUDA_VS_EMULATED_TOL, name
    q, d = quantize_weight_fwd_triton(w.transpose(1, 2), False)[:2]
    q_ref, d_ref = R.quantize_weight_ref(w.transpose(1, 2).cpu(), False)[:2]
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(d.cpu(), d_ref)
    wl = w.detach().requires_grad_()
    _, saved = saved_by(scaled_grouped_mm, x.requires_grad_(), wl.transpose(1, 2), offs, backend="cuda")
    big = [t for t in saved if t.dim() == 3 and t.dtype in (torch.bfloat16, torch.float32)]
    assert len(big) == 1 and big[0].untyped_storage().data_ptr() == wl.untyped_storage().data_ptr()


def test_cuda_backend_float32_inputs_and_output():
    x, w, offs, grad_out = _inputs(*SIZES["uneven"], dtype=torch.float32)
    out, gx, gw = _fwd_bwd(x, w, offs, grad_out, backend="cuda")
    assert out.dtype == gx.dtype == gw.dtype == torch.float32
    ref = grouped_mm_f64(x.cpu(), w.transpose(1, 2).cpu(), offs.cpu())
    assert rel_err(out.cpu(), ref) < E4M3_TOL


def test_cuda_backend_nonfinite_stays_nonfinite():
    x, w, offs, grad_out = _inputs(*SIZES["uneven"])
    x[20, 3] = float("nan")  # a row of group 2
    w[0, 5, 7] = float("inf")  # expert 0, output column 5
    out, gx, gw = _fwd_bwd(x, w, offs, grad_out, backend="cuda")
    assert bool(out[20].isnan().all()) and bool(out[:13, 5].isnan().all())
    assert bool(out[13:20].isfinite().all())
    assert bool(gw[2, :, 3].isnan().all()) and bool(gw[1].isfinite().all())


@pytest.mark.parametrize("with_x_fp8", [False, True])
def test_forward_and_backward_never_synchronize(with_x_fp8):
    x, w, offs, grad_out = _inputs(*SIZES["uneven"])
    x_fp8 = quantize_rows(x) if with_x_fp8 else None
    handle = x if x_fp8 is None else torch.zeros((), dtype=x.dtype, device="cuda").expand(x.shape)
    _fwd_bwd(handle, w, offs, grad_out, backend="cuda", x_fp8=x_fp8)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, gx, gw = _fwd_bwd(handle, w, offs, grad_out, backend="cuda", x_fp8=x_fp8)
        if x_fp8 is None:
            quantize_rows(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert out.isfinite().all() and gw.isfinite().all()


@pytest.mark.parametrize("backend", ["cuda", "bf16"])
def test_forward_and_backward_replay_in_a_cuda_graph(backend):
    # Graph-friendly: one capture of forward+backward, then replays on new input values
    # give what eager gives on those values (the same kernels on the same data: equal).
    x0, w0, offs0, g0 = _inputs(*SIZES["uneven"], seed=5)
    x = x0.clone().requires_grad_()
    w = w0.clone().requires_grad_()
    offs, grad_out = offs0.clone(), g0.clone()

    def step():
        x.grad = w.grad = None
        out = scaled_grouped_mm(x, w.transpose(1, 2), offs, backend=backend)
        out.backward(grad_out)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    gx, gw = x.grad, w.grad
    for seed in (6, 7):  # new values, and new group ends: offs is read on the device
        x1, w1, _, g1 = _inputs(*SIZES["uneven"], seed=seed)
        sizes = torch.tensor(SIZES["uneven"][0], device="cuda").roll(seed)
        offs1 = sizes.cumsum(0).to(torch.int32)
        with torch.no_grad():
            x.copy_(x1), w.copy_(w1), offs.copy_(offs1), grad_out.copy_(g1)
        graph.replay()
        ref = _fwd_bwd(x1, w1, offs1, g1, backend=backend)
        for got, want in zip((out, gx, gw), ref):
            assert torch.equal(got, want)


def test_bf16_backend_zeroes_rows_past_end_on_gpu():
    x, w, offs, grad_out = _inputs(*SIZES["uneven"])
    out, gx, gw = _fwd_bwd(x, w, offs, grad_out, backend="bf16")
    end = sum(SIZES["uneven"][0])
    assert bool((out[end:] == 0).all()) and bool((gx[end:] == 0).all())


def test_compile_fullgraph_inductor_matches_eager():
    torch._dynamo.reset()
    x, w, offs, grad_out = _inputs(*SIZES["uneven"])

    def layer(x, w):
        return torch.nn.functional.silu(scaled_grouped_mm(x, w.transpose(1, 2), offs, backend="cuda"))

    eager = _fwd_bwd_fn(layer, x, w, grad_out)
    compiled = _fwd_bwd_fn(torch.compile(layer, fullgraph=True), x, w, grad_out)
    for a, b in zip(eager, compiled):
        assert rel_err(a.float().cpu(), b.float().cpu()) < 1e-2  # inductor may fuse silu differently


def _fwd_bwd_fn(fn, x, w, grad_out):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    out = fn(x, w)
    out.backward(grad_out)
    return out, x.grad, w.grad


def test_too_many_groups_for_cuda_backend_is_a_value_error():
    x = torch.randn(16, 16, device="cuda", dtype=torch.bfloat16)
    w_t = torch.randn(backends.MAX_CUDA_GROUPS, 16, 16, device="cuda", dtype=torch.bfloat16)
    offs = torch.full((backends.MAX_CUDA_GROUPS,), 16, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="fewer than 1024 groups"):
        scaled_grouped_mm(x, w_t, offs, backend="cuda")
