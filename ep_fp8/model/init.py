"""Deterministic weight initialisation that does not depend on how the model is sharded.

Every parameter draws its values from its own generator, seeded by (seed, parameter name),
over the parameter's *global* shape; a sharded parameter (DTensor, from FSDP2 or expert
parallelism) then keeps its local piece. So a model has the same weights whether it is
initialised before or after `parallelize_model`, on 1 rank or on 8, with any EP degree.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ep_fp8 import rng

BASE_STD = 0.02
# Parameter names (last component before ".weight", or the parameter itself) of the
# projections that write into the residual stream: their std shrinks with depth so the
# residual's variance stays O(1) at init (GPT-2 style).
_OUTPUT_PROJECTIONS = ("wo", "w2")
# Router buffers (from the agreed ep_fp8.moe interface) start at zero.
_ZERO_BUFFERS = ("expert_bias", "tokens_per_expert")


def _param_seed(seed: int, name: str) -> int:
    # Distinct for names with distinct CRC-32s (ep_fp8.rng: a bijection of the index).
    return rng.generator_seed(seed, "init", zlib.crc32(name.encode()))


def _std_for(name: str, n_layers: int) -> float:
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]
    if leaf in _OUTPUT_PROJECTIONS:
        return BASE_STD / math.sqrt(2 * n_layers)
    return BASE_STD


@torch.no_grad()
def _fill(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the global tensor `full` into `param`, or into its local shard if sharded."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the same `full`, so slice locally, no comms.
        local = distribute_tensor(full, param.device_mesh, param.placements,
                                  src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)


@torch.no_grad()
def init_weights_(model: nn.Module, seed: int, n_layers: int) -> None:
    """Initialise all parameters and router buffers of `model` in place.

    Matrices ~ N(0, 0.02^2), output projections (wo, w2) ~ N(0, (0.02 / sqrt(2 n_layers))^2),
    vectors: 1 for norm weights, 0 otherwise. Raises ValueError on meta parameters.
    """
    for name, param in model.named_parameters():
        if param.is_meta:
            raise ValueError(f"parameter {name} is on the meta device: call "
                             "model.to_empty(device=...) before init_weights")
        shape, device = param.shape, param.device
        if param.ndim == 1:
            value = 1.0 if "norm" in name else 0.0
            full = torch.full(shape, value, dtype=torch.float32, device=device)
        else:
            gen = torch.Generator(device=device)
            gen.manual_seed(_param_seed(seed, name))
            full = torch.empty(shape, dtype=torch.float32, device=device)
            full.normal_(0.0, _std_for(name, n_layers), generator=gen)
        _fill(param, full.to(param.dtype))
    for module in model.modules():
        for buf_name in _ZERO_BUFFERS:
            buf = getattr(module, buf_name, None)
            if isinstance(buf, torch.Tensor):
                buf.zero_()
