"""Which implementation runs for an op that has a Triton kernel and a torch reference with
the same results (the permutation kernels, SwiGLU's gating): backend "auto" takes the
kernel on CUDA tensors and the reference elsewhere; "triton" and "torch" force one."""

from __future__ import annotations

import torch
from triton import knobs
from triton.backends import backends
from triton.runtime import driver

KERNEL_BACKENDS = ("auto", "triton", "torch")


def check_kernel_backend(backend: str) -> None:
    """Raises ValueError for a backend not in KERNEL_BACKENDS."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")


def interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter: TRITON_INTERPRET read the way
    Triton reads it ("1", "true", "on" or "yes" in any case; "0", "2", "false" are off)."""
    return bool(knobs.runtime.interpret)


def _can_launch_on_cpu_tensors() -> bool:
    # Triton's interpreter runs kernels on CPU tensors; so does a stand-in driver set
    # active by hand (tests/sm90_compile_worker.py compiles that way). The drivers of the
    # backends Triton registers (CUDA and HIP with triton 3.6-3.7) take device memory only,
    # and without any driver a launch fails with a RuntimeError: neither names the cause.
    # (A CPU backend registered as a Triton plugin would be refused here too.)
    if interpreting():
        return True
    try:
        active = driver.active
    except RuntimeError:
        return False
    return not isinstance(active, tuple(b.driver for b in backends.values()))


def use_triton(backend: str, t: torch.Tensor) -> bool:
    """Whether `backend` runs the Triton kernel on tensors like `t`. Raises ValueError for
    an unknown backend, and for "triton" on CPU tensors where Triton has nothing to launch
    them with (no interpreter, TRITON_INTERPRET=1, and no driver)."""
    check_kernel_backend(backend)
    kernel = backend == "triton" or (backend == "auto" and t.is_cuda)
    if kernel and not t.is_cuda and not _can_launch_on_cpu_tensors():
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {t.device}")
    return kernel
