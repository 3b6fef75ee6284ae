"""SwiGLU experts over grouped rows, and the dense SwiGLU used for shared experts."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ep_fp8.ops.backends import grouped_mm

try:  # DTensor weights (FSDP2 / expert parallelism) compute on their local shard.
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed
    DTensor = ()


class GroupedExperts(nn.Module):
    """E SwiGLU experts: y = (silu(x w1^T) * (x w3^T)) w2^T, row groups given by offs.

    Parameters w1, w3 (E, H, D) and w2 (E, D, H). With float8=True the three matmuls run
    through ep_fp8.ops.scaled_grouped_mm (backend float8_backend, exact_scales as there);
    else through torch._grouped_mm in the activation dtype. Under FSDP2/EP the weights
    are DTensors and their local shard (E_local experts) is used.
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
        self.dim, self.hidden_dim, self.n_experts = dim, hidden_dim, n_experts
        self.float8, self.float8_backend, self.exact_scales = float8, float8_backend, exact_scales
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.init_weights()

    def init_weights(self, init_std: float = 0.02) -> None:
        for w in (self.w1, self.w2, self.w3):
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
        w1, w2, w3 = (_local(w) for w in (self.w1, self.w2, self.w3))
        E_local = w1.shape[0]
        if x_MD.dim() != 2 or x_MD.shape[1] != self.dim:
            raise ValueError(f"x must be (rows, {self.dim}), got shape {tuple(x_MD.shape)}")
        if offs.dtype != torch.int32:
            raise TypeError(f"offs must be int32, got {offs.dtype}")
        if offs.shape != (E_local,):
            raise ValueError(f"offs must have shape ({E_local},) (local experts), got {tuple(offs.shape)}")

        dtype = x_MD.dtype  # weights follow the activations (a no-op under mixed precision)
        if self.float8:
            from ep_fp8.ops import quantize_rows, resolve_backend, scaled_grouped_mm

            # One backend per layer from the static sizes only (no row count): with the size
            # rule of "auto", the row count each rank receives could make ranks and steps
            # disagree, and a float8 run would quietly be part bf16.
            H = w1.shape[1]
            up = resolve_backend(self.float8_backend, x_MD.device, self.dim, H)    # w1, w3
            down = resolve_backend(self.float8_backend, x_MD.device, H, self.dim)  # w2
            if x_fp8 is None and up != "bf16":
                # w1 and w3 read the same x: quantize its rows once for both (x stays the
                # autograd handle). Not for backend="bf16": it would compute on float8 x.
                x_fp8 = quantize_rows(x_MD, self.exact_scales)

            def gmm(a, w, backend, a_fp8=None):
                return scaled_grouped_mm(
                    a, w.to(dtype).transpose(-2, -1), offs, backend=backend,
                    exact_scales=self.exact_scales, x_fp8=a_fp8,
                )

            h = F.silu(gmm(x_MD, w1, up, x_fp8)) * gmm(x_MD, w3, up, x_fp8)
            return gmm(h, w2, down)

        if dtype not in _GROUPED_MM_DTYPES:
            raise TypeError(f"x must be bfloat16, float16 or float32 (torch._grouped_mm), got {dtype}")
        if x_fp8 is not None:  # float8 payload into bf16 experts: dequantize first
            x_MD = _Dequantize.apply(x_MD, *x_fp8)

        def gmm(a, w):
            # grouped_mm pads sizes torch._grouped_mm rejects (rows not a multiple of 16
            # bytes); torch._grouped_mm's backward fails on non-contiguous (e.g. stride-0) grads.
            out = grouped_mm(a, w.to(dtype).transpose(-2, -1), offs)
            return _ContiguousGrad.apply(out)

        return gmm(F.silu(gmm(x_MD, w1)) * gmm(x_MD, w3), w2)


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


_GROUPED_MM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if isinstance(w, DTensor) else w


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # An empty tensor counts as contiguous whatever its strides, so contiguous() would
        # pass a stride-0 empty gradient through: give it fresh strides.
        if grad.numel() == 0:
            return torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
        return grad.contiguous()


class _Dequantize(torch.autograd.Function):
    """The rows dequantized in the handle's dtype; the gradient goes to the handle unchanged."""

    @staticmethod
    def forward(ctx, handle_MD, data_MD, scale_M):
        from ep_fp8.ops import dequantize_rows

        return dequantize_rows(data_MD, scale_M, handle_MD.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None
