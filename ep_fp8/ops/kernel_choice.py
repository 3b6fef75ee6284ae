"""Which implementation runs for an op that has a Triton kernel and a torch reference with
the same results (the permutation kernels, SwiGLU's gating): backend "auto" takes the
kernel on CUDA tensors and the reference elsewhere; "triton" and "torch" force one."""

from __future__ import annotations

import os

import torch

KERNEL_BACKENDS = ("auto", "triton", "torch")


def check_kernel_backend(backend: str) -> None:
    """Raises ValueError for a backend not in KERNEL_BACKENDS."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")


def use_triton(backend: str, t: torch.Tensor) -> bool:
    """Whether `backend` runs the Triton kernel on tensors like `t`. Raises ValueError for
    an unknown backend, and for "triton" on CPU tensors outside Triton's interpreter
    (TRITON_INTERPRET=1), where no kernel could be launched."""
    check_kernel_backend(backend)
    triton = backend == "triton" or (backend == "auto" and t.is_cuda)
    if triton and not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")
    return triton
