"""SwiGLU's gating, silu(a) * b, as one pass forward and one backward.

Autograd on `F.silu(a) * b` runs two kernels forward and three backward, and keeps
silu(a) for backward beside a and b. Here one Triton kernel computes h in float32 from a
and b, and one computes both gradients from (grad_h, a, b); only a and b are saved. On
the routed experts' hidden rows (131,072 x 2048 per layer of moe_1b) that is 8 instead of
14 passes over a (rows, hidden) tensor, and one such tensor less held per layer.

`swiglu(a, b)` takes a and b as two tensors; `swiglu_packed(ab)` takes them as the two
halves of one tensor's last dimension, as one GEMM against the gate and up weights stacked
([w1; w3]) produces them, and returns their gradient as one tensor of that layout (no copy
either way).

backend="auto" takes the kernels on CUDA and the torch reference (the same float32
arithmetic in torch ops) elsewhere; "triton" and "torch" force one (ep_fp8.ops.kernel_choice).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ep_fp8.ops.kernel_choice import check_kernel_backend, use_triton

_TILE = 2048        # elements per program
_MAX_COLS = 1024    # widest tile


@triton.jit
def _tile(rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Tiles numbered along one grid axis (row tile major): a second axis would cap the
    # column tiles at 65,535 (CUDA's grid y), rows of 67M elements.
    pid = tl.program_id(0).to(tl.int64)
    col_tiles = tl.cdiv(cols, BLOCK_C)
    r = (pid // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = (pid % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    return r, c


@triton.jit
def _swiglu_fwd_kernel(a_ptr, b_ptr, h_ptr, rows, cols, in_stride,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # a and b rows `in_stride` apart (a stride of 2 cols: the halves of one tensor); h dense.
    r, c = _tile(rows, cols, BLOCK_R, BLOCK_C)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    src = r[:, None] * in_stride + c[None, :]
    a = tl.load(a_ptr + src, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + src, mask=mask).to(tl.float32)
    h = a * tl.sigmoid(a) * b
    tl.store(h_ptr + r[:, None] * cols + c[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, a_ptr, b_ptr, ga_ptr, gb_ptr, rows, cols, in_stride,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # g dense; a, b and their gradients rows `in_stride` apart.
    r, c = _tile(rows, cols, BLOCK_R, BLOCK_C)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    src = r[:, None] * in_stride + c[None, :]
    g = tl.load(g_ptr + r[:, None] * cols + c[None, :], mask=mask).to(tl.float32)
    a = tl.load(a_ptr + src, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + src, mask=mask).to(tl.float32)
    s = tl.sigmoid(a)
    # d silu(a) / da = s + a s (1 - s)
    tl.store(ga_ptr + src, (g * b * (s + a * s * (1.0 - s))).to(ga_ptr.dtype.element_ty), mask=mask)
    tl.store(gb_ptr + src, (g * a * s).to(gb_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, rows: int, cols: int, *args) -> None:
    """Run `kernel` over a (rows, cols) grid of tiles of _TILE elements."""
    if rows == 0 or cols == 0:
        return
    block_c = min(_MAX_COLS, triton.next_power_of_2(cols))
    block_r = _TILE // block_c
    grid = (triton.cdiv(rows, block_r) * triton.cdiv(cols, block_c),)
    kernel[grid](*args, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)


def _forward(a: torch.Tensor, b: torch.Tensor, kernel: bool) -> torch.Tensor:
    """silu(a) * b; a and b (rows, cols) views sharing one row stride, last dim dense."""
    if not kernel:
        a32 = a.float()
        return (a32 * torch.sigmoid(a32) * b.float()).to(a.dtype)
    rows, cols = a.shape
    h = torch.empty((rows, cols), dtype=a.dtype, device=a.device)
    _launch(_swiglu_fwd_kernel, rows, cols, a, b, h, rows, cols, a.stride(0))
    return h


def _backward(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor,
              kernel: bool) -> None:
    """Writes d/da and d/db of sum(g * silu(a) * b) into ga and gb (views laid out as a and b)."""
    if not kernel:
        g32, a32 = g.float(), a.float()
        s = torch.sigmoid(a32)
        ga.copy_(g32 * b.float() * (s + a32 * s * (1.0 - s)))
        gb.copy_(g32 * a32 * s)
        return
    rows, cols = a.shape
    _launch(_swiglu_bwd_kernel, rows, cols, g, a, b, ga, gb, rows, cols, a.stride(0))


def _halves(ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cols = ab.shape[1] // 2
    return ab[:, :cols], ab[:, cols:]


class _SwiGLU(torch.autograd.Function):
    """a and b as (rows, cols) tensors, contiguous."""

    @staticmethod
    def forward(ctx, a, b, kernel):
        ctx.save_for_backward(a, b)
        ctx.kernel = kernel
        return _forward(a, b, kernel)

    @staticmethod
    def backward(ctx, grad_h):
        a, b = ctx.saved_tensors
        grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
        _backward(grad_h.contiguous(), a, b, grad_a, grad_b, ctx.kernel)
        return grad_a, grad_b, None


class _SwiGLUPacked(torch.autograd.Function):
    """ab as one contiguous (rows, 2 cols) tensor: a its first half of each row, b its second."""

    @staticmethod
    def forward(ctx, ab, kernel):
        ctx.save_for_backward(ab)
        ctx.kernel = kernel
        return _forward(*_halves(ab), kernel)

    @staticmethod
    def backward(ctx, grad_h):
        (ab,) = ctx.saved_tensors
        grad_ab = torch.empty_like(ab)
        _backward(grad_h.contiguous(), *_halves(ab), *_halves(grad_ab), ctx.kernel)
        return grad_ab, None


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"swiglu takes float32, bfloat16 or float16, got {t.dtype}")


def _rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """t (..., c) as a contiguous (rows, c) tensor (rows counted, not inferred: c may be 0)."""
    return t.contiguous().view(math.prod(t.shape[:-1]), cols)


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
    _check_dtype(a)
    cols = a.shape[-1] if a.dim() else 1
    h = _SwiGLU.apply(_rows(a, cols), _rows(b, cols), use_triton(backend, a))
    return h.view(a.shape)


def swiglu_packed(ab: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(a) * b where a and b are the first and second half of ab's last dimension:
    (..., 2 H) -> (..., H), computed in float32 and returned in ab's dtype; differentiable,
    its gradient one tensor shaped like ab.

    Raises ValueError when ab has no dimension or an odd last one, on a dtype other than
    float32, bfloat16 or float16, an unknown backend, or backend="triton" on CPU tensors
    outside Triton's interpreter.
    """
    check_kernel_backend(backend)
    if ab.dim() == 0 or ab.shape[-1] % 2:
        raise ValueError(f"swiglu_packed needs a last dimension of even size (a and b its halves), "
                         f"got shape {tuple(ab.shape)}")
    _check_dtype(ab)
    h = _SwiGLUPacked.apply(_rows(ab, ab.shape[-1]), use_triton(backend, ab))
    return h.view(*ab.shape[:-1], ab.shape[-1] // 2)
