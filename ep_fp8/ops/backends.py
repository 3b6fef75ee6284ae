"""Which implementation of scaled_grouped_mm runs, and the GEMMs each one calls.

cuda      torch._scaled_grouped_mm on float8 operands from the Triton kernels (SM90/SM100).
emulated  the torch reference quantization (quant_ref), dequantized, then a float32
          torch._grouped_mm: the same numbers up to GEMM rounding, on any device.
bf16      no quantization: torch._grouped_mm in the input dtype.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, NamedTuple

import torch

from ep_fp8.ops import quant_kernels, quant_ref

BACKENDS = ("auto", "cuda", "emulated", "bf16")
# Hopper's fast float8 accumulation skips the periodic promotion of the tensor-core
# accumulator to float32. Measured on the H200 (docs/perf_notes.md): the grouped float8
# GEMMs run 1.4x faster with it (16384,8,5120,16384: 3.10 -> 2.22 ms), and its error is far
# below the e4m3 rounding of the operands (the relative difference it makes is printed by
# scripts/profile_grouped_mm.py), so it is on for all three GEMMs.
USE_FAST_ACCUM = True
# backend="auto" runs bf16 below this many multiply-adds per call (M * K * N): on smaller
# problems the quantization passes and launches cost more than float8 saves (measured on
# the H200, docs/benchmarks.md: 8192 x 2048 x 2816 = 4.7e10 was 3.6x slower in float8,
# 32768 x 2048 x 7168 = 4.8e11 was faster).
AUTO_FP8_MIN_MACS = 2**37
# torch._scaled_grouped_mm takes fewer groups than this.
MAX_CUDA_GROUPS = 1024

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """warnings.warn(message), once per process. Silent while torch.compile traces (it cannot
    trace warnings.warn): the ops pass their note into the custom op, which warns when it runs."""
    if torch.compiler.is_compiling():
        return
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=_first_outside_frame())


# Frames in these folders are the op's own or torch's (autograd, custom-op dispatch).
_INTERNAL = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules["ep_fp8"], torch))


def _first_outside_frame() -> int:
    """The stacklevel, counted from warn_once's caller, of the first frame outside ep_fp8
    and torch: the warning then names the line that called into the op."""
    frame, level = sys._getframe(2), 2   # the frame that called warn_once is level 2
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


@torch.compiler.assume_constant_result
def _has_scaled_grouped_mm(device_type: str, index: int) -> bool:
    # torch 2.11 builds the row-wise float8 grouped GEMM for compute capability 9.0 and 10.0.
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    index = index if index >= 0 else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) in ((9, 0), (10, 0))


def choose_backend(backend: str, device: torch.device, K: int, N: int, M: int | None = None,
                   G: int | None = None) -> tuple[str, str]:
    """(backend that runs, why auto fell back or ''); raises ValueError like resolve_backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("emulated", "bf16"):
        return backend, ""
    device = torch.device(device)
    index = device.index if device.index is not None else -1  # -1: the current device
    supported = _has_scaled_grouped_mm(device.type, index)
    aligned = K % 16 == 0 and N % 16 == 0
    if backend == "cuda":
        if not supported:
            raise ValueError(
                f"backend='cuda' needs a CUDA GPU of compute capability 9.0 or 10.0, got device {device}")
        if not aligned:
            raise ValueError(f"backend='cuda' needs K and N to be multiples of 16, got K={K}, N={N}")
        if G is not None and G >= MAX_CUDA_GROUPS:
            raise ValueError(f"backend='cuda' takes fewer than {MAX_CUDA_GROUPS} groups, got G={G}")
        return "cuda", ""
    if not supported:
        return "emulated", ""
    if not aligned:  # as float8 training recipes skip such layers: high precision, at GPU speed
        return "bf16", (f"scaled_grouped_mm: K={K}, N={N} are not both multiples of 16, which "
                        "torch._scaled_grouped_mm needs; backend='auto' runs 'bf16' instead")
    if G is not None and G >= MAX_CUDA_GROUPS:
        return "emulated", (f"scaled_grouped_mm: G={G} groups, torch._scaled_grouped_mm takes fewer "
                            f"than {MAX_CUDA_GROUPS}; backend='auto' runs 'emulated' instead")
    if M is not None and M * K * N < AUTO_FP8_MIN_MACS:
        return "bf16", ""
    return "cuda", ""


def resolve_backend(backend: str, device: torch.device, K: int, N: int, M: int | None = None,
                    G: int | None = None) -> str:
    """What scaled_grouped_mm runs for `backend` on `device` with in features K, out features N,
    M token rows and G groups (None: not known, the rule on it is not applied).

    Returns "cuda", "emulated" or "bf16". "auto" picks "cuda" on a GPU of compute
    capability 9.0 or 10.0 when K and N are multiples of 16, G is below MAX_CUDA_GROUPS and
    M * K * N is at least AUTO_FP8_MIN_MACS; on such a GPU "bf16" on smaller problems (float8
    would be slower) and where K or N is not a multiple of 16, and "emulated" from
    MAX_CUDA_GROUPS groups; "emulated" on any other device. It warns once when it falls back
    for K, N or G.

    Raises ValueError for an unknown backend, and for backend="cuda" where it cannot run.
    """
    chosen, note = choose_backend(backend, device, K, N, M, G)
    if note:
        warn_once(note)
    return chosen


def kernels_for(backend: str, device: torch.device):
    """The quantization functions a backend uses: Triton kernels on the cuda path, the
    torch reference for emulated (the oracle stays independent of the kernels)."""
    if backend == "cuda" or (backend == "bf16" and device.type == "cuda"):
        return _TRITON
    return _REF


class _Kernels(NamedTuple):
    rows: Callable
    weight_fwd: Callable
    weight_bwd: Callable
    cols_grouped: Callable
    rows_cols_grouped: Callable
    zero_rows_past_end: Callable


_REF = _Kernels(quant_ref.quantize_rows_ref, quant_ref.quantize_weight_fwd_ref, quant_ref.quantize_weight_bwd_ref,
                quant_ref.quantize_cols_grouped_ref, quant_ref.quantize_rows_cols_grouped_ref,
                quant_ref.zero_rows_past_end_ref)
_TRITON = _Kernels(quant_kernels.quantize_rows_triton, quant_kernels.quantize_weight_fwd_triton,
                   quant_kernels.quantize_weight_bwd_triton, quant_kernels.quantize_cols_grouped_triton,
                   quant_kernels.quantize_rows_cols_grouped_triton, quant_kernels.zero_rows_past_end_triton)


def stored_nk(w_t: torch.Tensor) -> bool:
    """w_t (G, K, N) is the transposed view of a weight stored (G, N, K) row-major, as the
    experts keep it: its gradient is then computed in that layout, so that autograd does
    not copy it into the parameter's strides afterwards."""
    return w_t.stride(-2) == 1 and w_t.stride(-1) != 1


def grouped_mm_on_device(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch._grouped_mm is one device kernel for operands of `dtype` on `device`
    (bf16 on an NVIDIA GPU of SM90 or SM100). Elsewhere it loops over the groups with
    their offsets copied to the host, which a CUDA graph cannot capture."""
    return (dtype == torch.bfloat16 and device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device)[0] in (9, 10))


def _grouped_mm_accepts(t: torch.Tensor) -> bool:
    """torch._grouped_mm's operand rule: row- or column-major in the last two dims, the
    other stride a multiple of 16 bytes, data 16-byte aligned."""
    align, (s1, s2), (n1, n2) = 16 // t.element_size(), t.stride()[-2:], t.shape[-2:]
    if t.data_ptr() % 16:
        return False
    if s2 == 1 and s1 >= max(1, n2):
        return s1 % align == 0
    if s1 == 1 and s2 >= max(1, n1):
        return s2 % align == 0
    return False


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(a, b, offs=offs) for operands of any strides and sizes.

    a (M, K) with b (G, K, N) -> (M, N), or a (R, P) with b (P, S) grouped along P ->
    (G, R, S); contiguous. Operands torch._grouped_mm would reject (odd strides, or
    sizes that are not a multiple of 16 bytes) are copied into zero-padded aligned
    buffers first: zeros add nothing to the sums, and the padding is sliced off. So are
    operands whose result rows (N or S) are not a multiple of 16 bytes: torch._grouped_mm
    computes those, but its autograd backward rejects their gradient.
    """
    align = 16 // a.element_size()
    if not (_grouped_mm_accepts(a) and _grouped_mm_accepts(b)) or b.shape[-1] % align:
        up = lambda n: (n + align - 1) // align * align  # noqa: E731
        if b.dim() == 3:
            (M, K), (G, _, N) = a.shape, b.shape
            a_p = a.new_zeros(M, up(K))
            a_p[:, :K] = a
            b_p = b.new_zeros(G, up(K), up(N))
            b_p[:, :K, :N] = b
            return torch._grouped_mm(a_p, b_p, offs=offs)[:, :N].contiguous()
        (R, P), S = a.shape, b.shape[1]
        a_p = a.new_zeros(P, up(R))  # column-major: the grouped dim P needs no alignment
        a_p[:, :R] = a.t()
        b_p = b.new_zeros(P, up(S))
        b_p[:, :S] = b
        return torch._grouped_mm(a_p.t(), b_p, offs=offs)[:, :R, :S].contiguous()
    return torch._grouped_mm(a, b, offs=offs).contiguous()


def gemm_2d3d(a_q, a_descale, b_q, b_descale, offs, backend: str) -> torch.Tensor:
    """out[rows of group g] = (a_q * a_descale) @ (b_q[g] * b_descale[g]).

    a_q (M, K) e4m3 row-major, a_descale (M,); b_q (G, K, N) e4m3 column-major in its
    last two dims, b_descale (G, N); offs (G,) int32. Returns (M, N): bfloat16 on the cuda
    backend, float32 when emulated. Rows past offs[-1] are not written.
    """
    if a_q.shape[0] == 0:  # no tokens at all (a rank that received none): no GEMM to run
        return a_q.new_zeros((0, b_q.shape[2]), dtype=torch.bfloat16 if backend == "cuda" else torch.float32)
    if backend == "cuda":
        return torch._scaled_grouped_mm(a_q, b_q, a_descale, b_descale, offs=offs,
                                        out_dtype=torch.bfloat16, use_fast_accum=USE_FAST_ACCUM)
    a = a_q.float() * a_descale[:, None]
    b = b_q.float() * b_descale[:, None, :]
    return grouped_mm(a, b, offs)


def gemm_2d2d(aT_q, aT_descale, bT_q, bT_descale, poffs, backend: str) -> torch.Tensor:
    """out[g] = sum over the columns p of group g of (aT_q * descale)[:, p] (bT_q * descale)[:, p]^T.

    aT_q (R, P), bT_q (S, P) e4m3 contiguous, groups along P ending at poffs (G,) int32
    (every group non-empty and a multiple of 16 long); aT_descale (G, R), bT_descale
    (G, S). Returns (G, R, S): bfloat16 on the cuda backend, float32 when emulated.
    """
    if backend == "cuda":
        return torch._scaled_grouped_mm(aT_q, bT_q.t(), aT_descale.reshape(-1), bT_descale.reshape(-1),
                                        offs=poffs, out_dtype=torch.bfloat16, use_fast_accum=USE_FAST_ACCUM)
    G, P = poffs.shape[0], aT_q.shape[1]
    group_of_col = torch.searchsorted(poffs.long(), torch.arange(P, device=poffs.device), right=True)
    group_of_col = group_of_col.clamp_max(G - 1)  # columns past poffs[-1] are in no group
    a = aT_q.float() * aT_descale.t()[:, group_of_col]
    b = bT_q.float() * bT_descale.t()[:, group_of_col]
    return grouped_mm(a, b.t(), poffs)
