"""Kernels and differentiable ops: float8 quantization and the float8 grouped matmul."""

from ep_fp8.ops.backends import resolve_backend
from ep_fp8.ops.grouped_mm import dequantize_rows, quantize_rows, scaled_grouped_mm

__all__ = [
    "dequantize_rows",
    "quantize_rows",
    "resolve_backend",
    "scaled_grouped_mm",
]
