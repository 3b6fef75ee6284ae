"""Triton kernels for the float8 quantization of `quant_ref.py`, with the same signatures.

Each kernel reads offs (when it needs groups) on the device, so no launcher waits for the
GPU. Each launcher allocates its outputs from host-known shapes only. One module per
operand: `rows` (x and grad_out by row, and the zeroing of rows past offs[-1]), `weight`
(the expert weights), `token_groups` (x and grad_out by token-group column, for grad_w);
`common` holds the arithmetic they share.
"""

from ep_fp8.ops.quant_kernels.common import MAX_ROW_BLOCK
from ep_fp8.ops.quant_kernels.rows import quantize_rows_triton, zero_rows_past_end_triton
from ep_fp8.ops.quant_kernels.token_groups import quantize_cols_grouped_triton, quantize_rows_cols_grouped_triton
from ep_fp8.ops.quant_kernels.weight import quantize_weight_bwd_triton, quantize_weight_fwd_triton, weight_fwd_blocks

__all__ = ["MAX_ROW_BLOCK", "quantize_cols_grouped_triton", "quantize_rows_cols_grouped_triton",
           "quantize_rows_triton", "quantize_weight_bwd_triton", "quantize_weight_fwd_triton",
           "weight_fwd_blocks", "zero_rows_past_end_triton"]
