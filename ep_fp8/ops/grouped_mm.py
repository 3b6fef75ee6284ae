"""Public API: scaled_grouped_mm (float8 grouped matmul) and quantize_rows."""

from __future__ import annotations

import torch

from ep_fp8.ops import backends, fp8_ops, hp_ops, quant_kernels, quant_ref  # noqa: F401  (registers the ops)
from ep_fp8.ops.validation import check_dequantize_rows_args, check_grouped_mm_args, check_high_precision_2d


def scaled_grouped_mm(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype | None = None,
                      *, backend: str = "auto", exact_scales: bool = False,
                      x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Grouped matmul with dynamic float8 e4m3 scaling; a drop-in for torch._grouped_mm(x, w_t, offs=offs).

    out[offs[g-1]:offs[g]] = x[offs[g-1]:offs[g]] @ w_t[g] for every group g (offs[-1] = 0
    before the first); rows past offs[-1] are zero. Differentiable in x and w_t.

    Args:
        x: (M, K) bfloat16 or float32, any strides.
        w_t: (G, K, N), x's dtype, any strides (an expert weight stored (G, N, K) is
            passed as w.transpose(-2, -1); its gradient then comes in that layout too).
            With bfloat16 x it may be float32 (a master weight, not cast first): the
            float8 backends quantize it as it is, the bf16 backend casts it to bfloat16;
            its gradient is float32.
        offs: (G,) int32 cumulative group ends on x's device: non-decreasing, offs[-1] <= M
            (not checked: that would read the device). Empty groups are allowed.
        out_dtype: bfloat16 or float32; None means x's dtype.
        backend: "auto" (see ep_fp8.ops.resolve_backend), "cuda", "emulated" or "bf16".
        exact_scales: scales 448 / amax instead of the default powers of two.
        x_fp8: (data (M, K) float8_e4m3fn, scale (M,) float32) from quantize_rows: x is
            then already quantized and is not quantized again; x is still passed, with
            shape (M, K) and the dtype grad_x should have, as the handle through which
            grad_x flows, and its values are not read (a stride-0 expanded tensor will do).

    Returns:
        (M, N) in out_dtype.

    Raises:
        TypeError: a dtype is wrong (x, w_t not bfloat16/float32 or not alike but for
            float32 w_t with bfloat16 x, offs not int32, x_fp8 not float8/float32,
            out_dtype).
        ValueError: a shape, length or device does not fit, or backend="cuda" cannot run
            here (no SM90/SM100 GPU, K or N not a multiple of 16, 1024 groups or more).
    """
    check_grouped_mm_args(x, w_t, offs, out_dtype, x_fp8, exact_scales)
    (M, K), (G, _, N) = x.shape, w_t.shape
    chosen, note = backends.choose_backend(backend, x.device, K, N, M, G)
    offs = offs.contiguous()  # the kernels index offs as a dense vector (a no-op when it is one)
    out_dtype = out_dtype or x.dtype
    x_data, x_scale = x_fp8 if x_fp8 is not None else (None, None)
    eager = not torch.compiler.is_compiling()  # eager: skip the custom-op dispatch (host time)
    if chosen == "bf16":
        w_t = w_t.to(x.dtype)   # a float32 master weight: its cast (differentiable)
        if eager:
            return hp_ops.EagerGroupedMMHP.apply(x, w_t, offs, x_data, x_scale, out_dtype, note)
        return torch.ops.ep_fp8.grouped_mm_hp_fwd(x, w_t, offs, x_data, x_scale, out_dtype, note)
    grad_on = torch.is_grad_enabled()
    need_w_bwd = grad_on and x.requires_grad  # the weight amax per (g, k) that grad_x needs
    need_xT = grad_on and w_t.requires_grad  # the float8 token-group copy grad_w needs
    args = (x, w_t, offs, x_data, x_scale, chosen, exact_scales, out_dtype, need_w_bwd, need_xT, note)
    if eager:
        return fp8_ops.EagerScaledGroupedMM.apply(*args)
    return torch.ops.ep_fp8.scaled_grouped_mm_fwd(*args)[0]


@torch.library.custom_op("ep_fp8::quantize_rows", mutates_args=())
def _quantize_rows_op(x: torch.Tensor, exact_scales: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type == "cuda":
        q, scale, _ = quant_kernels.quantize_rows_triton(x, exact_scales)
    else:
        q, scale, _ = quant_ref.quantize_rows_ref(x, exact_scales)
    return q, scale


@_quantize_rows_op.register_fake
def _(x, exact_scales):
    return x.new_empty(x.shape, dtype=quant_ref.FP8_DTYPE), x.new_empty(x.shape[:1], dtype=torch.float32)


def quantize_rows(x: torch.Tensor, exact_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of x to float8 e4m3 with its own scale (docs/ops.md, Numerics).

    x (M, K) bfloat16 or float32 -> (data (M, K) float8_e4m3fn contiguous, scale (M,)
    float32) with x ~= data.float() / scale[:, None]; a row holding an inf or NaN gets
    scale NaN. Triton on CUDA, torch elsewhere, identical bits. Not differentiable.

    Raises TypeError for another dtype, ValueError unless x is 2-D.
    """
    check_high_precision_2d("x", x)
    if not isinstance(exact_scales, bool):
        raise TypeError(f"exact_scales must be a bool, got {type(exact_scales).__name__}")
    return torch.ops.ep_fp8.quantize_rows(x.detach(), exact_scales)


def dequantize_rows(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of quantize_rows up to its rounding: data (M, C) float8_e4m3fn and scale
    (M,) float32 -> (M, C) in dtype (bfloat16 or float32), data * (1 / scale) per row.

    Raises TypeError for another dtype of data, scale or the result, ValueError for shapes
    that do not fit (data not 2-D, scale not one per row) or tensors on two devices.
    """
    check_dequantize_rows_args(data, scale, dtype)
    return quant_ref.dequantize_rows(data, scale, dtype)
