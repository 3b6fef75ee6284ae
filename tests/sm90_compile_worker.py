"""Compiles every Triton kernel of ep_fp8 for an SM90 GPU without one (run as a script).

The Triton interpreter that the CPU tests use skips the compiler front end, so a kernel
that the interpreter runs can still fail to compile on a GPU (e.g. a name bound to
tensors of different shapes in the two branches of an `if`). Here the launchers run on
CPU tensors against a stand-in CUDA driver whose launches only compile (warmup), for
compute capability 9.0. Prints the compiled kernel names; exits non-zero on any error.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton.runtime.jit as triton_jit  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class _CompileOnlyDriver:
    """Just enough of Triton's CUDA driver for JITFunction.run(..., warmup=True)."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def main() -> int:
    driver.set_active(_CompileOnlyDriver())
    compiled = []
    run = triton_jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(self.fn.__name__)
        return kernel

    triton_jit.JITFunction.run = compile_only

    from ep_fp8.ops import permute, quant_kernels, swiglu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=g, dtype=torch.bfloat16)
    w_t = torch.randn(4, 96, 48, generator=g, dtype=torch.bfloat16)
    offs = torch.tensor([16, 16, 40, 64], dtype=torch.int32)
    for exact in (False, True):
        quant_kernels.quantize_rows_triton(x, exact)
        quant_kernels.quantize_rows_triton(torch.randn(4, 20000, generator=g), exact)  # multi-block rows
        for w in (w_t, w_t.transpose(-2, -1).contiguous().transpose(-2, -1),
                  torch.randn(2, 9000, 16, generator=g),  # rows longer than one block
                  torch.randn(2, 5000, 16, generator=g)):  # rows held as a block of 4096 and a tail
            amax = quant_kernels.quantize_weight_fwd_triton(w, exact)[2]
            quant_kernels.quantize_weight_fwd_triton(w, exact, bwd_amax=False)
            quant_kernels.quantize_weight_bwd_triton(w, amax, exact)
        quant_kernels.quantize_cols_grouped_triton(x, offs, exact)
        quant_kernels.quantize_rows_cols_grouped_triton(x, offs, exact)
        q, _, descale = quant_kernels.quantize_rows_triton(x, exact)
        quant_kernels.quantize_cols_grouped_triton(q, offs, exact, row_descale=descale)
    quant_kernels.zero_rows_past_end_triton(torch.randn(64, 48, dtype=torch.bfloat16), offs)

    counts_SE = torch.randint(0, 5, (2, 8), generator=g)
    n_rows = int(counts_SE.sum())
    n_out = n_rows + 16 * 8
    permute.expert_group_indices(counts_SE, n_rows, n_out, backend="triton")
    for dtype in (torch.bfloat16, torch.float32, torch.uint8):
        src = torch.zeros(10, 32, dtype=dtype)
        idx = torch.randperm(20, generator=g)[:20].reshape(10, 2)
        permute.scatter_rows_into(src, idx, torch.arange(20, 24), 24, backend="triton")
    for k in (2, 3, 8):   # top-k is a constant of the gather kernels: one compile each
        rows = torch.randn(10 * k + 4, 32, dtype=torch.bfloat16)
        idx = torch.randperm(10 * k, generator=g).reshape(10, k)
        fill = torch.arange(10 * k, 10 * k + 4)
        w = torch.rand(10, k)
        permute.gather_rows_sum(rows, idx, w, backend="triton")
        permute.gather_rows_sum(rows, idx, None, backend="triton")
        grad = torch.randn(10, 32, dtype=torch.bfloat16)
        for need_rows, need_w in ((True, True), (True, False), (False, True)):
            permute.gather_rows_sum_backward(grad, rows, idx, fill, w, rows.shape[0], need_rows=need_rows,
                                             need_w=need_w, backend="triton")
        permute.gather_rows_sum_backward(grad, None, idx, fill, None, rows.shape[0], need_w=False,
                                         backend="triton")
    for dtype in (torch.bfloat16, torch.float32):
        a, b = (torch.randn(8, 40, generator=g).to(dtype).requires_grad_() for _ in range(2))
        swiglu(a, b, backend="triton").backward(torch.ones(8, 40, dtype=dtype))
    print("compiled for sm_90:", " ".join(sorted(set(compiled))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
