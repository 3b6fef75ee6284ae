"""SwiGLU experts over grouped rows, and the dense SwiGLU used for shared experts."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ep_fp8 import ops
from ep_fp8.ops.backends import BACKENDS

try:  # DTensor weights (FSDP2 / expert parallelism) compute on their local shard.
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed
    DTensor = ()


class GroupedExperts(nn.Module):
    """E SwiGLU experts: y = (silu(x w1^T) * (x w3^T)) w2^T, row groups given by offs.

    Parameters w13 (E, 2 H, D), the gate weight w1 (E, H, D) stacked on the up weight w3
    along its rows, and w2 (E, D, H). x goes through one grouped matmul with w13 (one
    quantization of x, one GEMM of 2 H columns, and in backward one GEMM for x's gradient
    rather than two and their sum), whose halves are SwiGLU's a and b
    (ep_fp8.ops.swiglu_packed). With float8=True the two matmuls run through
    ep_fp8.ops.scaled_grouped_mm (backend float8_backend, exact_scales as there); else
    through its backend "bf16" (torch._grouped_mm in the activation dtype). Either way
    rows past offs[-1] come out zero, and so do their gradients. Under FSDP2/EP the weights
    are DTensors and their local shard (E_local experts) is used.

    `grad_scale` (1 unless set) multiplies the weights' gradients; parallelize_model sets
    it to 1 / world size for experts that FSDP2 does not reduce (every expert on one rank).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        n_experts: int,
        *,
        float8: bool = False,
        float8_backend: str = "auto",
        exact_scales: bool = False,
    ):
        super().__init__()
        if min(dim, hidden_dim, n_experts) < 1:
            raise ValueError(
                f"dim, hidden_dim and n_experts must be >= 1, got {dim}, {hidden_dim}, {n_experts}"
            )
        if float8_backend not in BACKENDS:
            raise ValueError(f"float8_backend must be one of {BACKENDS}, got {float8_backend!r}")
        if not isinstance(exact_scales, bool):
            raise TypeError(f"exact_scales must be a bool, got {type(exact_scales).__name__}")
        self.dim, self.hidden_dim, self.n_experts = dim, hidden_dim, n_experts
        self.float8, self.float8_backend, self.exact_scales = float8, float8_backend, exact_scales
        self.w13 = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.grad_scale = 1.0
        self.init_weights()

    def init_weights(self, init_std: float = 0.02) -> None:
        for w in (self.w13, self.w2):
            nn.init.trunc_normal_(w, std=init_std)

    def forward(
        self,
        x_MD: torch.Tensor,
        offs: torch.Tensor,
        x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (M, D), offs (E_local,) int32 cumulative group ends -> (M, D) in x's dtype.

        x_fp8: (data (M, D) float8_e4m3fn, scale (M,) float32) when the rows arrived
        quantized; x is then the autograd handle (values unread, see scaled_grouped_mm).
        Raises ValueError/TypeError on shapes or dtypes that do not fit the weights.
        """
        w13, w2 = _local(self.w13), _local(self.w2)
        if self.grad_scale != 1.0:
            w13, w2 = _ScaleGrad.apply(w13, self.grad_scale), _ScaleGrad.apply(w2, self.grad_scale)
        E_local = w13.shape[0]
        if x_MD.dim() != 2 or x_MD.shape[1] != self.dim:
            raise ValueError(f"x must be (rows, {self.dim}), got shape {tuple(x_MD.shape)}")
        if offs.dtype != torch.int32:
            raise TypeError(f"offs must be int32, got {offs.dtype}")
        if offs.shape != (E_local,):
            raise ValueError(f"offs must have shape ({E_local},) (local experts), got {tuple(offs.shape)}")

        dtype = x_MD.dtype  # weights follow the activations (a no-op under mixed precision)
        if dtype not in (torch.bfloat16, torch.float32):
            raise TypeError(f"x must be bfloat16 or float32, got {dtype}")
        if self.float8:
            # One backend per layer from the static sizes only (no row count): with the size
            # rule of "auto", the row count each rank receives could make ranks and steps
            # disagree, and a float8 run would quietly be part bf16.
            H = w2.shape[2]
            up = ops.resolve_backend(self.float8_backend, x_MD.device, self.dim, 2 * H, G=E_local)
            down = ops.resolve_backend(self.float8_backend, x_MD.device, H, self.dim, G=E_local)
        else:
            up = down = "bf16"

        def gmm(a, w, backend, a_fp8=None):
            # A float8 payload into bf16 experts (backend "bf16") is dequantized by the op.
            # A float32 weight (experts outside FSDP2) goes in uncast: the float8 backends
            # quantize it as it is, so no bf16 copy of it is made and kept for backward.
            w = w if w.dtype == torch.float32 else w.to(dtype)
            return ops.scaled_grouped_mm(
                a, w.transpose(-2, -1), offs, backend=backend,
                exact_scales=self.exact_scales, x_fp8=a_fp8,
            )

        # One pass each way, only x w13^T kept for backward (ep_fp8.ops.swiglu_packed).
        h = ops.swiglu_packed(gmm(x_MD, w13, up, x_fp8))
        return gmm(h, w2, down)


class FeedForward(nn.Module):
    """Dense SwiGLU: (T, D) -> (T, D); w1, w3: D -> H, w2: H -> D, no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.init_weights()

    def init_weights(self, init_std: float = 0.02) -> None:
        for lin in (self.w1, self.w2, self.w3):
            nn.init.trunc_normal_(lin.weight, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D) in x's dtype (the weights follow the activations, as in
        GroupedExperts)."""
        w1, w2, w3 = (lin.weight.to(x.dtype) for lin in (self.w1, self.w2, self.w3))
        return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


class _ScaleGrad(torch.autograd.Function):
    """The identity forward; backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, w, scale):
        ctx.scale = scale
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if isinstance(w, DTensor) else w
