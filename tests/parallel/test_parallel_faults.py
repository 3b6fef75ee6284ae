"""Behaviours of ep_fp8.parallel that the layout tests reach only through their numbers,
checked here in one process (a "fake" process group of 8 ranks stands in for a job, so
meshes and FSDP2 units of real layouts are built without spawning ranks):

- the mesh layout: ep groups are blocks of consecutive ranks, efsdp groups stride over
  them within a replica, and the flattened "dp_shard" / "dp" views are one replica / all
  ranks, for several (dp_replicate, ep);
- ParallelDims' error messages give the degree and the sizes they refer to, and
  build_mesh refuses a process group larger than world_size;
- the FSDP2 units parallelize_model builds per layout: the experts' mesh, gradient divide
  factor and sum-then-divide switch (gloo), experts left outside FSDP2 only when alone on
  their ranks (with grad_scale 1 / world size, and no unit holding their weights), the
  expert placements on the "ep" mesh (Shard(1) for one local expert), the dispatcher's
  group, explicit prefetch, which units cast their inputs, that every unit
  computes in param_dtype and reduces in reduce_dtype, and that [norm, output] is one
  unit, the only one kept unsharded after forward;
- parallelize_model refuses a mesh of another layout or without the flattened "dp"
  dim, a second call, and (on every rank)
  an ep mesh whose order another rank found wrong;
- parallelize_model's dims must be a ParallelDims (TypeError otherwise); without expert
  parallelism any floating-point reduce_dtype is accepted;
- apply_compile hands its backend to torch.compile for every submodule it compiles;
- the expert placement rule counts local experts per EP rank (ep and efsdp differ);
- apply_expert_parallel refuses, before changing any layer, an ep that does not divide
  n_experts, a mesh whose ranks are in another order than its group's (on every rank,
  when any rank finds it), and names the MoE layer already sharded;
- activation checkpointing: "full" recomputes matmuls in backward, "selective" does not,
  and applying it puts the profiler annotation ops on torch's SAC ignore list.
"""

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.utils.checkpoint as torch_checkpoint
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard
from torch.utils._python_dispatch import TorchDispatchMode

from ep_fp8.model import PRESETS, Transformer
from ep_fp8.moe import GroupedExperts
from ep_fp8.parallel import ParallelDims, parallelize_model, submesh
from ep_fp8.parallel.checkpointing import apply_activation_checkpointing
from ep_fp8.parallel.expert_parallel import apply_expert_parallel, moe_layers
from ep_fp8.parallel.parallelize import _expert_placement, experts_alone_on_their_ranks
from tests.parallel._workers import forward_prefetch

WORLD = 8
ARGS = dataclasses.replace(PRESETS["debug"], max_seq_len=32)   # 4 layers, 1 dense, 8 experts
TINY = dataclasses.replace(PRESETS["debug"], dim=16, n_layers=2, vocab_size=32)


@pytest.fixture(scope="module")
def fake_world():
    """A default process group of WORLD ranks in this process (this is rank 0): collectives
    do nothing, but meshes, groups and FSDP2 units are built as in a real job."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    try:
        yield WORLD
    finally:
        dist.destroy_process_group()


def _ranks(mesh) -> list[int]:
    return dist.get_process_group_ranks(mesh.get_group())


# ---- the mesh ---------------------------------------------------------------------------

@pytest.mark.parametrize("dp_replicate, ep", [(1, 2), (1, 4), (2, 2), (2, 4), (1, 8), (4, 1)])
def test_mesh_layout_and_rank_0s_groups(fake_world, dp_replicate, ep):
    """Shape (R, dp_shard / ep, ep) over consecutive ranks; rank 0's ep group is ranks
    0..ep-1, its efsdp group every ep-th rank of its replica, dp_shard its replica, dp all,
    dp_replicate one rank per replica."""
    dims = ParallelDims(WORLD, dp_replicate=dp_replicate, ep=ep)
    mesh = dims.build_mesh("cpu")
    shard = WORLD // dp_replicate
    assert mesh.mesh_dim_names == ("dp_replicate", "efsdp", "ep")
    assert mesh.mesh.tolist() == torch.arange(WORLD).reshape(dp_replicate, shard // ep, ep).tolist()
    assert _ranks(submesh(mesh, "ep")) == list(range(ep))
    assert _ranks(submesh(mesh, "efsdp")) == list(range(0, shard, ep))
    assert _ranks(submesh(mesh, "dp_shard")) == list(range(shard))
    assert _ranks(submesh(mesh, "dp")) == list(range(WORLD))
    assert _ranks(submesh(mesh, "dp_replicate")) == list(range(0, WORLD, shard))


def test_build_mesh_refuses_a_process_group_larger_than_world_size(fake_world):
    with pytest.raises(ValueError, match=r"world_size \(4\) does not match the process "
                                         r"group's size \(8\)"):
        ParallelDims(4).build_mesh("cpu")


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=6, dp_replicate=4),
     "parallel.dp_replicate (4) must divide the world size (6)"),
    (dict(world_size=12, dp_replicate=2, ep=4),
     "parallel.ep (4) must divide the world size (12) / parallel.dp_replicate (2) = 6"),
])
def test_degree_errors_give_the_degree_and_the_sizes(kwargs, message):
    with pytest.raises(ValueError) as info:
        ParallelDims(**kwargs)
    assert str(info.value) == message


# ---- FSDP2 units per layout -------------------------------------------------------------

def _parallelized(dims: ParallelDims, **kwargs) -> Transformer:
    with torch.device("meta"):
        model = Transformer(ARGS)
    kwargs.setdefault("param_dtype", torch.float32)
    return parallelize_model(model, dims, dims.build_mesh("cpu"), **kwargs)


def _units(model) -> dict:
    """name -> (mesh dim names, gradient divide factor, force sum reduction) per FSDP2 unit
    that holds parameters."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                out[name] = (group.mesh_info.mesh.mesh_dim_names, group.gradient_divide_factor,
                             group.force_sum_reduction_for_comms)
    return out


MOE_BLOCKS = [f"layers.{i}" for i in range(ARGS.n_dense_layers, ARGS.n_layers)]


@pytest.mark.parametrize("dp_replicate, ep, expert_dims, force_sum", [
    (1, 2, ("efsdp",), True),                         # efsdp 4: gloo sums, then divides
    (2, 2, ("dp_replicate", "efsdp"), True),          # HSDP, efsdp 2
    (2, 4, ("dp_replicate", "efsdp"), False),         # HSDP, efsdp 1: no reduce-scatter
    (1, 1, ("efsdp",), False),                        # no EP: FSDP2's own average
])
def test_experts_unit_mesh_divide_factor_and_reduction(fake_world, dp_replicate, ep,
                                                       expert_dims, force_sum):
    """Experts shared by several ranks are their own FSDP2 unit over efsdp (x dp_replicate);
    with ep > 1 it divides by the world size, and on gloo sums then divides where a
    reduce-scatter runs (efsdp > 1). Dense units use dp_shard (x dp_replicate)."""
    dims = ParallelDims(WORLD, dp_replicate=dp_replicate, ep=ep)
    assert not experts_alone_on_their_ranks(dims)
    model = _parallelized(dims)
    units = _units(model)
    dense_dims = ("dp_replicate", "dp_shard") if dp_replicate > 1 else ("dp_shard",)
    for block in MOE_BLOCKS:
        mesh_dims, factor, summed = units[f"{block}.moe.experts"]
        assert mesh_dims == expert_dims
        assert factor == (float(WORLD) if ep > 1 else None)
        assert summed is force_sum
        assert units[block][0] == dense_dims
    assert units["tok_embeddings"][0] == dense_dims
    assert all(b.moe.experts.grad_scale == 1.0 for b in model.layers if b.moe is not None)
    # Each block prefetches the next and (no checkpointing) its experts, with ep > 1 only.
    expected = [[f"layers.{i}", f"layers.{i}.moe.experts"] for i in range(1, ARGS.n_layers)] + [[]]
    assert forward_prefetch(model) == (expected if ep > 1 else [[]] * ARGS.n_layers)


def test_a_dense_next_block_is_prefetched_without_experts(fake_world):
    """Two dense blocks first: block 0 names only block 1 (it has no experts), block 1
    names block 2 and its experts."""
    dims = ParallelDims(WORLD, ep=2)
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(ARGS, n_dense_layers=2))
    parallelize_model(model, dims, dims.build_mesh("cpu"), param_dtype=torch.float32)
    assert forward_prefetch(model) == [["layers.1"], ["layers.2", "layers.2.moe.experts"],
                                ["layers.3", "layers.3.moe.experts"], []]


def test_experts_alone_on_their_ranks_stay_outside_every_fsdp2_unit(fake_world):
    """ep = world size: no unit holds the experts (they stay DTensors on the 1-D "ep" mesh),
    their gradients are scaled by 1 / world size, and blocks prefetch only the next block."""
    dims = ParallelDims(WORLD, ep=WORLD)
    assert experts_alone_on_their_ranks(dims)
    model = _parallelized(dims)
    units = _units(model)
    assert not any(name.endswith(".moe.experts") for name in units)
    for moe in moe_layers(model):
        assert moe.experts.grad_scale == 1.0 / WORLD
        for name, param in moe.experts.named_parameters():
            assert isinstance(param, DTensor), name
            assert param.device_mesh.mesh_dim_names == ("ep",), name
            assert param.placements == (Shard(0),), name
        assert _ranks(submesh(dims.build_mesh("cpu"), "ep")) == \
            dist.get_process_group_ranks(moe.dispatcher.group)
    assert forward_prefetch(model) == [[f"layers.{i}"] for i in range(1, ARGS.n_layers)] + [[]]


@pytest.mark.parametrize("dp_replicate, ep, alone", [
    (1, 1, False), (1, 8, True), (2, 4, False), (2, 2, False), (8, 1, False)])
def test_experts_are_alone_only_without_replicas_and_efsdp_1(dp_replicate, ep, alone):
    """With replicas an expert has copies on other ranks even when efsdp is 1."""
    assert experts_alone_on_their_ranks(ParallelDims(WORLD, dp_replicate=dp_replicate, ep=ep)) \
        is alone


def test_with_ep_the_dispatcher_uses_the_ep_group_and_experts_shard_dim_0_on_ep(fake_world):
    """HSDP 2 x EP 2 x efsdp 2: the all-to-all runs over rank 0's ep group (0, 1), not over
    all ranks; expert weights are split on the expert dim over "ep", then FSDP2'd; with
    activation checkpointing blocks prefetch only the next block."""
    dims = ParallelDims(WORLD, dp_replicate=2, ep=2)
    model = _parallelized(dims, ac_mode="full")
    for moe in moe_layers(model):
        assert dist.get_process_group_ranks(moe.dispatcher.group) == [0, 1]
        w13 = moe.experts.w13
        assert w13.device_mesh.mesh_dim_names == ("dp_replicate", "efsdp", "ep")
        assert w13.placements[-1] == Shard(0) and w13.shape == (ARGS.n_experts,) + w13.shape[1:]
    assert forward_prefetch(model) == [[f"layers.{i}"] for i in range(1, ARGS.n_layers)] + [[]]


def test_only_the_experts_unit_leaves_its_inputs_uncast_and_one_expert_per_rank_shards_dim_1(
        fake_world):
    """ep 4 over 4 experts, efsdp 2: one local expert, split on dim 1 by FSDP2 (then on the
    expert dim over "ep"); the experts' unit does not cast its inputs (a float8 payload
    reaches them as it is), every other unit does."""
    dims = ParallelDims(WORLD, ep=4)
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(ARGS, n_experts=4))
    parallelize_model(model, dims, dims.build_mesh("cpu"), param_dtype=torch.float32)
    for moe in moe_layers(model):
        assert moe.experts.w13.placements == (Shard(1), Shard(0))
    cast = {n: m._get_fsdp_state()._mp_policy.cast_forward_inputs
            for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    experts = {n for n in cast if n.endswith(".moe.experts")}
    assert len(experts) == ARGS.n_layers - ARGS.n_dense_layers
    assert not any(cast[n] for n in experts)
    assert all(cast[n] for n in set(cast) - experts)


def test_every_unit_computes_in_param_dtype_and_reduces_in_reduce_dtype(fake_world):
    """bf16 compute with float32 gradient reduction reaches every FSDP2 unit, experts too."""
    dims = ParallelDims(WORLD, ep=2)
    model = _parallelized(dims, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    policies = {n: m._get_fsdp_state()._mp_policy for n, m in model.named_modules()
                if isinstance(m, FSDPModule)}
    assert any(n.endswith(".moe.experts") for n in policies) and "layers.0" in policies
    assert {(p.param_dtype, p.reduce_dtype) for p in policies.values()} == \
        {(torch.bfloat16, torch.float32)}


def test_norm_and_output_are_one_unit_and_the_only_one_kept_unsharded_after_forward(fake_world):
    """[norm, output] is one FSDP2 unit (one all-gather) that stays unsharded after forward
    (backward starts with it); every other unit holding parameters, the embedding's and
    the experts' included, reshards after forward."""
    model = _parallelized(ParallelDims(WORLD, ep=2))
    head = model.norm._get_fsdp_state()
    assert model.output._get_fsdp_state() is head
    assert {id(p.sharded_param) for p in head._fsdp_param_group.fsdp_params} == \
        {id(model.norm.weight), id(model.output.weight)}
    reshards = {n: m._get_fsdp_state()._fsdp_param_group._reshard_after_forward
                for n, m in model.named_modules()
                if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_group is not None}
    assert {"tok_embeddings", "layers.0", f"{MOE_BLOCKS[0]}.moe.experts"} <= set(reshards)
    assert {n for n, r in reshards.items() if not r} == {"norm", "output"}


def test_without_expert_parallelism_any_floating_reduce_dtype_is_accepted(fake_world):
    """The float32 / bfloat16 restriction is for ep > 1 only (FSDP2's own average is right
    without expert parallelism): ep = 1 reduces in float16 as asked."""
    model = _parallelized(ParallelDims(WORLD, ep=1), reduce_dtype=torch.float16)
    reduce = {m._get_fsdp_state()._mp_policy.reduce_dtype for m in model.modules()
              if isinstance(m, FSDPModule)}
    assert reduce == {torch.float16}


def test_a_mesh_of_another_layout_and_a_second_call_are_refused(fake_world):
    """A mesh built for ep 4 does not serve dims with ep 2 (gradients would be reduced over
    the wrong groups); a parallelized model cannot be parallelized again."""
    dims = ParallelDims(WORLD, ep=2)
    with torch.device("meta"):
        model = Transformer(ARGS)
    with pytest.raises(ValueError, match=r"mesh has shape \(1, 2, 4\) .* need \(1, 4, 2\)"):
        parallelize_model(model, dims, ParallelDims(WORLD, ep=4).build_mesh("cpu"))
    parallelize_model(model, dims, dims.build_mesh("cpu"), param_dtype=torch.float32)
    with pytest.raises(ValueError, match="already passed to parallelize_model"):
        parallelize_model(model, dims, dims.build_mesh("cpu"), param_dtype=torch.float32)


def test_a_mesh_lacking_the_flattened_dp_dim_is_refused(fake_world):
    """build_mesh adds both "dp_shard" and "dp" (all ranks); a mesh with only the first is
    not one of its meshes."""
    from torch.distributed.device_mesh import init_device_mesh

    from ep_fp8.parallel.dims import MESH_DIMS

    dims = ParallelDims(WORLD, ep=2)
    mesh = init_device_mesh("cpu", (1, 4, 2), mesh_dim_names=MESH_DIMS)
    mesh["efsdp", "ep"]._flatten("dp_shard")
    with torch.device("meta"):
        model = Transformer(ARGS)
    with pytest.raises(ValueError, match="mesh lacks the flattened 'dp_shard' and 'dp' dims"):
        parallelize_model(model, dims, mesh)


def test_parallelize_model_makes_the_ranks_agree_on_the_ep_mesh_order(fake_world, monkeypatch):
    """With ep = 2 parallelize_model runs the collective rank-order check: another rank's
    failure stops this rank too, before the model changes."""
    from ep_fp8.parallel import expert_parallel

    monkeypatch.setattr(expert_parallel, "first_problem", lambda own: "rank 3: reversed")
    dims = ParallelDims(WORLD, ep=2)
    with torch.device("meta"):
        model = Transformer(ARGS)
    with pytest.raises(ValueError, match="another rank's ep_mesh lists its ranks"):
        parallelize_model(model, dims, dims.build_mesh("cpu"), param_dtype=torch.float32)
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    assert not any(isinstance(m, FSDPModule) for m in model.modules())


def test_expert_placement_counts_local_experts_per_ep_rank():
    """ep 4, efsdp 2 (8 ranks): 4 experts leave one per EP rank, which does not split over
    2 efsdp ranks (Shard(1)); 8 experts leave two, which do (None: FSDP2's Shard(0))."""
    dims = ParallelDims(WORLD, ep=4)
    assert dims.efsdp == 2
    place = _expert_placement(GroupedExperts(16, 32, 4), dims)
    assert place is not None and place(None) == Shard(1)
    assert _expert_placement(GroupedExperts(16, 32, 8), dims) is None


# ---- apply_expert_parallel's checks -----------------------------------------------------

def test_ep_not_dividing_n_experts_is_refused_before_any_layer_changes(fake_world):
    dims = ParallelDims(WORLD, dp_replicate=2, ep=4)
    ep_mesh = submesh(dims.build_mesh("cpu"), "ep")
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(ARGS, n_experts=6))
    with pytest.raises(ValueError, match=r"parallel.ep \(4\) must divide model.n_experts \(6\)"):
        apply_expert_parallel(model, ep_mesh)
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    assert not any(type(m.dispatcher).__name__ == "AllToAllDispatcher" for m in moe_layers(model))


def test_an_already_sharded_layer_is_named_by_its_moe_index(fake_world):
    ep_mesh = submesh(ParallelDims(WORLD, ep=2).build_mesh("cpu"), "ep")
    with torch.device("meta"):
        model = Transformer(ARGS)
    layers = moe_layers(model)
    last = layers[-1].experts
    last.w13 = torch.nn.Parameter(DTensor.from_local(last.w13.data, ep_mesh, [Shard(0)]))
    with pytest.raises(ValueError, match=f"expert weight w13 of MoE layer {len(layers) - 1} is"):
        apply_expert_parallel(model, ep_mesh)


def test_a_mesh_listing_its_ranks_in_another_order_than_its_group_is_refused(fake_world):
    """Rank 0's ep mesh lists [1, 0] over the group {0, 1}: rank 0 would keep rank 1's
    experts. Refused in its own words, before any layer changes."""
    from torch.distributed.device_mesh import DeviceMesh

    reversed_mesh = DeviceMesh("cpu", torch.tensor([1, 0]), mesh_dim_names=("ep",))
    with torch.device("meta"):
        model = Transformer(ARGS)
    with pytest.raises(ValueError, match=r"ep_mesh lists ranks \[1, 0\], its process group \[0, 1\]"):
        apply_expert_parallel(model, reversed_mesh)
    assert not any(isinstance(p, DTensor) for p in model.parameters())


def test_a_rank_whose_own_mesh_is_fine_still_raises_when_another_ranks_is_not(fake_world,
                                                                              monkeypatch):
    """The ranks agree (first_problem) on the rank-order check: rank 0 raises too when
    another rank found a problem, instead of going on alone into the first all-to-all."""
    from ep_fp8.parallel import expert_parallel

    seen = []

    def another_rank_failed(own: str) -> str:
        seen.append(own)
        return "ep_mesh lists ranks [3, 2], its process group [2, 3]: ..."

    monkeypatch.setattr(expert_parallel, "first_problem", another_rank_failed)
    ep_mesh = submesh(ParallelDims(WORLD, ep=2).build_mesh("cpu"), "ep")
    with torch.device("meta"):
        model = Transformer(ARGS)
    with pytest.raises(ValueError, match="another rank's ep_mesh lists its ranks in another order"):
        apply_expert_parallel(model, ep_mesh)
    assert seen == [""]
    assert not any(isinstance(p, DTensor) for p in model.parameters())


# ---- activation checkpointing -----------------------------------------------------------

class _CountMatmuls(TorchDispatchMode):
    OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in self.OPS
        return func(*args, **(kwargs or {}))


def test_full_recomputes_matmuls_in_backward_and_selective_keeps_them():
    tokens = torch.randint(0, TINY.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    counts = {}
    for mode in ("none", "full", "selective"):
        model = Transformer(TINY)
        apply_activation_checkpointing(model.layers, mode)
        loss = model(tokens).square().mean()
        with _CountMatmuls() as count:
            loss.backward()
        counts[mode] = count.n
    assert counts["none"] > 0
    assert counts["full"] > counts["none"], counts
    assert counts["selective"] == counts["none"], counts


def test_applying_checkpointing_lets_profiler_annotations_pass_selective_checkpointing():
    ignored = torch_checkpoint.SAC_IGNORED_OPS
    annotations = {getattr(torch.ops.profiler, name).default for name in (
        "_record_function_enter_new", "_record_function_exit")}
    saved = set(ignored)
    ignored.difference_update(annotations)
    try:
        apply_activation_checkpointing(Transformer(TINY).layers, "none")
        assert not annotations & ignored   # "none" checkpoints nothing
        apply_activation_checkpointing(Transformer(TINY).layers, "selective")
        assert annotations <= ignored
    finally:
        ignored.clear()
        ignored.update(saved)


def test_apply_compile_compiles_with_the_backend_it_is_given():
    """The backend reaches torch.compile (not its default, inductor) for every compiled
    submodule, the shared experts and the rest of a block alike: each hands its graph to
    it."""
    from ep_fp8.parallel.parallelize import apply_compile
    from tests.ops._helpers import graph_recorder

    recording, graphs = graph_recorder()
    torch._dynamo.reset()
    model = Transformer(TINY)
    apply_compile(model, recording)
    dense_block, moe_block = model.layers[0], model.layers[1]
    x = torch.randn(1, 8, TINY.dim, generator=torch.Generator().manual_seed(0))
    try:
        for module in (dense_block.attention_norm, dense_block.feed_forward,
                       moe_block.moe.shared_experts):
            before = len(graphs)
            module(x)
            assert len(graphs) > before, module
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dims", [None, {"world_size": 2, "ep": 2}])
def test_dims_other_than_parallel_dims_are_a_type_error(dims):
    with pytest.raises(TypeError, match="dims must be ParallelDims, got"):
        parallelize_model(Transformer(TINY), dims, None)
