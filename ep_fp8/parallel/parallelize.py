"""parallelize_model: expert parallelism, activation checkpointing, compile, then FSDP2."""

from __future__ import annotations

import warnings

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ep_fp8.model import Transformer
from ep_fp8.moe import DISPATCH_PAYLOADS, GroupedExperts
from ep_fp8.parallel.checkpointing import (AC_MODES, apply_activation_checkpointing,
                                           check_activation_checkpointing)
from ep_fp8.parallel.dims import MESH_DIMS, ParallelDims
from ep_fp8.parallel.expert_parallel import check_expert_parallel, moe_layers, shard_experts


def submesh(mesh: DeviceMesh, names: str | tuple[str, ...]) -> DeviceMesh:
    """mesh[names], also for the flattened "dp_shard" / "dp" dims (whose slicing from the
    root mesh torch>=2.11 warns about, but still supports)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flattened dim.*")
        return mesh[names]


def dense_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """FSDP2 mesh of the dense weights: "dp_shard", or 2-D (HSDP) with "dp_replicate"."""
    return submesh(mesh, ("dp_replicate", "dp_shard")) if dims.dp_replicate > 1 \
        else submesh(mesh, "dp_shard")


def expert_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """FSDP2 mesh of the expert weights: "efsdp", or 2-D (HSDP) with "dp_replicate"."""
    return submesh(mesh, ("dp_replicate", "efsdp")) if dims.dp_replicate > 1 \
        else submesh(mesh, "efsdp")


def apply_compile(model: Transformer, backend: str) -> None:
    """torch.compile, per block, every submodule free of communication and host reads.

    Compiled in place (nn.Module.compile), so parameter names do not change: attention,
    the norms, the dense FFN and the shared experts. The router, dispatcher and grouped
    experts stay eager: dispatch reads split sizes on the host and the experts' own
    FSDP2 unit has hooks that would break the graph.
    """
    for block in model.layers:
        for name, child in block.named_children():
            if name != "moe":
                child.compile(backend=backend)
            elif child.shared_experts is not None:
                child.shared_experts.compile(backend=backend)


def _expert_placement(experts: GroupedExperts, dims: ParallelDims):
    """Shard(0) when the local experts split evenly over efsdp ranks; else Shard(1), which
    needs dim 1 of every weight to split evenly (FSDP2 pads only dim 0)."""
    n_local = experts.w13.shape[0] // dims.ep         # DTensor shapes are global
    if n_local % dims.efsdp == 0:
        return None
    if all(p.shape[1] % dims.efsdp == 0 for p in experts.parameters()):
        return lambda param: Shard(1)
    return None  # uneven dim-0 shards: FSDP2 pads them


def apply_fsdp(model: Transformer, dims: ParallelDims, mesh: DeviceMesh,
               param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               prefetch_experts: bool = True) -> None:
    """FSDP2 units: each block's experts, each block, the embedding, [norm, head], root.

    Where every expert lives on one rank only (dp_replicate * efsdp == 1: one GPU, or ep =
    world size) no rank shares an expert's weights or gradient, and FSDP2 over the experts
    would only copy their weights into and out of a one-rank all-gather in forward and again
    in backward, and their gradients through a one-rank reduce-scatter (about 3% of a
    moe_1b step on one H200). The experts then stay outside FSDP2: float8 experts quantize
    their float32 weights directly, bf16 experts cast them to the activation dtype in
    forward (the cast is kept for backward, as an unsharded weight that is not resharded
    after forward would be: about 1.9 GiB more for moe_1b), and their gradients are scaled
    by 1 / world size, as FSDP2 would have divided them (GroupedExperts.grad_scale;
    experts_alone_on_their_ranks).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # The experts' inputs arrive in the activation dtype already, and a float8 payload
    # (x_fp8 = float8 rows + float32 scales) must reach them as it is, not cast.
    mp_experts = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                      cast_forward_inputs=False)
    dense, experts_mesh = dense_mesh(mesh, dims), expert_mesh(mesh, dims)
    alone = experts_alone_on_their_ranks(dims)
    # Only NCCL has PREMUL_SUM; a CPU mesh reduces through gloo whatever the backend's name
    # says ("gloo", "cpu:gloo", or "undefined" after init_process_group() without one).
    no_premul_sum = mesh.device_type != "cuda"
    ignored: set[torch.nn.Parameter] = set()
    for block in model.layers:
        if block.moe is not None and alone:
            # As FSDP2's divide factor below: the gradient of the mean loss over all ranks.
            # (In forward: hooks on the parameters would not survive model.to_empty.)
            block.moe.experts.grad_scale = 1.0 / dims.world_size
            ignored |= set(block.moe.experts.parameters())
        elif block.moe is not None:
            experts = block.moe.experts
            fully_shard(experts, mesh=experts_mesh, mp_policy=mp_experts,
                        shard_placement_fn=_expert_placement(experts, dims))
            if dims.ep > 1:
                # An expert's gradient already sums the tokens of all ep ranks (they came
                # through the all-to-all); FSDP2 would average it over the R * efsdp ranks
                # of its mesh. Dividing by the world size instead matches the dense weights'
                # average over all ranks, i.e. the gradient of the global mean loss.
                experts.set_gradient_divide_factor(float(dims.world_size))
                if no_premul_sum and dims.efsdp > 1:
                    # gloo has no PREMUL_SUM: sum, then divide. (Not with efsdp == 1: torch
                    # then skips the reduce-scatter and would divide twice.)
                    experts.set_force_sum_reduction_for_comms(True)
        fully_shard(block, mesh=dense, mp_policy=mp, ignored_params=_within(block, ignored))
    fully_shard(model.tok_embeddings, mesh=dense, mp_policy=mp)
    # Backward starts with these: keeping them unsharded after forward saves an all-gather.
    fully_shard([model.norm, model.output], mesh=dense, mp_policy=mp,
                reshard_after_forward=False)
    fully_shard(model, mesh=dense, mp_policy=mp, ignored_params=ignored or None)
    if dims.ep > 1:
        _explicit_prefetch(model, with_experts=prefetch_experts and not alone)


def experts_alone_on_their_ranks(dims: ParallelDims) -> bool:
    """Whether each expert's weights live on one rank only (no data-parallel copy): then
    the experts stay outside FSDP2 (apply_fsdp)."""
    return dims.dp_replicate * dims.efsdp == 1


def _within(module: torch.nn.Module, params: set) -> set | None:
    inside = params & set(module.parameters())
    return inside or None


def _explicit_prefetch(model: Transformer, with_experts: bool) -> None:
    """Each dispatch reads split sizes on the host, so the CPU cannot run ahead to issue
    the next unit's all-gather early: each block names the next block (and, without
    activation checkpointing, its experts) for FSDP2 to all-gather during its forward.

    Backward keeps FSDP2's implicit prefetch. With activation checkpointing the experts'
    all-gather stays inside the checkpointed forward, so recomputation never issues more
    ops than the forward did (selective checkpointing replays ops by call count).
    """
    blocks = list(model.layers)
    for block, nxt in zip(blocks, blocks[1:]):
        units = [nxt]
        if with_experts and nxt.moe is not None:
            units.append(nxt.moe.experts)
        block.set_modules_to_forward_prefetch(units)


def parallelize_model(model: Transformer, dims: ParallelDims, mesh: DeviceMesh, *,
                      dispatch_payload: str = "bf16", fsdp: bool = True, ac_mode: str = "none",
                      compile: bool | str = False, param_dtype: torch.dtype = torch.bfloat16,
                      reduce_dtype: torch.dtype = torch.float32) -> Transformer:
    """Shard `model` over `mesh` (from dims.build_mesh) in place and return it.

    In order: expert parallelism when dims.ep > 1 (all-to-all dispatcher with
    `dispatch_payload` "bf16" | "float8", expert weights DTensors Shard(0) over "ep");
    activation checkpointing per block (`ac_mode` "none" | "full" | "selective", all-to-all
    outputs always saved); torch.compile per block (`compile`: False, True for the inductor
    backend, or a backend name such as "aot_eager"); FSDP2 with MixedPrecisionPolicy(
    param_dtype, reduce_dtype) (experts over "efsdp", dense weights over "dp_shard", HSDP
    across "dp_replicate"). `fsdp=False` is for a single rank only.

    Every rank must hold the same weights (same init seed) or meta parameters (then call
    model.to_empty(device=...) and model.init_weights(seed) afterwards).
    Raises TypeError/ValueError naming the key (parallel.ep, activation_checkpoint.mode,
    ...) on bad arguments, before changing the model.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be ep_fp8.model.Transformer, got {type(model).__name__}")
    if not isinstance(dims, ParallelDims):
        raise TypeError(f"dims must be ParallelDims, got {type(dims).__name__}")
    if getattr(model, "_ep_fp8_parallelized", False):
        raise ValueError("model was already passed to parallelize_model: build a fresh model "
                         "for another layout")
    if ac_mode not in AC_MODES:
        raise ValueError(f"activation_checkpoint.mode must be one of {AC_MODES}, got {ac_mode!r}")
    if dispatch_payload not in DISPATCH_PAYLOADS:
        raise ValueError(f"dispatch_payload must be one of {DISPATCH_PAYLOADS}, "
                         f"got {dispatch_payload!r}")
    if not isinstance(compile, (bool, str)) or compile == "":
        raise TypeError(f"compile must be a bool or a backend name, got {compile!r}")
    if isinstance(compile, str) and compile not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"compile: {compile!r} is not a torch.compile backend; known: "
                         f"{sorted(torch._dynamo.list_backends(exclude_tags=()))}")
    for name, dtype in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"{name} must be a floating-point torch.dtype, got {dtype!r}")
    if param_dtype not in (torch.bfloat16, torch.float32):   # what the experts compute in
        raise TypeError(f"param_dtype must be torch.bfloat16 or torch.float32, got {param_dtype!r}")
    if fsdp and dims.ep > 1 and reduce_dtype not in (torch.float32, torch.bfloat16):
        # For other dtypes FSDP2 divides before and after the reduction itself, and with one
        # rank per expert shard (efsdp 1) divides the experts' gradients once more.
        raise ValueError(f"reduce_dtype must be torch.float32 or torch.bfloat16 with parallel.ep > 1, "
                         f"got {reduce_dtype}")
    if not fsdp and dims.world_size > 1:
        raise ValueError(f"fsdp=False needs world_size 1, got {dims.world_size}: without "
                         "FSDP2 nothing reduces the dense gradients across ranks")
    for moe in moe_layers(model):
        dims.check_experts(moe.router.n_experts)
    if not isinstance(mesh, DeviceMesh) or mesh.mesh_dim_names != MESH_DIMS:
        raise ValueError(f"mesh must come from ParallelDims.build_mesh (dims {MESH_DIMS}), "
                         f"got {mesh!r}")
    if mesh.size() != dims.world_size:
        raise ValueError(f"mesh has {mesh.size()} ranks but world_size is {dims.world_size}")
    if tuple(mesh.shape) != (dims.dp_replicate, dims.efsdp, dims.ep):
        # Another layout of the same ranks would reduce gradients over the wrong groups.
        raise ValueError(f"mesh has shape {tuple(mesh.shape)} over {MESH_DIMS} but dims "
                         f"(parallel.dp_replicate = {dims.dp_replicate}, parallel.ep = {dims.ep}) "
                         f"need {(dims.dp_replicate, dims.efsdp, dims.ep)}: build it with "
                         "dims.build_mesh")
    try:   # the flattened dims build_mesh adds, which the FSDP2 meshes are sliced from
        submesh(mesh, "dp_shard"), submesh(mesh, "dp")
    except KeyError:
        raise ValueError("mesh lacks the flattened 'dp_shard' and 'dp' dims: build it with "
                         "dims.build_mesh") from None
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            raise ValueError(f"parameter {name} is already a DTensor: parallelize_model takes "
                             "a model of plain (or meta) tensors")
    check_activation_checkpointing(model.layers, ac_mode)
    if dims.ep > 1:   # last: its rank-order check is collective
        check_expert_parallel(model, submesh(mesh, "ep"), dispatch_payload)

    model._ep_fp8_parallelized = True
    if dims.ep > 1:
        shard_experts(model, submesh(mesh, "ep"), dispatch_payload)
    apply_activation_checkpointing(model.layers, ac_mode)
    if compile:
        apply_compile(model, "inductor" if compile is True else compile)
    if fsdp:
        apply_fsdp(model, dims, mesh, param_dtype, reduce_dtype,
                   prefetch_experts=ac_mode == "none")
    return model
