"""Corners of the input checks that test_errors.py and test_swiglu.py leave open: a check
that must compare the whole shape, both directions of a size comparison, every tensor of a
device comparison; backend="auto"'s size rule and the group limit as scaled_grouped_mm
applies them; the operand layouts backends.grouped_mm hands to torch._grouped_mm; and
SwiGLU's float32 arithmetic seen through one rounding to bfloat16."""

import re

import pytest
import torch

from ep_fp8.ops import backends, dequantize_rows, quantize_rows, scaled_grouped_mm, swiglu
from tests.ops._helpers import grouped_mm_f64, offsets, rel_err


class _KernelReached(Exception):
    pass


@pytest.fixture
def kernel_spy(monkeypatch):
    """Records the backend of the first kernels_for call and stops the op there."""
    seen = []

    def spy(backend, device):
        seen.append(backend)
        raise _KernelReached(backend)
    monkeypatch.setattr(backends, "kernels_for", spy)
    return seen


@pytest.fixture
def pretend_sm90(monkeypatch):
    monkeypatch.setattr(backends, "_has_scaled_grouped_mm", lambda device_type, index: True)
    monkeypatch.setattr(backends, "_warned", set())


def _good():
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    w_t = torch.randn(2, 32, 48, dtype=torch.bfloat16)  # (G, K, N) = (2, 32, 48)
    return x, w_t, offsets([10, 30])


def _fp8(shape):
    return torch.zeros(shape).to(torch.float8_e4m3fn)


BAD = {  # name: (exception, exact words the message must contain, kwargs replacing the good ones)
    "w_t_not_a_tensor": (TypeError, "w_t must be a torch.Tensor, got list", dict(w_t=[[[1.0]]])),
    "offs_not_a_tensor": (TypeError, "offs must be a torch.Tensor, got list", dict(offs=[10, 30])),
    "w_t_k_larger_than_x_k": (ValueError, "K mismatch: x is (M, K) = (40, 32) but w_t is (G, K, N) = (2, 48, 48)",
                              dict(w_t=torch.randn(2, 48, 48, dtype=torch.bfloat16))),
    "offs_shorter_than_g": (ValueError, "len(offs) = 1 but w_t has G = 2", dict(offs=offsets([10]))),
    "no_groups": (ValueError, "w_t must have G, K and N > 0, got shape (0, 32, 48)",
                  dict(w_t=torch.randn(0, 32, 48, dtype=torch.bfloat16), offs=offsets([]))),
    "no_in_features": (ValueError, "w_t must have G, K and N > 0, got shape (2, 0, 48)",
                       dict(x=torch.randn(40, 0, dtype=torch.bfloat16),
                            w_t=torch.randn(2, 0, 48, dtype=torch.bfloat16))),
    "w_t_on_another_device": (ValueError, "x, w_t and offs must be on one device",
                              dict(w_t=torch.empty(2, 32, 48, dtype=torch.bfloat16, device="meta"))),
    "x_fp8_three_entries": (TypeError, "x_fp8 must be a (data, scale) pair",
                            dict(x_fp8=(_fp8((40, 32)), torch.ones(40), torch.ones(40)))),
    "x_fp8_data_wrong_k": (ValueError, "x_fp8 data must have x's shape (40, 32), got (40, 16)",
                           dict(x_fp8=(_fp8((40, 16)), torch.ones(40)))),
    "x_fp8_data_on_another_device": (ValueError, "x_fp8 must be on x's device cpu",
                                     dict(x_fp8=(torch.empty(40, 32, dtype=torch.float8_e4m3fn, device="meta"),
                                                 torch.ones(40)))),
    "x_fp8_scale_not_a_tensor": (TypeError, "x_fp8 scale must be a torch.Tensor, got list",
                                 dict(x_fp8=(_fp8((40, 32)), [1.0] * 40))),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_grouped_mm_input_raises_naming_the_problem_before_any_kernel(case, kernel_spy):
    exc, words, change = BAD[case]
    x, w_t, offs = _good()
    kwargs = dict(x=x, w_t=w_t, offs=offs, backend="emulated")
    kwargs.update(change)
    with pytest.raises(exc, match=re.escape(words)):
        scaled_grouped_mm(**kwargs)
    assert kernel_spy == []


def test_dequantize_rows_rejects_a_scale_with_one_entry_per_row_but_two_dims():
    with pytest.raises(ValueError, match=re.escape("scale must have shape (4,) (one per row of data), got (4, 1)")):
        dequantize_rows(_fp8((4, 16)), torch.ones(4, 1), torch.float32)


def test_quantize_rows_rejects_an_int_for_exact_scales():
    with pytest.raises(TypeError, match="exact_scales must be a bool, got int"):
        quantize_rows(torch.randn(4, 16), exact_scales=1)


def test_scaled_grouped_mm_applies_the_group_limit_to_w_t_groups(pretend_sm90, kernel_spy, monkeypatch):
    monkeypatch.setattr(backends, "AUTO_FP8_MIN_MACS", 0)  # the size rule out of the way
    G = backends.MAX_CUDA_GROUPS
    x, w_t = torch.zeros(16, 16), torch.zeros(G, 16, 16)
    offs = torch.full((G,), 16, dtype=torch.int32)
    with pytest.raises(ValueError, match="backend='cuda' takes fewer than 1024 groups, got G=1024"):
        scaled_grouped_mm(x, w_t, offs, backend="cuda")
    assert kernel_spy == []
    with pytest.warns(UserWarning, match="G=1024 groups"), pytest.raises(_KernelReached):
        scaled_grouped_mm(x, w_t, offs, backend="auto")
    assert kernel_spy == ["emulated"]


@pytest.mark.parametrize("extra, want", [(0, "cuda"), (1, "bf16")])
def test_auto_in_scaled_grouped_mm_compares_m_times_k_times_n_with_the_threshold(pretend_sm90, kernel_spy,
                                                                                 monkeypatch, extra, want):
    x, w_t, offs = _good()  # M, K, N = 40, 32, 48 with G = 2 groups
    monkeypatch.setattr(backends, "AUTO_FP8_MIN_MACS", 40 * 32 * 48 + extra)
    with pytest.raises(_KernelReached):
        scaled_grouped_mm(x, w_t, offs)
    assert kernel_spy == [want]


def _operand_rule_enforcing(real):
    """torch._grouped_mm's operand rule, which only its CUDA build enforces: data 16-byte
    aligned, row- or column-major in the last two dims, the other stride a multiple of 16 bytes."""
    def run(a, b, offs=None):
        for t in (a, b):
            (s1, s2), size = t.stride()[-2:], t.element_size()
            assert t.data_ptr() % 16 == 0, "data not 16-byte aligned"
            assert (s2 == 1 and s1 * size % 16 == 0) or (s1 == 1 and s2 * size % 16 == 0), t.stride()
        return real(a, b, offs=offs)
    return run


@pytest.mark.parametrize("layout", ["start_4_bytes_off", "row_stride_72_bytes"])
def test_grouped_mm_copies_operands_torch_grouped_mm_would_reject(monkeypatch, layout):
    monkeypatch.setattr(torch, "_grouped_mm", _operand_rule_enforcing(torch._grouped_mm))
    gen = torch.Generator().manual_seed(7)
    if layout == "start_4_bytes_off":
        base = torch.randn(24, 20, generator=gen)
        a = base[:, 1:17]   # row stride 80 bytes (fine), start 4 bytes past an aligned one
    else:
        base = torch.randn(24, 18, generator=gen)
        a = base[:, :16]    # start aligned, row stride 72 bytes
    assert base.data_ptr() % 16 == 0
    b, offs = torch.randn(2, 16, 32, generator=gen), offsets([10, 9])
    got = backends.grouped_mm(a, b, offs)
    # float32 GEMM of 16-term sums against a float64 loop: ~1e-7 relative
    assert rel_err(got[:19], grouped_mm_f64(a, b, offs)[:19]) < 1e-5


def test_swiglu_rejects_b_with_as_many_elements_but_another_shape():
    with pytest.raises(ValueError, match=re.escape("one shape, dtype and device, got (4, 8)")):
        swiglu(torch.randn(4, 8), torch.randn(8, 4))


def test_swiglu_rejects_b_on_another_device():
    with pytest.raises(ValueError, match="one shape, dtype and device.*cpu and .*meta"):
        swiglu(torch.randn(4, 8), torch.empty(4, 8, device="meta"))


def test_swiglu_bf16_torch_path_rounds_float32_results_once():
    # The torch path computes h, grad_a and grad_b in float32 and rounds each once to
    # bfloat16 (round to nearest): within half a bf16 ulp, 2^-8 relative, of the float64
    # value for every element, plus float32 slack: 2^-16 relative for h and grad_b, and
    # for grad_a 2^-16 of |g * b| * (s + |a| s (1 - s)), the size of the terms whose
    # difference s + a s (1 - s) is (it cancels near silu's minimum).
    gen = torch.Generator().manual_seed(11)
    a, b, g = (4 * torch.randn(64, 96, generator=gen) for _ in range(3))
    a, b, g = (t.bfloat16() for t in (a, b, g))
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    h = swiglu(ar, br, backend="torch")
    h.backward(g)
    a64, b64, g64 = (t.double() for t in (a, b, g))
    s = torch.sigmoid(a64)
    terms = g64.abs() * b64.abs() * (s + a64.abs() * s * (1 - s))
    for name, got, want, slack in (("h", h, a64 * s * b64, 2**-16 * (a64 * s * b64).abs()),
                                   ("grad_a", ar.grad, g64 * b64 * (s + a64 * s * (1 - s)), 2**-16 * terms),
                                   ("grad_b", br.grad, g64 * a64 * s, 2**-16 * (g64 * a64 * s).abs())):
        assert got.dtype == torch.bfloat16
        excess = (got.double() - want).abs() - (2**-8 * want.abs() + slack)
        assert excess.max().item() <= 0, name


def test_auto_applies_the_group_limit_before_the_size_rule(pretend_sm90):
    # A call below the size threshold with 1024 groups: the group limit decides (emulated,
    # with its warning), not the size rule (bf16), as docs/ops.md states.
    G = backends.MAX_CUDA_GROUPS
    small_M = 16
    assert small_M * 16 * 16 < backends.AUTO_FP8_MIN_MACS
    with pytest.warns(UserWarning, match=f"G={G} groups"):
        picked = backends.resolve_backend("auto", torch.device("cuda", 0), 16, 16, M=small_M, G=G)
    assert picked == "emulated"
    assert backends.resolve_backend("auto", torch.device("cuda", 0), 16, 16, M=small_M, G=G - 1) == "bf16"
