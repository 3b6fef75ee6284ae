"""Every bad input to scaled_grouped_mm / quantize_rows / dequantize_rows / resolve_backend raises a
TypeError or ValueError naming the problem, before any kernel runs."""

import warnings

import pytest
import torch

from ep_fp8.ops import backends, dequantize_rows, quantize_rows, resolve_backend, scaled_grouped_mm
from tests.ops._helpers import offsets


@pytest.fixture(autouse=True)
def no_kernel_may_run(monkeypatch):
    """Any quantization kernel reached fails the test: errors must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")
    monkeypatch.setattr(backends, "kernels_for", forbidden)


def _good():
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    w_t = torch.randn(2, 48, 32, dtype=torch.bfloat16).transpose(1, 2)  # (G, K, N) = (2, 32, 48)
    return x, w_t, offsets([10, 30])


def _fp8_pair(M=40, K=32):
    return torch.zeros(M, K).to(torch.float8_e4m3fn), torch.ones(M)


BAD = {  # name: (exception, words the message must contain, kwargs replacing the good ones)
    "x_1d": (ValueError, "x must be 2-D", dict(x=torch.randn(32, dtype=torch.bfloat16))),
    "x_3d": (ValueError, "x must be 2-D", dict(x=torch.randn(2, 20, 32, dtype=torch.bfloat16))),
    "w_2d": (ValueError, "w_t must be 3-D", dict(w_t=torch.randn(32, 48, dtype=torch.bfloat16))),
    "offs_2d": (ValueError, "offs must be 1-D", dict(offs=offsets([10, 30]).view(1, 2))),
    "x_int": (TypeError, "x must be torch.bfloat16 or torch.float32", dict(x=torch.ones(40, 32, dtype=torch.int32))),
    "x_fp16": (TypeError, "x must be torch.bfloat16 or torch.float32, got torch.float16",
               dict(x=torch.randn(40, 32, dtype=torch.float16))),
    "w_dtype": (TypeError, "w_t must have x's dtype torch.bfloat16 (or be float32 with bfloat16 x), "
                "got torch.float64", dict(w_t=torch.randn(2, 32, 48, dtype=torch.float64))),
    "w_bf16_x_fp32": (TypeError, "w_t must have x's dtype torch.float32", dict(
        x=torch.randn(40, 32), w_t=torch.randn(2, 32, 48, dtype=torch.bfloat16))),
    "offs_int64": (TypeError, "offs must be int32, got torch.int64", dict(offs=torch.tensor([10, 30]))),
    "out_dtype": (TypeError, "out_dtype", dict(out_dtype=torch.float16)),
    "k_mismatch": (ValueError, "K mismatch", dict(w_t=torch.randn(2, 16, 48, dtype=torch.bfloat16))),
    "offs_len": (ValueError, "len(offs) = 3 but w_t has G = 2", dict(offs=offsets([10, 20, 30]))),
    "empty_w": (ValueError, "G, K and N > 0", dict(w_t=torch.randn(2, 32, 0, dtype=torch.bfloat16),
                                                  )),
    "device": (ValueError, "one device", dict(offs=torch.empty(2, dtype=torch.int32, device="meta"))),
    "backend": (ValueError, "backend must be one of", dict(backend="fp8")),
    "exact": (TypeError, "exact_scales must be a bool", dict(exact_scales=1)),
    "x_fp8_not_pair": (TypeError, "x_fp8 must be a (data, scale) pair", dict(x_fp8=torch.zeros(3))),
    "x_fp8_dtype": (TypeError, "x_fp8 data must be torch.float8_e4m3fn",
                    dict(x_fp8=(torch.zeros(40, 32), torch.ones(40)))),
    "x_fp8_scale_dtype": (TypeError, "x_fp8 scale must be torch.float32",
                          dict(x_fp8=(_fp8_pair()[0], torch.ones(40, dtype=torch.float64)))),
    "x_fp8_shape": (ValueError, "x_fp8 data must have x's shape", dict(x_fp8=_fp8_pair(M=39))),
    "x_fp8_scale_shape": (ValueError, "x_fp8 scale must have shape", dict(x_fp8=(_fp8_pair()[0], torch.ones(40, 1)))),
    "x_fp8_device": (ValueError, "x_fp8 must be on x's device",
                     dict(x_fp8=(_fp8_pair()[0], torch.ones(40, device="meta")))),
    "cuda_without_gpu": (ValueError, "backend='cuda' needs a CUDA GPU", dict(backend="cuda")),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_naming_the_problem(case):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    exc, words, change = BAD[case]
    x, w_t, offs = _good()
    kwargs = dict(x=x, w_t=w_t, offs=offs)
    kwargs.update(change)
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        scaled_grouped_mm(**kwargs)


@pytest.fixture
def pretend_sm90(monkeypatch):
    monkeypatch.setattr(backends, "_has_scaled_grouped_mm", lambda device_type, index: True)
    monkeypatch.setattr(backends, "_warned", set())


def test_cuda_backend_rejects_k_or_n_not_multiple_of_16(pretend_sm90):
    with pytest.raises(ValueError, match="multiples of 16, got K=24, N=48"):
        resolve_backend("cuda", torch.device("cuda", 0), 24, 48)
    x, w_t, offs = _good()
    with pytest.raises(ValueError, match="multiples of 16, got K=32, N=40"):
        scaled_grouped_mm(x, w_t[:, :, :40], offs, backend="cuda")


def test_auto_runs_bf16_for_k_or_n_not_multiple_of_16_and_says_so_once(pretend_sm90):
    device = torch.device("cuda", 0)
    assert resolve_backend("auto", device, 32, 48) == "cuda"
    with pytest.warns(UserWarning, match="K=24, N=48 are not both multiples of 16"):
        assert resolve_backend("auto", device, 24, 48) == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", device, 24, 48) == "bf16"  # no second warning


def test_resolve_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("float8", torch.device("cpu"), 32, 32)


@pytest.mark.parametrize("bad, exc, words", [
    (torch.randn(4, 16, dtype=torch.float16), TypeError, "x must be torch.bfloat16 or torch.float32"),
    (torch.randn(16), ValueError, "x must be 2-D"),
    ([1.0, 2.0], TypeError, "x must be a torch.Tensor"),
])
def test_quantize_rows_rejects_bad_input(bad, exc, words):
    with pytest.raises(exc, match=words):
        quantize_rows(bad)


_DATA = torch.zeros(4, 16).to(torch.float8_e4m3fn)
_SCALE = torch.ones(4)


@pytest.mark.parametrize("data, scale, dtype, exc, words", [
    (torch.zeros(4, 16), _SCALE, torch.bfloat16, TypeError, "data must be torch.float8_e4m3fn"),
    (_DATA, _SCALE.double(), torch.bfloat16, TypeError, "scale must be torch.float32"),
    (_DATA, _SCALE, torch.float16, TypeError, "dtype must be torch.bfloat16 or torch.float32"),
    (_DATA.view(64), torch.ones(64), torch.bfloat16, ValueError, "data must be 2-D"),
    (_DATA, torch.ones(5), torch.bfloat16, ValueError, "scale must have shape \\(4,\\)"),
    ([1.0], _SCALE, torch.bfloat16, TypeError, "data must be a torch.Tensor"),
    (_DATA, torch.ones(4, device="meta"), torch.bfloat16, ValueError, "data and scale must be on one device"),
])
def test_dequantize_rows_rejects_bad_input(data, scale, dtype, exc, words):
    with pytest.raises(exc, match=words):
        dequantize_rows(data, scale, dtype)
