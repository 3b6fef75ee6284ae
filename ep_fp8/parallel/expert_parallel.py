"""Expert parallelism: each EP rank keeps E / ep experts and exchanges tokens all-to-all."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ep_fp8.moe import DISPATCH_PAYLOADS, AllToAllDispatcher, MoE, check_ep_divides
from ep_fp8.parallel.agree import first_problem


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _check_rank_order(ep_mesh: DeviceMesh) -> None:
    """ValueError on every rank when any rank's slice of the mesh lists its ranks in another
    order than its process group (a rank would keep other experts than those it is sent).
    Each rank sees only its own slice, so they agree through first_problem: a rank that
    raised alone would leave the others waiting in the first all-to-all."""
    mesh_ranks = ep_mesh.mesh.tolist()
    group_ranks = dist.get_process_group_ranks(ep_mesh.get_group())
    own = "" if mesh_ranks == group_ranks else (
        f"ep_mesh lists ranks {mesh_ranks}, its process group {group_ranks}: expert slices "
        "follow the mesh and tokens the group, so they must agree")
    verdict = first_problem(own)
    if own:   # in its own words
        raise ValueError(own)
    if verdict:
        raise ValueError("another rank's ep_mesh lists its ranks in another order than its "
                         "process group: expert slices follow the mesh and tokens the group")


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, payload: str = "bf16") -> None:
    """Shard every MoE layer of `model` over the 1-D `ep_mesh`, in place.

    The dispatcher becomes an AllToAllDispatcher over the mesh's group (`payload` "bf16"
    or "float8"), and each expert weight (E, ...) becomes a DTensor placed Shard(0) on
    `ep_mesh`: rank r keeps experts [r E/ep, (r+1) E/ep), the ones the dispatcher sends it.
    DTensors keep the global shape, so a DCP checkpoint saved at one EP degree loads at
    another.

    Every rank must hold the same full weights (same seed, or meta tensors): each keeps
    its slice without communication. Raises ValueError when ep does not divide n_experts,
    a layer is already sharded, or the mesh is not 1-D or lists its ranks in another order
    than its process group (then a rank's slice would not be the experts it is sent),
    before changing any layer.
    """
    check_expert_parallel(model, ep_mesh, payload)
    shard_experts(model, ep_mesh, payload)


def shard_experts(model: nn.Module, ep_mesh: DeviceMesh, payload: str) -> None:
    """apply_expert_parallel without its checks (for callers that made them up front)."""
    for moe in moe_layers(model):
        n_experts = moe.router.n_experts
        experts = moe.experts
        for name, param in list(experts.named_parameters(recurse=False)):
            sharded = distribute_tensor(param.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            experts.register_parameter(name, nn.Parameter(sharded, param.requires_grad))
        moe.dispatcher = AllToAllDispatcher(ep_mesh.get_group(), n_experts, payload=payload,
                                            exact_scales=experts.exact_scales)


def check_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, payload: str = "bf16") -> None:
    """Raise what apply_expert_parallel(model, ep_mesh, payload) would, changing nothing."""
    if payload not in DISPATCH_PAYLOADS:
        raise ValueError(f"dispatch_payload must be one of {DISPATCH_PAYLOADS}, got {payload!r}")
    if ep_mesh.ndim != 1:
        raise ValueError(f"ep_mesh must be 1-D, got {ep_mesh.ndim} dimensions")
    _check_rank_order(ep_mesh)
    for layer, moe in enumerate(moe_layers(model)):
        check_ep_divides(ep_mesh.size(), moe.router.n_experts)
        for name, param in moe.experts.named_parameters(recurse=False):
            if isinstance(param, DTensor):
                raise ValueError(f"expert weight {name} of MoE layer {layer} is already a "
                                 "DTensor: apply expert parallelism once")
