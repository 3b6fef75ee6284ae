"""Kernels and differentiable ops: float8 quantization, the float8 grouped matmul and
SwiGLU's gating."""

from ep_fp8.ops.backends import resolve_backend
from ep_fp8.ops.grouped_mm import dequantize_rows, quantize_rows, scaled_grouped_mm
from ep_fp8.ops.swiglu import swiglu, swiglu_packed

__all__ = [
    "dequantize_rows",
    "quantize_rows",
    "resolve_backend",
    "scaled_grouped_mm",
    "swiglu",
    "swiglu_packed",
]
