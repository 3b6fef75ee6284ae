"""What each spawned rank runs: a parallelized step compared with a single-process one.

Every rank builds the same single-process reference (same seed, the whole global batch)
and the parallel model (its slice of the batch); the global loss is the mean of the
ranks' losses, and sharded gradients are gathered with full_tensor() before comparing.
Workers return floats (errors, counts); the tests assert on them.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from ep_fp8.model import PRESETS, Transformer
from ep_fp8.parallel import ParallelDims, parallelize_model

# The debug preset with the sequence-level aux loss on, so its gradient is checked too.
ARGS = dataclasses.replace(PRESETS["debug"], aux_loss_coef=1e-2, max_seq_len=32)
B_LOCAL, SEQ, SEED = 2, 16, 1234


class CountOps(TorchDispatchMode):
    """Counts all-to-all ops (functional or c10d) and matmuls dispatched while active."""

    def __init__(self):
        super().__init__()
        self.a2a = self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "all_to_all" in name or "alltoall" in name:
            self.a2a += 1
        if func is torch.ops.aten.mm.default:
            self.mm += 1
        return func(*args, **(kwargs or {}))


def global_tokens(world: int, args=ARGS, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, args.vocab_size, (world * B_LOCAL, SEQ + 1), generator=g)
    return tokens.to(device)


def loss_of(model, tokens_BS1: torch.Tensor) -> torch.Tensor:
    logits = model(tokens_BS1[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens_BS1[:, 1:].flatten())


def reference(world: int, args=ARGS, device="cpu") -> tuple[float, dict[str, torch.Tensor]]:
    """Single-process fp32 loss and gradients on the whole global batch."""
    with torch.device(device):
        model = Transformer(args)
    model.init_weights(SEED)
    loss = loss_of(model, global_tokens(world, args, device))
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def parallel_step(rank: int, world: int, dims: ParallelDims, args=ARGS, *, count=False,
                  device="cpu", model_kwargs=None, **kwargs):
    """Loss (mean over ranks), gathered gradients, model, and op counts (all-to-alls in
    forward, all-to-alls in backward, matmuls in backward) of one float32 step."""
    device = torch.device(device)
    mesh = dims.build_mesh(device.type)
    with torch.device(device):
        model = Transformer(args, **(model_kwargs or {}))
    model.init_weights(SEED)
    kwargs.setdefault("param_dtype", torch.float32)
    parallelize_model(model, dims, mesh, **kwargs)
    tokens = global_tokens(world, args, device)[rank * B_LOCAL:(rank + 1) * B_LOCAL]
    # Counting is optional: torch.compile runs eagerly under an active dispatch mode.
    with CountOps() if count else contextlib.nullcontext(CountOps()) as fwd:
        loss = loss_of(model, tokens)
    with CountOps() if count else contextlib.nullcontext(CountOps()) as bwd:
        loss.backward()
    loss_sum = loss.detach().clone()
    dist.all_reduce(loss_sum)
    grads = {n: full(p.grad).detach().clone() for n, p in model.named_parameters()}
    return loss_sum.item() / world, grads, model, (fwd.a2a, bwd.a2a, bwd.mm)


def forward_prefetch(model) -> list[list[str]]:
    """Per block, the FSDP2 units it names for forward prefetch (FSDP2's private record of
    set_modules_to_forward_prefetch, read by module name)."""
    from torch.distributed.fsdp import FSDPModule
    names = {id(m._get_fsdp_state()): n for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    return [[names[id(s)] for s in block._get_fsdp_state()._states_to_forward_prefetch]
            for block in model.layers]


def grad_error(grads: dict, ref: dict) -> float:
    """max over parameters of max|g - g_ref| / max|g_ref|."""
    if grads.keys() != ref.keys():
        raise AssertionError(f"parameter names differ: {sorted(grads.keys() ^ ref.keys())}")
    return max(((grads[n].float() - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30))
               .item() for n in ref)


def grad_norm_error(grads: dict, ref: dict) -> float:
    """||g - g_ref|| / ||g_ref|| over all parameters together (for low-precision runs, where
    a single element may be off by a quantization step, and a small gradient built from
    cancelling terms, such as the router gate's, may be off by far more in relative terms)."""
    diff = sum(((grads[n].float() - ref[n]) ** 2).sum() for n in ref)
    return (diff.sqrt() / sum((ref[n] ** 2).sum() for n in ref).sqrt().clamp_min(1e-30)).item()


def worst_parameter(grads: dict, ref: dict) -> tuple[str, float]:
    """(name, ||g - g_ref|| / ||g_ref||) of the parameter whose gradient is furthest off."""
    errs = {n: ((grads[n].float() - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref}
    name = max(errs, key=errs.get)
    return name, errs[name]


def compare(out: dict, key: str, step, ref_loss: float, ref_grads: dict) -> None:
    loss, grads = step[0], step[1]
    out[f"{key}.loss_err"] = abs(loss - ref_loss) / abs(ref_loss)
    out[f"{key}.grad_err"] = grad_error(grads, ref_grads)
    out[f"{key}.grad_norm_err"] = grad_norm_error(grads, ref_grads)
    out[f"{key}.worst_parameter"] = worst_parameter(grads, ref_grads)


def expert_param_groups(model) -> int:
    """How many of build_optimizer's param groups hold expert weights."""
    from ep_fp8.train.optim import build_optimizer

    experts = {id(p) for n, p in model.named_parameters() if ".experts." in n}
    groups = build_optimizer(model, 1e-3, (0.9, 0.95), 0.1, 1e-8).param_groups
    return sum(any(id(p) in experts for p in g["params"]) for g in groups)


def fsdp_cast_inputs(model) -> dict[str, bool]:
    """{module name: whether its FSDP2 unit casts its forward inputs} of every FSDP2 unit."""
    from torch.distributed.fsdp import FSDPModule

    return {n: m._get_fsdp_state()._mp_policy.cast_forward_inputs
            for n, m in model.named_modules() if isinstance(m, FSDPModule)}


def two_ranks(rank: int, world: int) -> dict:
    out: dict = {}
    ref_loss, ref_grads = reference(world)
    dims = ParallelDims(world, ep=2)

    base = parallel_step(rank, world, dims, count=True)
    compare(out, "ep2", base, ref_loss, ref_grads)
    out["none.a2a_fwd"], out["none.a2a_bwd"], out["none.mm_bwd"] = base[3]
    out["none.prefetch"] = forward_prefetch(base[2])
    out["none.cast_inputs"] = fsdp_cast_inputs(base[2])
    out["grad_scale"] = {m.grad_scale for m in base[2].modules() if hasattr(m, "grad_scale")}

    # A second parallelize_model on the same model is refused before it changes anything.
    forwards = [block.forward for block in base[2].layers]
    try:
        parallelize_model(base[2], ParallelDims(world, ep=1), ParallelDims(world, ep=1).build_mesh("cpu"),
                          ac_mode="full")
        out["again.error"] = ""
    except ValueError as e:
        out["again.error"] = str(e)
    out["again.unchanged"] = [block.forward for block in base[2].layers] == forwards

    for mode in ("full", "selective"):
        step = parallel_step(rank, world, dims, count=True, ac_mode=mode)
        out[f"{mode}.grad_vs_none"] = grad_error(step[1], base[1])
        out[f"{mode}.a2a_fwd"], out[f"{mode}.a2a_bwd"], out[f"{mode}.mm_bwd"] = step[3]
        out[f"{mode}.prefetch"] = forward_prefetch(step[2])

    torch._dynamo.reset()
    compiled = parallel_step(rank, world, dims, ac_mode="selective", compile="aot_eager")
    out["compile.graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out["compile.loss_vs_eager"] = abs(compiled[0] - base[0]) / abs(base[0])
    out["compile.grad_vs_eager"] = grad_error(compiled[1], base[1])

    fp8 = parallel_step(rank, world, dims, dispatch_payload="float8")
    out["float8.payloads"] = sorted({b.moe.dispatcher.payload for b in fp8[2].layers
                                     if b.moe is not None})
    out["float8.loss_vs_bf16"] = abs(fp8[0] - base[0]) / abs(base[0])
    # float8 rows straight into float8 experts (they reject anything but e4m3 data).
    fp8_experts = parallel_step(rank, world, dims, dispatch_payload="float8",
                                model_kwargs=dict(float8=True, float8_backend="emulated"))
    out["float8_experts.loss_vs_fp32"] = abs(fp8_experts[0] - base[0]) / abs(base[0])
    out["float8_experts.grad_vs_fp32"] = worst_parameter(fp8_experts[1], base[1])[1]

    # Built on the meta device, sharded, then materialised and initialised: the same
    # weights as an unsharded model with the same seed.
    with torch.device("meta"):
        meta_model = Transformer(ARGS)
    parallelize_model(meta_model, dims, dims.build_mesh("cpu"), param_dtype=torch.float32)
    meta_model.to_empty(device="cpu")
    meta_model.init_weights(SEED)
    plain = Transformer(ARGS)
    plain.init_weights(SEED)
    plain_params = dict(plain.named_parameters())
    out["meta_init.max_diff"] = max((full(p.data) - plain_params[n]).abs().max().item()
                                    for n, p in meta_model.named_parameters())
    out["meta_init.expert_placements"] = str(meta_model.layers[1].moe.experts.w13.placements)

    # bf16 compute, float32 gradient reduction: every FSDP2 unit (the experts' too) says so.
    from torch.distributed.fsdp import FSDPModule

    with torch.device("meta"):
        mixed = Transformer(ARGS)
    parallelize_model(mixed, dims, dims.build_mesh("cpu"), param_dtype=torch.bfloat16,
                      reduce_dtype=torch.float32)
    policies = [m._get_fsdp_state()._mp_policy for m in mixed.modules() if isinstance(m, FSDPModule)]
    out["mixed.units"] = len(policies)
    out["mixed.dtypes"] = sorted({f"{p.param_dtype} {p.reduce_dtype}" for p in policies})

    # A mesh of the right size but another layout would reduce over the wrong groups.
    try:
        parallelize_model(Transformer(ARGS), ParallelDims(world, ep=1), dims.build_mesh("cpu"))
        out["mesh_mismatch.error"] = ""
    except ValueError as e:
        out["mesh_mismatch.error"] = str(e)
    # The right names and shape, but not from build_mesh: no flattened "dp_shard" / "dp".
    from torch.distributed.device_mesh import init_device_mesh
    from ep_fp8.parallel.dims import MESH_DIMS
    bare = init_device_mesh("cpu", (1, 1, world), mesh_dim_names=MESH_DIMS)
    untouched = Transformer(ARGS)
    try:
        parallelize_model(untouched, ParallelDims(world, ep=world), bare)
        out["mesh_unflattened.error"] = ""
    except ValueError as e:
        out["mesh_unflattened.error"] = str(e)
    out["mesh_unflattened.model_untouched"] = not any(
        isinstance(p, DTensor) for p in untouched.parameters())
    # A 1-D mesh listing the ranks in another order than its group: rank 0 would keep
    # experts 2-3 and be sent the tokens of experts 0-1.
    from torch.distributed.device_mesh import DeviceMesh
    from ep_fp8.parallel.expert_parallel import apply_expert_parallel
    try:
        apply_expert_parallel(Transformer(ARGS), DeviceMesh("cpu", list(range(world))[::-1]))
        out["mesh_reversed.error"] = ""
    except ValueError as e:
        out["mesh_reversed.error"] = str(e)
    # group=None is the default group, as elsewhere in torch.distributed.
    from ep_fp8.moe import AllToAllDispatcher
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(rank))
    idx = torch.tensor([[0, 3], [1, 2], [3, 3], [2, 0], [1, 1], [0, 2]])
    default = AllToAllDispatcher(None, 4)
    rows, offs, state = default.dispatch(x, idx)
    back = default.combine(rows * 2, torch.full((6, 2), 0.5), state)
    out["group_none.combined_err"] = (back - 2 * x).abs().max().item()   # two picks of 0.5 * 2x
    return out


def ep2_efsdp2_only(rank: int, world: int) -> dict:
    """The ep2_efsdp2 layout alone, for a process group whose backend is not named "gloo"."""
    out: dict = {"backend": str(torch.distributed.get_backend())}
    compare(out, "ep2_efsdp2", parallel_step(rank, world, ParallelDims(world, ep=2)), *reference(world))
    return out


def four_ranks(rank: int, world: int) -> dict:
    out: dict = {}
    ref_loss, ref_grads = reference(world)
    # ep=2 with 2 ranks per expert shard (efsdp=2); HSDP (2 replicas x ep 2); ep=4.
    # With checkpointing, the experts' FSDP2 all-gather runs inside the recomputed region.
    for key, dims, ac_mode in (("ep2_efsdp2", ParallelDims(world, ep=2), "none"),
                               ("ep2_efsdp2_ac", ParallelDims(world, ep=2), "selective"),
                               ("hsdp2_ep2", ParallelDims(world, dp_replicate=2, ep=2), "none"),
                               ("hsdp2_ep2_ac", ParallelDims(world, dp_replicate=2, ep=2), "full"),
                               ("ep4", ParallelDims(world, ep=4), "none")):
        step = parallel_step(rank, world, dims, ac_mode=ac_mode)
        compare(out, key, step, ref_loss, ref_grads)
        out[f"{key}.prefetch"] = forward_prefetch(step[2])
        out[f"{key}.cast_inputs"] = fsdp_cast_inputs(step[2])
        out[f"{key}.expert_groups"] = expert_param_groups(step[2])
    # 2 experts over ep=2: one expert per EP rank cannot split over efsdp=2 ranks on dim 0,
    # so FSDP2 shards dim 1 instead.
    few = dataclasses.replace(ARGS, n_experts=2, top_k=1, route_norm=False)
    ref_few = reference(world, few)
    step = parallel_step(rank, world, ParallelDims(world, ep=2), few)
    compare(out, "shard1", step, *ref_few)
    out["shard1.placements"] = str(step[2].layers[1].moe.experts.w13.placements)
    # Only the second slice of this mesh lists its ranks out of order: rank 0's own slice
    # is fine, yet it must refuse too, or it would wait for ranks 2 and 3 forever.
    from torch.distributed.device_mesh import DeviceMesh
    from ep_fp8.parallel.expert_parallel import apply_expert_parallel
    mesh = DeviceMesh("cpu", [[0, 1], [3, 2]], mesh_dim_names=("dp", "ep"))["ep"]
    try:
        apply_expert_parallel(Transformer(ARGS), mesh)
        out["mesh_partly_reversed.error"] = ""
    except ValueError as e:
        out["mesh_partly_reversed.error"] = str(e)
    return out
