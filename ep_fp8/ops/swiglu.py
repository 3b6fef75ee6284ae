"""SwiGLU's gating, silu(a) * b, as one pass forward and one backward.

Autograd on `F.silu(a) * b` runs two kernels forward and three backward, and keeps
silu(a) for backward beside a and b. Here one Triton kernel computes h in float32 from a
and b, and one computes both gradients from (grad_h, a, b); only a and b are saved. On
the routed experts' hidden rows (131,072 x 2048 per layer of moe_1b) that is 8 instead of
14 passes over a (rows, hidden) tensor, and one such tensor less held per layer.

backend="auto" takes the kernels on CUDA and the torch reference (the same float32
arithmetic in torch ops) elsewhere; "triton" and "torch" force one (ep_fp8.ops.kernel_choice).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ep_fp8.ops.kernel_choice import check_kernel_backend, use_triton

_BLOCK = 2048


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    h = a * tl.sigmoid(a) * b
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, a_ptr, b_ptr, ga_ptr, gb_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    s = tl.sigmoid(a)
    # d silu(a) / da = s + a s (1 - s)
    tl.store(ga_ptr + offs, (g * b * (s + a * s * (1.0 - s))).to(ga_ptr.dtype.element_ty), mask=mask)
    tl.store(gb_ptr + offs, (g * a * s).to(gb_ptr.dtype.element_ty), mask=mask)


def _forward(a: torch.Tensor, b: torch.Tensor, kernel: bool) -> torch.Tensor:
    if not kernel:
        a32 = a.float()
        return (a32 * torch.sigmoid(a32) * b.float()).to(a.dtype)
    h = torch.empty_like(a)
    n = a.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](a, b, h, n, BLOCK=_BLOCK, num_warps=8)
    return h


def _backward(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not kernel:
        g32, a32 = g.float(), a.float()
        s = torch.sigmoid(a32)
        return ((g32 * b.float() * (s + a32 * s * (1.0 - s))).to(a.dtype),
                (g32 * a32 * s).to(b.dtype))
    ga, gb = torch.empty_like(a), torch.empty_like(b)
    n = a.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](g, a, b, ga, gb, n, BLOCK=_BLOCK, num_warps=8)
    return ga, gb


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, kernel):
        ctx.save_for_backward(a, b)
        ctx.kernel = kernel
        return _forward(a, b, kernel)

    @staticmethod
    def backward(ctx, grad_h):
        a, b = ctx.saved_tensors
        grad_a, grad_b = _backward(grad_h.contiguous(), a, b, ctx.kernel)
        return grad_a, grad_b, None


def swiglu(a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(a) * b, computed in float32 and returned in a's dtype; differentiable.

    a and b: tensors of one shape, dtype and device (float32, bfloat16 or float16).
    Raises ValueError on mismatched shapes, dtypes or devices, an unknown backend, or
    backend="triton" on CPU tensors outside Triton's interpreter.
    """
    check_kernel_backend(backend)
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"swiglu needs a and b of one shape, dtype and device, got "
                         f"{tuple(a.shape)} {a.dtype} {a.device} and {tuple(b.shape)} {b.dtype} {b.device}")
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"swiglu takes float32, bfloat16 or float16, got {a.dtype}")
    return _SwiGLU.apply(a.contiguous(), b.contiguous(), use_triton(backend, a))
