"""Parallel degrees and the device mesh.

Every rank is a data-parallel rank (it reads its own batch). The ranks form a 3-D mesh

    ("dp_replicate", "efsdp", "ep")  of shape  (dp_replicate, dp_shard // ep, ep)

with two flattened views: "dp_shard" = ("efsdp", "ep"), the ranks of one replica, and
"dp" = all ranks. `ep` is the innermost dimension, so an EP group is a block of
consecutive ranks (one node's NVLink domain when ep <= GPUs per node).

  dense weights   FSDP2 over "dp_shard" (HSDP: replicated over "dp_replicate")
  expert weights  split on the expert dim over "ep", then FSDP2 over "efsdp", the ranks
                  of a replica that hold the same experts (HSDP as above)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("dp_replicate", "efsdp", "ep")


def _check_positive_int(key: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key} must be int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{key} must be >= 1, got {value}")


@dataclass
class ParallelDims:
    """world_size = dp_replicate * dp_shard, and ep divides dp_shard.

    Raises ValueError naming the key (`parallel.dp_replicate`, `parallel.ep`) when a degree
    does not divide what it must.
    """

    world_size: int
    dp_replicate: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        _check_positive_int("world_size", self.world_size)
        _check_positive_int("parallel.dp_replicate", self.dp_replicate)
        _check_positive_int("parallel.ep", self.ep)
        if self.world_size % self.dp_replicate:
            raise ValueError(f"parallel.dp_replicate ({self.dp_replicate}) must divide the "
                             f"world size ({self.world_size})")
        if self.dp_shard % self.ep:
            raise ValueError(f"parallel.ep ({self.ep}) must divide the world size "
                             f"({self.world_size}) / parallel.dp_replicate "
                             f"({self.dp_replicate}) = {self.dp_shard}")

    @property
    def dp_shard(self) -> int:
        """Ranks in one replica: FSDP2 shards dense weights over these."""
        return self.world_size // self.dp_replicate

    @property
    def efsdp(self) -> int:
        """Ranks of one replica holding the same experts: FSDP2 shards experts over these."""
        return self.dp_shard // self.ep

    def check_experts(self, n_experts: int) -> None:
        """Raise ValueError naming `parallel.ep` unless ep divides n_experts."""
        from ep_fp8.moe import check_ep_divides

        check_ep_divides(self.ep, n_experts)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The (dp_replicate, efsdp, ep) mesh with flattened "dp_shard" and "dp" dims.

        Needs an initialised default process group of `world_size` ranks; raises
        ValueError otherwise.
        """
        if not dist.is_initialized():
            raise ValueError("build_mesh needs torch.distributed initialised "
                             "(dist.init_process_group) first")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"world_size ({self.world_size}) does not match the process "
                             f"group's size ({dist.get_world_size()})")
        mesh = init_device_mesh(device_type, (self.dp_replicate, self.efsdp, self.ep),
                                mesh_dim_names=MESH_DIMS)
        mesh["efsdp", "ep"]._flatten("dp_shard")
        mesh[MESH_DIMS]._flatten("dp")
        return mesh
