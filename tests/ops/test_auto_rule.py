"""backend="auto"'s size rule: float8 only where M * K * N reaches backends.AUTO_FP8_MIN_MACS.

The rule itself is checked here on CPU (a GPU of compute capability 9.0 is pretended);
the threshold's measurement is in docs/benchmarks.md."""

import pytest
import torch

from ep_fp8.ops import backends, resolve_backend, scaled_grouped_mm
from tests.ops._helpers import offsets

GPU = torch.device("cuda", 0)


@pytest.fixture
def pretend_sm90(monkeypatch):
    monkeypatch.setattr(backends, "_has_scaled_grouped_mm", lambda device_type, index: True)
    monkeypatch.setattr(backends, "_warned", set())


def test_auto_picks_bf16_below_the_threshold_and_cuda_from_it(pretend_sm90):
    K, N = 2048, 4096
    m_edge = backends.AUTO_FP8_MIN_MACS // (K * N)
    assert m_edge * K * N == backends.AUTO_FP8_MIN_MACS  # the edge itself is reachable
    assert resolve_backend("auto", GPU, K, N, m_edge - 16) == "bf16"
    assert resolve_backend("auto", GPU, K, N, m_edge) == "cuda"
    assert resolve_backend("auto", GPU, K, N) == "cuda"  # M unknown: no size rule


def test_the_listed_small_shapes_run_bf16_and_the_large_ones_float8(pretend_sm90):
    for M, K, N in ((8192, 2048, 2816), (8192, 1408, 2048), (4096, 2048, 768)):
        assert resolve_backend("auto", GPU, K, N, M) == "bf16"
    for M, K, N in ((16384, 5120, 16384), (16384, 8192, 5120), (32768, 7168, 4096), (32768, 2048, 7168)):
        assert resolve_backend("auto", GPU, K, N, M) == "cuda"


def test_size_rule_changes_neither_explicit_backends_nor_cpu(pretend_sm90):
    assert resolve_backend("cuda", GPU, 16, 16, 16) == "cuda"
    assert resolve_backend("emulated", GPU, 16, 16, 16) == "emulated"
    with pytest.warns(UserWarning, match="not both multiples of 16"):
        assert resolve_backend("auto", GPU, 24, 32, 16) == "bf16"  # misaligned


def test_auto_on_a_small_problem_computes_what_bf16_computes(pretend_sm90):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 32, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(3, 48, 32, generator=gen, dtype=torch.bfloat16)  # stored (G, N, K)
    offs = offsets([10, 0, 24])
    grads = {}
    for backend in ("auto", "bf16"):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = scaled_grouped_mm(xr, wr.transpose(1, 2), offs, backend=backend)
        out.backward(torch.ones_like(out))
        grads[backend] = (out, xr.grad, wr.grad)
    for a, b in zip(grads["auto"], grads["bf16"]):
        assert torch.equal(a, b)
    assert grads["bf16"][2].stride() == w.stride()  # grad in the stored layout, no copy


def test_auto_runs_emulated_with_a_warning_from_1024_groups(pretend_sm90):
    big = 2**30   # well above the size rule
    assert backends.choose_backend("auto", GPU, 32, 32, big, G=backends.MAX_CUDA_GROUPS - 1) == ("cuda", "")
    with pytest.warns(UserWarning, match="G=1024 groups, torch._scaled_grouped_mm takes fewer than 1024"):
        assert resolve_backend("auto", GPU, 32, 32, big, G=1024) == "emulated"
    with pytest.raises(ValueError, match="backend='cuda' takes fewer than 1024 groups, got G=1024"):
        resolve_backend("cuda", GPU, 32, 32, big, G=1024)   # as scaled_grouped_mm does


def test_strided_offs_give_the_same_result_through_the_triton_kernels(monkeypatch):
    # The Triton kernels index offs as a dense vector. On a GPU the cuda backend runs them;
    # without one, the emulated backend is sent through them (the Triton interpreter).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "cuda" if device == "cuda" else "emulated"
    if device == "cpu":
        monkeypatch.setattr(backends, "kernels_for", lambda backend, device: backends._TRITON)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(48, 32, generator=gen).to(device)
    w = torch.randn(2, 16, 32, generator=gen).to(device)
    dense = offsets([16, 16], device)   # ends 16, 32: rows 32..47 are in no group
    strided = torch.stack([dense, torch.zeros_like(dense)], dim=1)[:, 0]   # stride 2
    assert not strided.is_contiguous()
    want = scaled_grouped_mm(x, w.transpose(1, 2), dense, backend=backend)
    got = scaled_grouped_mm(x, w.transpose(1, 2), strided, backend=backend)
    assert torch.equal(got, want) and bool(want[32:].eq(0).all()) and bool(want[16:32].ne(0).any())


def test_experts_falling_back_to_bf16_compile_fullgraph_and_warn_in_eager(pretend_sm90):
    import warnings

    from ep_fp8.moe import GroupedExperts

    experts = GroupedExperts(32, 20, 3, float8=True)   # H = 20: neither H nor 2 H a multiple of 16
    x, offs = torch.randn(40, 32), offsets([10, 0, 24])
    # Traced first, before any warning was given: torch.compile cannot trace warnings.warn.
    out = torch.compile(experts, fullgraph=True, backend="aot_eager")(x, offs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager = experts(x, offs)
    for K, N in ((32, 40), (20, 32)):   # x w13^T, h w2^T
        assert any(f"K={K}, N={N} are not both multiples of 16" in str(w.message) for w in caught)
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)


def test_the_fallback_warning_names_the_callers_line(pretend_sm90):
    import warnings

    x, w_t, offs = torch.randn(20, 24), torch.randn(2, 24, 32), offsets([8, 12])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaled_grouped_mm(x, w_t, offs)   # through the autograd Function and the op's impl
    assert [w.filename for w in caught] == [__file__]
