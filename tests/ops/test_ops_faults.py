"""Behaviours of ep_fp8.ops that the other ops tests leave open: backend="auto"'s threshold
and GPU rule as documented, which quantization code each backend runs, the cuda GEMMs'
arguments, and corners of the kernels (a single row past offs[-1], ...)."""

import pytest
import torch

from ep_fp8.ops import backends, resolve_backend, scaled_grouped_mm
from tests.ops._helpers import offsets, same_bits

GPU = torch.device("cuda", 0)
ON_CPU = not torch.cuda.is_available()


@pytest.fixture
def pretend_sm90(monkeypatch):
    monkeypatch.setattr(backends, "_has_scaled_grouped_mm", lambda device_type, index: True)
    monkeypatch.setattr(backends, "_warned", set())


def test_auto_switches_to_float8_at_two_to_the_37_multiply_adds(pretend_sm90):
    # docs/ops.md: auto picks cuda from 2^37 multiply-adds (M * K * N) on; K = N = 2048 puts
    # the edge at M = 32768 rows.
    assert resolve_backend("auto", GPU, 2048, 2048, 32768) == "cuda"
    assert resolve_backend("auto", GPU, 2048, 2048, 32767) == "bf16"
    assert resolve_backend("auto", GPU, 2048, 2048, 16384) == "bf16"


@pytest.mark.parametrize("capability, has_fp8", [((9, 0), True), ((10, 0), True), ((8, 9), False),
                                                 ((10, 3), False), ((12, 0), False)])
def test_float8_gemm_is_used_only_on_compute_capability_9_0_and_10_0(monkeypatch, capability, has_fp8):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    big = 1 << 20  # rows enough for the size rule
    assert resolve_backend("auto", GPU, 4096, 4096, big) == ("cuda" if has_fp8 else "emulated")
    if has_fp8:
        assert resolve_backend("cuda", GPU, 4096, 4096, big) == "cuda"
    else:
        with pytest.raises(ValueError, match="compute capability 9.0 or 10.0"):
            resolve_backend("cuda", GPU, 4096, 4096, big)


def _forbid_triton(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a Triton kernel ran on the emulated or bf16 backend on CPU")
    monkeypatch.setattr(backends, "_TRITON", backends._Kernels(*[forbidden] * len(backends._TRITON)))


@pytest.mark.skipif(not ON_CPU, reason="the CPU's quantization path")
@pytest.mark.parametrize("backend", ["emulated", "bf16", "auto"])
def test_cpu_backends_quantize_with_the_torch_reference_not_the_kernels(monkeypatch, backend):
    # The emulated oracle stays independent of the Triton kernels, and a CPU run needs no
    # Triton launch (without TRITON_INTERPRET there would be nothing to launch with).
    _forbid_triton(monkeypatch)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 32, generator=gen).requires_grad_()
    w_t = torch.randn(2, 32, 16, generator=gen).requires_grad_()
    offs = offsets([15, 20])
    out = scaled_grouped_mm(x, w_t, offs, backend=backend)
    out.backward(torch.randn(out.shape, generator=gen))
    assert torch.isfinite(x.grad).all() and torch.isfinite(w_t.grad).all()


@pytest.fixture
def cuda_path_on_cpu(monkeypatch, request):
    """The cuda backend on CPU: test_cuda_contract's stand-in for torch._scaled_grouped_mm
    (it enforces the GEMM's layout and alignment contract), each call's keywords recorded."""
    if not ON_CPU:
        pytest.skip("CPU stand-in of the GEMM; on a GPU test_gpu.py runs the real one")
    from tests.ops.test_cuda_contract import fake_scaled_grouped_mm

    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return fake_scaled_grouped_mm(*args, **kwargs)
    monkeypatch.setattr(backends, "_has_scaled_grouped_mm", lambda device_type, index: True)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", recording)
    return calls


def test_all_three_cuda_gemms_run_with_fast_accumulation(cuda_path_on_cpu):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 16, generator=gen).bfloat16().requires_grad_()
    w_t = torch.randn(2, 16, 16, generator=gen).bfloat16().requires_grad_()
    scaled_grouped_mm(x, w_t, offsets([12, 30]), backend="cuda").sum().backward()
    assert len(cuda_path_on_cpu) == 3  # forward, grad_x, grad_w
    assert all(kw.get("use_fast_accum") is True for kw in cuda_path_on_cpu)


def test_x_fp8_data_with_a_row_stride_off_16_bytes_is_copied_before_the_gemm(cuda_path_on_cpu):
    from ep_fp8.ops import quantize_rows

    gen = torch.Generator().manual_seed(2)
    M, K, N, offs = 32, 32, 48, offsets([12, 20])
    x, w_t = torch.randn(M, K, generator=gen).bfloat16(), torch.randn(2, K, N, generator=gen).bfloat16()
    data, scale = quantize_rows(x)
    buf = torch.zeros(M, 40, dtype=torch.uint8)  # rows 40 bytes apart, the first 16-byte aligned
    buf[:, :K] = data.view(torch.uint8)
    strided = buf[:, :K].view(torch.float8_e4m3fn)
    assert strided.data_ptr() % 16 == 0 and strided.stride(0) == 40
    handle = torch.zeros((), dtype=torch.bfloat16).expand(M, K)
    out = scaled_grouped_mm(handle, w_t, offs, backend="cuda", x_fp8=(strided, scale))
    assert torch.equal(out, scaled_grouped_mm(handle, w_t, offs, backend="cuda", x_fp8=(data, scale)))


def test_quantize_rows_of_a_tensor_that_requires_grad_gives_plain_tensors():
    from ep_fp8.ops import quantize_rows

    x = torch.randn(4, 32, requires_grad=True)
    data, scale = quantize_rows(x)
    assert not data.requires_grad and not scale.requires_grad
    assert data.grad_fn is None and scale.grad_fn is None


@pytest.mark.parametrize("sizes", [[40], [0, 7, 33], [100, 27]])
def test_one_row_past_offs_end_stays_out_of_the_last_groups_column_scales(sizes):
    # M = offs[-1] + 1: the last tile of source rows ends on the one row that is in no
    # group. It is made the column maximum, so counting it in the last group would change
    # that group's scales and float8 values.
    from ep_fp8.ops import quant_kernels as K
    from ep_fp8.ops import quant_ref as R

    device = "cpu" if ON_CPU else "cuda"
    gen = torch.Generator().manual_seed(5)
    M = sum(sizes) + 1
    a = torch.randn(M, 24, generator=gen)
    a[-1] = 1e4
    a = a.bfloat16().to(device)
    offs = offsets(sizes, device)
    qT, descale, poffs = K.quantize_cols_grouped_triton(a, offs)
    qT_r, descale_r, poffs_r = R.quantize_cols_grouped_ref(a, offs)
    assert torch.equal(poffs, poffs_r) and same_bits(descale, descale_r)
    end = poffs_r[-1].item()
    assert same_bits(qT[:, :end], qT_r[:, :end])
    got = K.quantize_rows_cols_grouped_triton(a, offs)
    assert same_bits(got[4], descale_r) and same_bits(got[3][:, :end], qT_r[:, :end])


@pytest.mark.skipif(ON_CPU, reason="empty inputs through the GPU GEMMs and kernels")
@pytest.mark.parametrize("backend", ["bf16", "cuda", "auto"])
def test_no_tokens_on_the_gpu_give_an_empty_output_and_zero_weight_grads(backend):
    if backend == "cuda" and not backends._has_scaled_grouped_mm("cuda", -1):
        pytest.skip("needs a GPU of compute capability 9.0 or 10.0")
    x = torch.zeros(0, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    w = torch.randn(4, 32, 64, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    offs = torch.zeros(4, dtype=torch.int32, device="cuda")
    out = scaled_grouped_mm(x, w.transpose(-2, -1), offs, backend=backend)
    assert out.shape == (0, 32)
    out.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(w.grad, torch.zeros_like(w))


def test_scatter_rows_kernel_reads_a_column_major_source():
    from ep_fp8.ops.permute import scatter_rows_into

    device = "cpu" if ON_CPU else "cuda"
    gen = torch.Generator().manual_seed(6)
    R, k, D, n_fill = 6, 2, 20, 4
    perm = torch.randperm(R * k + n_fill, generator=gen).to(device)
    idx, fill = perm[: R * k].view(R, k), perm[R * k:]
    src = torch.randn(D, R, generator=gen).to(device).t()  # (R, D), column stride R
    want = torch.full((R * k + n_fill, D), 0.0, device=device)
    for j in range(k):
        want[idx[:, j]] = src
    for backend in ("triton", "torch"):
        assert torch.equal(scatter_rows_into(src, idx, fill, R * k + n_fill, backend=backend), want)


@pytest.mark.parametrize("grad_mode", ["no_grad", "inputs_without_grad"])
def test_forward_without_grad_makes_only_the_forward_float8_copies(monkeypatch, grad_mode):
    # docs/ops.md: a gradient nobody asks for is not computed, nor the float8 copy only it
    # would need (the token-group copy of x, the weight's amax per (g, k)).
    seen = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.append((name, args[2] if name == "weight_fwd" else None))
            return fn(*args, **kwargs)
        return wrapped
    ref = backends._REF
    monkeypatch.setattr(backends, "_REF", backends._Kernels(*[spy(n, f) for n, f in zip(ref._fields, ref)]))
    gen = torch.Generator().manual_seed(7)
    no_grad = grad_mode == "no_grad"  # inputs that want grads under no_grad, or inputs that want none
    x = torch.randn(40, 32, generator=gen).requires_grad_(no_grad)
    w_t = torch.randn(2, 32, 16, generator=gen).requires_grad_(no_grad)
    with torch.set_grad_enabled(not no_grad):
        out = scaled_grouped_mm(x, w_t, offsets([15, 20]), backend="emulated")
    assert not out.requires_grad
    assert ("rows", None) in seen and ("weight_fwd", False) in seen
    assert not any(name in ("rows_cols_grouped", "cols_grouped") for name, _ in seen)


@pytest.mark.parametrize("sizes", [[3, 0, 9], [32], [0, 0], [40, 30]])
def test_zero_rows_past_end_kernel_zeroes_exactly_the_rows_past_offs_end(sizes):
    # M = 70 rows over three 32-row blocks: offs[-1] inside a block, on a block boundary, at
    # 0 and in the last, partial block.
    from ep_fp8.ops import quant_kernels as K
    from ep_fp8.ops import quant_ref as R

    device = "cpu" if ON_CPU else "cuda"
    out = (torch.rand(70, 130, generator=torch.Generator().manual_seed(8)) + 1).bfloat16().to(device)
    offs = offsets(sizes, device)
    want = R.zero_rows_past_end_ref(out, offs)
    end = sum(sizes)
    assert bool((want[end:] == 0).all()) and torch.equal(want[:end], out[:end])
    assert torch.equal(K.zero_rows_past_end_triton(out.clone(), offs), want)


@pytest.mark.parametrize("M, sizes", [(0, [0, 0, 0]), (0, [0]), (5, [0, 0])])
def test_column_kernels_write_every_padded_column_of_every_group_with_no_rows(monkeypatch, M, sizes):
    # No token rows at all: every group is one block of zero padding, the last of which ends
    # at the host's upper bound P. Buffers come poisoned (NaN, -1), so a column the kernels
    # leave unwritten shows.
    from ep_fp8.ops import quant_kernels as K
    from ep_fp8.ops import quant_ref as R

    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(-1) if not t.dtype.is_floating_point else t.fill_(float("nan"))
    device = "cpu" if ON_CPU else "cuda"
    a = torch.randn(M, 40).bfloat16().to(device)
    offs = offsets(sizes, device)
    want = R.quantize_rows_cols_grouped_ref(a, offs)
    monkeypatch.setattr(torch, "empty", poisoned)
    got = (K.quantize_cols_grouped_triton(a, offs), K.quantize_rows_cols_grouped_triton(a, offs)[3:])
    for qT, descale, poffs in got:
        assert torch.equal(poffs, want[5])
        end = want[5][-1].item()
        assert same_bits(descale, want[4]) and same_bits(qT[:, :end], want[3][:, :end])


def test_column_kernels_clamp_a_negative_group_end_to_zero_as_the_reference_does():
    # docs/ops.md: the Triton kernels clamp offs into [0, M]. A first group "ending" at -3
    # is empty, and the next one starts at row 0, not at -3.
    from ep_fp8.ops import quant_kernels as K
    from ep_fp8.ops import quant_ref as R

    device = "cpu" if ON_CPU else "cuda"
    a = torch.randn(16, 40, generator=torch.Generator().manual_seed(9)).bfloat16().to(device)
    offs = torch.tensor([-3, 10, 14], dtype=torch.int32, device=device)
    qT, descale, poffs = K.quantize_cols_grouped_triton(a, offs)
    qT_r, descale_r, poffs_r = R.quantize_cols_grouped_ref(a, offs)
    assert torch.equal(poffs, poffs_r) and same_bits(descale, descale_r)
    end = poffs_r[-1].item()
    assert same_bits(qT[:, :end], qT_r[:, :end])
