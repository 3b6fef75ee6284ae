"""The custom ops behind backend="bf16": torch._grouped_mm in the input dtype, no float8.

A custom op rather than plain torch._grouped_mm so that rows past offs[-1] are zero in the
output and in grad_x (torch._grouped_mm leaves them unwritten), with the same
x_fp8 (dequantized here) and the same compile behaviour as the float8 backends.
"""

from typing import Optional

import torch

from ep_fp8.ops import backends
from ep_fp8.ops.quant_ref import dequantize_rows


def _x_values(x, x_data, x_scale):
    """The high-precision x: x itself, or x_fp8 dequantized to x's dtype."""
    if x_data is None:
        return x
    return dequantize_rows(x_data, x_scale, x.dtype)


def _hp_fwd_impl(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor, x_data: Optional[torch.Tensor],
            x_scale: Optional[torch.Tensor], out_dtype: torch.dtype, fallback_note: str = "") -> torch.Tensor:
    if fallback_note:  # why backend="auto" runs bf16 here (said once, also from compiled code)
        backends.warn_once(fallback_note)
    if x.shape[0] == 0:  # no tokens: torch._grouped_mm rejects empty operands
        return x.new_zeros((0, w_t.shape[2]), dtype=out_dtype)
    out = backends.grouped_mm(_x_values(x, x_data, x_scale), w_t, offs).to(out_dtype)
    return backends.kernels_for("bf16", x.device).zero_rows_past_end(out, offs)


_hp_fwd = torch.library.custom_op("ep_fp8::grouped_mm_hp_fwd", mutates_args=())(_hp_fwd_impl)


@_hp_fwd.register_fake
def _(x, w_t, offs, x_data, x_scale, out_dtype, fallback_note=""):
    return x.new_empty((x.shape[0], w_t.shape[2]), dtype=out_dtype)


def _hp_bwd_impl(grad_out: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor,
            x_data: Optional[torch.Tensor], x_scale: Optional[torch.Tensor],
            need_grad_x: bool, need_grad_w: bool) -> tuple[torch.Tensor, torch.Tensor]:
    grad_out = grad_out.to(x.dtype)
    grad_x = grad_w = grad_out.new_empty((0,))
    if x.shape[0] == 0:
        grad_w = w_t.new_zeros(w_t.shape if need_grad_w else (0,))
        if need_grad_w and backends.stored_nk(w_t):
            grad_w = w_t.new_zeros(w_t.transpose(-2, -1).shape).transpose(-2, -1)
        return x.new_zeros(x.shape if need_grad_x else (0,)), grad_w
    if need_grad_x:
        grad_x = backends.grouped_mm(grad_out, w_t.transpose(-2, -1), offs)
        grad_x = backends.kernels_for("bf16", x.device).zero_rows_past_end(grad_x, offs)
    if need_grad_w:
        x_v = _x_values(x, x_data, x_scale)
        if backends.stored_nk(w_t):  # compute the gradient in the weight's (G, N, K) layout
            grad_w = backends.grouped_mm(grad_out.t(), x_v, offs).transpose(-2, -1)
        else:
            grad_w = backends.grouped_mm(x_v.t(), grad_out, offs)
    return grad_x, grad_w


_hp_bwd = torch.library.custom_op("ep_fp8::grouped_mm_hp_bwd", mutates_args=())(_hp_bwd_impl)


@_hp_bwd.register_fake
def _(grad_out, x, w_t, offs, x_data, x_scale, need_grad_x, need_grad_w):
    grad_x = x.new_empty(x.shape if need_grad_x else (0,))
    if need_grad_w and backends.stored_nk(w_t):
        return grad_x, w_t.new_empty(w_t.transpose(-2, -1).shape).transpose(-2, -1)
    grad_w = w_t.new_empty(w_t.shape if need_grad_w else (0,))
    return grad_x, grad_w


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])  # x, w_t, offs, x_data, x_scale


def _grads(ctx, grad_out, bwd):
    """(grad_x, grad_w_t, None for the other forward inputs) through bwd (the custom op or its impl)."""
    x, w_t, offs, x_data, x_scale = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_w = bwd(grad_out, x, w_t, offs, x_data, x_scale, need_x, need_w)
    return grad_x if need_x else None, grad_w if need_w else None, None, None, None, None, None


def _backward(ctx, grad_out):
    return _grads(ctx, grad_out, torch.ops.ep_fp8.grouped_mm_hp_bwd)


_hp_fwd.register_autograd(_backward, setup_context=_setup_context)


class EagerGroupedMMHP(torch.autograd.Function):
    """The bf16 custom ops' forward and backward called directly, for eager mode (less
    host time per call than the custom-op dispatch; see fp8_ops.EagerScaledGroupedMM)."""

    @staticmethod
    def forward(ctx, x, w_t, offs, x_data, x_scale, out_dtype, fallback_note):
        _setup_context(ctx, (x, w_t, offs, x_data, x_scale), None)
        return _hp_fwd_impl(x, w_t, offs, x_data, x_scale, out_dtype, fallback_note)

    @staticmethod
    def backward(ctx, grad_out):
        return _grads(ctx, grad_out, _hp_bwd_impl)
