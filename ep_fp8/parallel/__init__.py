"""Parallelism from outside the model: device mesh, expert parallelism, FSDP2,
activation checkpointing and torch.compile (see docs/parallelism.md)."""

from ep_fp8.parallel.checkpointing import AC_MODES
from ep_fp8.parallel.dims import ParallelDims
from ep_fp8.parallel.parallelize import dense_mesh, expert_mesh, parallelize_model, submesh

__all__ = [
    "AC_MODES", "ParallelDims", "dense_mesh", "expert_mesh",
    "parallelize_model", "submesh",
]
