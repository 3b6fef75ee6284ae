"""The float8 custom ops behind scaled_grouped_mm (cuda and emulated backends).

Forward and backward are custom ops (opaque to torch.compile, so no graph breaks):

  forward   x_q (M, K) per row, w_fwd_q per (g, n) -> out = x @ w_t per group.
            Saved for backward: the weight itself (the parameter, no copy), its amax per
            (g, k), and the transposed, group-padded float8 xT_q per (group, k) (x's rows
            and xT_q come from one kernel pair). No high-precision activation is saved.
  backward  grad_out's row copy and token-group copy from one kernel pair;
            grad_x = grad_out_q (per row) @ w_bwd_q^T   (2D x 3D; w_bwd_q per (g, k), cast
                     now from the weight with the forward's amax, freed right after)
            grad_w = per group, grad_outT_q @ xT_q^T over tokens  (2D x 2D, scales per group)
            in the order that peaks lower for these sizes (grad_w_first).
"""

from typing import Optional

import torch

from ep_fp8.ops import backends
from ep_fp8.ops.quant_ref import FP8_DTYPE, padded_length


def _empty(device, dtype=torch.float32):
    # Outputs not needed (no gradient asked for) are 0-element placeholders.
    return torch.empty(0, dtype=dtype, device=device)


def _saved_shapes(M, K, G, need_w_bwd, need_xT):
    P = padded_length(M, G)
    return ((G, K) if need_w_bwd else (0,), (K, P) if need_xT else (0,), (G, K) if need_xT else (0,),
            (G,) if need_xT else (0,))


def _fwd_impl(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor, x_data: Optional[torch.Tensor],
         x_scale: Optional[torch.Tensor], backend: str, exact_scales: bool, out_dtype: torch.dtype,
         need_w_bwd: bool, need_xT: bool, fallback_note: str
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> out (M, N), w_amax_bwd (G, K), xT_q (K, P), xT_descale (G, K), poffs (G,)."""
    if fallback_note:
        backends.warn_once(fallback_note)
    kern = backends.kernels_for(backend, x.device)
    xT = None
    if x_data is None and need_xT:
        x_q, _, x_descale, *xT = kern.rows_cols_grouped(x, offs, exact_scales)
    elif x_data is None:
        x_q, _, x_descale = kern.rows(x, exact_scales)
    else:
        # The GEMM takes row-major rows 16-byte aligned: copy only data that is not.
        aligned = x_data.stride(1) == 1 and x_data.stride(0) % 16 == 0 and x_data.data_ptr() % 16 == 0
        x_q, x_descale = (x_data if aligned else x_data.contiguous()), torch.reciprocal(x_scale)
        if need_xT:
            xT = kern.cols_grouped(x_q, offs, exact_scales, row_descale=x_descale)
    w_fwd_q, w_fwd_descale, w_amax_bwd = kern.weight_fwd(w_t, exact_scales, need_w_bwd)
    out = backends.gemm_2d3d(x_q, x_descale, w_fwd_q.transpose(-2, -1), w_fwd_descale, offs, backend)
    del w_fwd_q
    out = kern.zero_rows_past_end(out.to(out_dtype), offs)
    if xT is None:
        xT = (_empty(x.device, FP8_DTYPE), _empty(x.device), _empty(x.device, torch.int32))
    return (out, w_amax_bwd, *xT)


_fwd = torch.library.custom_op("ep_fp8::scaled_grouped_mm_fwd", mutates_args=())(_fwd_impl)


@_fwd.register_fake
def _(x, w_t, offs, x_data, x_scale, backend, exact_scales, out_dtype, need_w_bwd, need_xT, fallback_note):
    (M, K), (G, _, N) = x.shape, w_t.shape
    s = _saved_shapes(M, K, G, need_w_bwd, need_xT)
    return (x.new_empty((M, N), dtype=out_dtype), x.new_empty(s[0], dtype=torch.float32),
            x.new_empty(s[1], dtype=FP8_DTYPE), x.new_empty(s[2], dtype=torch.float32),
            x.new_empty(s[3], dtype=torch.int32))


def _bwd_impl(grad_out: torch.Tensor, w_t: torch.Tensor, w_amax_bwd: torch.Tensor, xT_q: torch.Tensor,
         xT_descale: torch.Tensor, poffs: torch.Tensor, offs: torch.Tensor, backend: str, exact_scales: bool,
         x_dtype: torch.dtype, w_dtype: torch.dtype, need_grad_x: bool, need_grad_w: bool, w_nk: bool
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> grad_x (M, K), grad_w_t (G, K, N) (a transposed (G, N, K) buffer when w_nk)."""
    kern = backends.kernels_for(backend, grad_out.device)
    grad_x = grad_w = _empty(grad_out.device)
    if need_grad_x and need_grad_w:
        g_q, _, g_descale, gT_q, gT_descale, _ = kern.rows_cols_grouped(grad_out, offs, exact_scales)
    elif need_grad_x:
        g_q, _, g_descale = kern.rows(grad_out, exact_scales)
    elif need_grad_w:
        gT_q, gT_descale, _ = kern.cols_grouped(grad_out, offs, exact_scales)

    def grad_x_gemm():
        w_bwd_q, w_bwd_descale = kern.weight_bwd(w_t, w_amax_bwd, exact_scales)
        out = backends.gemm_2d3d(g_q, g_descale, w_bwd_q.transpose(-2, -1), w_bwd_descale, offs, backend)
        return kern.zero_rows_past_end(out.to(x_dtype), offs)

    def grad_w_gemm():
        if w_nk:  # the weight is stored (G, N, K): compute its gradient in that layout
            return backends.gemm_2d2d(gT_q, gT_descale, xT_q, xT_descale, poffs, backend).to(w_dtype).transpose(-2, -1)
        return backends.gemm_2d2d(xT_q, xT_descale, gT_q, gT_descale, poffs, backend).to(w_dtype)

    # Each float8 operand is freed as soon as its last GEMM is done; the order that peaks
    # lower goes first.
    if need_grad_w and need_grad_x and grad_w_first(grad_out.shape[0], *w_t.shape, x_dtype, w_dtype):
        grad_w = grad_w_gemm()
        del gT_q
        grad_x = grad_x_gemm()
    else:
        if need_grad_x:
            grad_x = grad_x_gemm()
            del g_q
        if need_grad_w:
            grad_w = grad_w_gemm()
    return grad_x, grad_w


def grad_w_first(M: int, G: int, K: int, N: int, x_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    """Whether backward peaks lower computing grad_w before grad_x, from the sizes alone.

    Alive besides what both orders share: grad_out's float8 row copy and token-group copy
    (about M N bytes each) until their GEMM is done, the weight's float8 backward copy
    (G K N bytes) during the grad_x GEMM, and each gradient from its GEMM on.
    """
    mn, w_q = M * N, G * K * N
    grad_x, grad_w = M * K * x_dtype.itemsize, G * K * N * w_dtype.itemsize
    x_first = max(2 * mn + w_q + grad_x, mn + grad_x + grad_w)
    w_first = max(2 * mn + grad_w, mn + grad_w + w_q + grad_x)
    return w_first < x_first


_bwd = torch.library.custom_op("ep_fp8::scaled_grouped_mm_bwd", mutates_args=())(_bwd_impl)


@_bwd.register_fake
def _(grad_out, w_t, w_amax_bwd, xT_q, xT_descale, poffs, offs, backend, exact_scales,
      x_dtype, w_dtype, need_grad_x, need_grad_w, w_nk):
    M, N = grad_out.shape
    G, K, _ = w_t.shape
    grad_x = grad_out.new_empty((M, K) if need_grad_x else (0,), dtype=x_dtype if need_grad_x else torch.float32)
    if not need_grad_w:
        return grad_x, grad_out.new_empty((0,), dtype=torch.float32)  # _empty's placeholder
    if w_nk:
        return grad_x, grad_out.new_empty((G, N, K), dtype=w_dtype).transpose(-2, -1)
    return grad_x, grad_out.new_empty((G, K, N), dtype=w_dtype)


def _save(ctx, x, w_t, offs, backend, exact_scales, fwd_out):
    """What backward needs, for the custom op's autograd and the eager Function alike."""
    _, w_amax_bwd, xT_q, xT_descale, poffs = fwd_out
    ctx.save_for_backward(w_t, w_amax_bwd, xT_q, xT_descale, poffs, offs)
    ctx.backend, ctx.exact_scales = backend, exact_scales
    ctx.x_dtype, ctx.w_dtype = x.dtype, w_t.dtype
    ctx.w_nk = backends.stored_nk(w_t)


def _grads(ctx, grad_out, bwd):
    """(grad_x, grad_w_t, None for the other forward inputs) through bwd (the custom op or its impl)."""
    w_t, w_amax_bwd, xT_q, xT_descale, poffs, offs = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_w = bwd(grad_out, w_t, w_amax_bwd, xT_q, xT_descale, poffs, offs, ctx.backend,
                         ctx.exact_scales, ctx.x_dtype, ctx.w_dtype, need_x, need_w, ctx.w_nk)
    return (grad_x if need_x else None, grad_w if need_w else None) + (None,) * 9


def _setup_context(ctx, inputs, output):
    x, w_t, offs, _, _, backend, exact_scales = inputs[:7]
    ctx.mark_non_differentiable(*output[1:])
    _save(ctx, x, w_t, offs, backend, exact_scales, output)


def _backward(ctx, grad_out, *_unused):
    return _grads(ctx, grad_out, torch.ops.ep_fp8.scaled_grouped_mm_bwd)


_fwd.register_autograd(_backward, setup_context=_setup_context)


class EagerScaledGroupedMM(torch.autograd.Function):
    """The same forward and backward as the custom ops, called directly: in eager mode the
    custom-op dispatch (schema checks, autograd wrapper) costs more host time per call than
    a small GEMM takes on the GPU. torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, x, w_t, offs, x_data, x_scale, backend, exact_scales, out_dtype, need_w_bwd, need_xT,
                fallback_note):
        fwd_out = _fwd_impl(x, w_t, offs, x_data, x_scale, backend, exact_scales, out_dtype, need_w_bwd, need_xT,
                            fallback_note)
        _save(ctx, x, w_t, offs, backend, exact_scales, fwd_out)
        return fwd_out[0]

    @staticmethod
    def backward(ctx, grad_out):
        return _grads(ctx, grad_out, _bwd_impl)
