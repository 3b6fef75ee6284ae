"""Argument checks for scaled_grouped_mm and quantize_rows: metadata only (shapes, dtypes,
devices), so they run before any kernel and never read a device value."""

from __future__ import annotations

import torch

from ep_fp8.ops.quant_ref import FP8_DTYPE

HIGH_PRECISION = (torch.bfloat16, torch.float32)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_high_precision_2d(name: str, x) -> None:
    _check_tensor(name, x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (M, K), got shape {tuple(x.shape)}")
    if x.dtype not in HIGH_PRECISION:
        raise TypeError(f"{name} must be torch.bfloat16 or torch.float32, got {x.dtype}")


def check_fp8_rows(data_name: str, data, scale_name: str, scale) -> None:
    """data float8_e4m3fn and scale float32 tensors, as quantize_rows returns them."""
    _check_tensor(data_name, data)
    _check_tensor(scale_name, scale)
    if data.dtype != FP8_DTYPE:
        raise TypeError(f"{data_name} must be torch.float8_e4m3fn, got {data.dtype}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{scale_name} must be torch.float32, got {scale.dtype}")


def check_dequantize_rows_args(data, scale, dtype) -> None:
    """Raise TypeError / ValueError naming the first problem with dequantize_rows' arguments."""
    check_fp8_rows("data", data, "scale", scale)
    if data.dim() != 2:
        raise ValueError(f"data must be 2-D (M, C), got shape {tuple(data.shape)}")
    if tuple(scale.shape) != (data.shape[0],):
        raise ValueError(f"scale must have shape {(data.shape[0],)} (one per row of data), got {tuple(scale.shape)}")
    if scale.device != data.device:
        raise ValueError(f"data and scale must be on one device, got {data.device}, {scale.device}")
    if dtype not in HIGH_PRECISION:
        raise TypeError(f"dtype must be torch.bfloat16 or torch.float32, got {dtype}")


def check_grouped_mm_args(x, w_t, offs, out_dtype, x_fp8, exact_scales) -> None:
    """Raise TypeError / ValueError naming the first problem with the arguments."""
    check_high_precision_2d("x", x)
    _check_tensor("w_t", w_t)
    _check_tensor("offs", offs)
    if w_t.dim() != 3:
        raise ValueError(f"w_t must be 3-D (G, K, N), got shape {tuple(w_t.shape)}")
    if offs.dim() != 1:
        raise ValueError(f"offs must be 1-D (G,), got shape {tuple(offs.shape)}")
    if w_t.dtype != x.dtype and not (w_t.dtype == torch.float32 and x.dtype == torch.bfloat16):
        raise TypeError(f"w_t must have x's dtype {x.dtype} (or be float32 with bfloat16 x), "
                        f"got {w_t.dtype}")
    if offs.dtype != torch.int32:
        raise TypeError(f"offs must be int32, got {offs.dtype}")
    if out_dtype is not None and out_dtype not in HIGH_PRECISION:
        raise TypeError(f"out_dtype must be None, torch.bfloat16 or torch.float32, got {out_dtype}")
    if not isinstance(exact_scales, bool):
        raise TypeError(f"exact_scales must be a bool, got {type(exact_scales).__name__}")
    M, K = x.shape
    G, Kw, N = w_t.shape
    if Kw != K:
        raise ValueError(f"K mismatch: x is (M, K) = {tuple(x.shape)} but w_t is (G, K, N) = {tuple(w_t.shape)}")
    if G == 0 or K == 0 or N == 0:
        raise ValueError(f"w_t must have G, K and N > 0, got shape {tuple(w_t.shape)}")
    if offs.shape[0] != G:
        raise ValueError(f"offs must have one entry per group: len(offs) = {offs.shape[0]} but w_t has G = {G}")
    if w_t.device != x.device or offs.device != x.device:
        raise ValueError(f"x, w_t and offs must be on one device, got {x.device}, {w_t.device}, {offs.device}")
    if x_fp8 is not None:
        if not (isinstance(x_fp8, (tuple, list)) and len(x_fp8) == 2):
            raise TypeError("x_fp8 must be a (data, scale) pair from quantize_rows")
        data, scale = x_fp8
        check_fp8_rows("x_fp8 data", data, "x_fp8 scale", scale)
        if tuple(data.shape) != (M, K):
            raise ValueError(f"x_fp8 data must have x's shape {(M, K)}, got {tuple(data.shape)}")
        if tuple(scale.shape) != (M,):
            raise ValueError(f"x_fp8 scale must have shape {(M,)}, got {tuple(scale.shape)}")
        if data.device != x.device or scale.device != x.device:
            raise ValueError(f"x_fp8 must be on x's device {x.device}, got {data.device}, {scale.device}")
