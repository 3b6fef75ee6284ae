"""Corners of ep_fp8.parallel that the layout tests do not reach: degree and argument
checks, the checkpoint policy's op lists, the expert placement rule, which submodules are
compiled, and (on one spawned gloo rank, one process group for all) the FSDP2 units,
mesh views and apply_expert_parallel's own checks."""

import dataclasses
import warnings

import pytest
import torch
from torch.distributed.tensor import Shard
from torch.utils.checkpoint import CheckpointPolicy

from ep_fp8.model import PRESETS, Transformer
from ep_fp8.moe import GroupedExperts
from ep_fp8.parallel import ParallelDims, parallelize_model
from ep_fp8.parallel.checkpointing import (
    CheckpointedForward,
    ac_policy,
    apply_activation_checkpointing,
)
from ep_fp8.parallel.parallelize import _expert_placement, apply_compile
from tests._dist import run_ranks

TINY = dataclasses.replace(PRESETS["debug"], dim=16, n_layers=2, vocab_size=32)


# ---- in-process -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, key", [
    (dict(world_size=2, ep=True), TypeError, "parallel.ep must be int, got bool"),
    (dict(world_size=2, dp_replicate=True), TypeError, "parallel.dp_replicate must be int"),
    (dict(world_size=0), ValueError, "world_size must be >= 1"),
    (dict(world_size=2.0), TypeError, "world_size must be int"),
])
def test_dims_reject_bools_and_a_bad_world_size(kwargs, error, key):
    """A bool is not a degree, and world_size is checked like the degrees."""
    with pytest.raises(error, match=key):
        ParallelDims(**kwargs)


def test_apply_activation_checkpointing_validates_mode_and_passes_keyword_arguments():
    """apply_activation_checkpointing validates `mode` itself (not only parallelize_model),
    wraps nothing on error or for "none", and a checkpointed block still takes its input
    by keyword."""
    model = Transformer(TINY)
    with pytest.raises(ValueError, match="activation_checkpoint.mode"):
        apply_activation_checkpointing(model.layers, "Full")
    apply_activation_checkpointing(model.layers, "none")
    assert not any("forward" in block.__dict__ for block in model.layers)
    x = torch.randn(1, 4, TINY.dim, generator=torch.Generator().manual_seed(0))
    plain = model.layers[0](x)
    apply_activation_checkpointing(model.layers, "selective")
    assert all(isinstance(block.__dict__["forward"], CheckpointedForward) for block in model.layers)
    torch.testing.assert_close(model.layers[0](x_BSD=x), plain, rtol=0, atol=0)
    fresh = Transformer(TINY)   # a checkpointed later block: the error comes before any wrap
    apply_activation_checkpointing(fresh.layers[1:], "full")
    with pytest.raises(ValueError, match="block 1 is already activation-checkpointed"):
        apply_activation_checkpointing(fresh.layers, "selective")
    assert "forward" not in fresh.layers[0].__dict__


def test_policy_saves_every_listed_matmul_and_c10d_all_to_all():
    """The docstring's op lists: addmm / bmm / baddbmm / scaled matmuls are saved under
    "selective" only; c10d (non-functional) all-to-alls are saved in both modes."""
    aten = torch.ops.aten
    matmuls = [getattr(aten, name).default for name in (
        "addmm", "bmm", "baddbmm", "_scaled_mm", "_scaled_grouped_mm") if hasattr(aten, name)]
    assert len(matmuls) >= 3
    for op in matmuls:
        assert ac_policy(None, op, save_matmuls=True) == CheckpointPolicy.MUST_SAVE, op
        assert ac_policy(None, op, save_matmuls=False) == CheckpointPolicy.PREFER_RECOMPUTE, op
    compiled_region = getattr(torch._higher_order_ops, "inductor_compiled_code", None)
    if compiled_region is not None:   # saved under "selective" where inductor emits it
        assert ac_policy(None, compiled_region, save_matmuls=True) == CheckpointPolicy.MUST_SAVE
        assert ac_policy(None, compiled_region, save_matmuls=False) == \
            CheckpointPolicy.PREFER_RECOMPUTE
    a2a = [torch.ops.c10d.alltoall_.default, torch.ops.c10d.alltoall_base_.default,
           torch.ops._c10d_functional_autograd.all_to_all_single.default]
    for op in a2a:
        for save_matmuls in (False, True):
            assert ac_policy(None, op, save_matmuls=save_matmuls) == CheckpointPolicy.MUST_SAVE, op


def test_empty_compile_backend_name_is_a_type_error():
    """compile="" is neither a bool nor a backend name: TypeError, like compile=3."""
    with pytest.raises(TypeError, match="compile must be a bool or a backend name"):
        parallelize_model(Transformer(TINY), ParallelDims(world_size=2), None, compile="")


def test_expert_placement_uses_shard_1_only_when_every_weight_splits_on_dim_1():
    """One local expert over efsdp=2 ranks: Shard(1) when dim 1 of w13 (2 H) and of w2 (D)
    split evenly; FSDP2's padded Shard(0) (None) as soon as one does not; None when experts
    split evenly."""
    dims = ParallelDims(world_size=4, ep=2)       # efsdp = 2
    assert _expert_placement(GroupedExperts(16, 32, 4), dims) is None      # 2 local experts
    place = _expert_placement(GroupedExperts(16, 32, 2), dims)             # 1 local expert
    assert place is not None and place(None) == Shard(1)
    assert _expert_placement(GroupedExperts(16, 33, 2), dims)(None) == Shard(1)  # 2 H = 66
    assert _expert_placement(GroupedExperts(16, 33, 2), ParallelDims(world_size=8, ep=2)) is None
    assert _expert_placement(GroupedExperts(17, 32, 2), dims) is None      # w2 dim 1 = D odd


def test_apply_compile_compiles_everything_but_the_router_dispatcher_and_experts():
    """Attention, norms, dense FFN and shared experts are compiled; the MoE module, its
    router and its grouped experts stay eager."""
    model = Transformer(TINY)
    apply_compile(model, "eager")
    compiled = {name for name, m in model.named_modules()
                if getattr(m, "_compiled_call_impl", None) is not None}
    moe_block = next(i for i, b in enumerate(model.layers) if b.moe is not None)
    dense_block = next(i for i, b in enumerate(model.layers) if b.moe is None)
    assert model.layers[moe_block].moe.shared_experts is not None
    assert f"layers.{moe_block}.moe.shared_experts" in compiled
    assert {f"layers.{moe_block}.attention", f"layers.{moe_block}.attention_norm",
            f"layers.{dense_block}.feed_forward"} <= compiled
    assert not {f"layers.{moe_block}.moe", f"layers.{moe_block}.moe.router",
                f"layers.{moe_block}.moe.experts"} & compiled


# ---- one spawned gloo rank --------------------------------------------------------------

def _one_rank(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from ep_fp8.moe import AllToAllDispatcher
    from ep_fp8.parallel import dense_mesh, expert_mesh, submesh
    from ep_fp8.parallel import parallelize as parallelize_module
    from ep_fp8.parallel.expert_parallel import apply_expert_parallel, moe_layers
    from tests.parallel._workers import ARGS, forward_prefetch

    out: dict = {}
    dims = ParallelDims(world)
    mesh = dims.build_mesh("cpu")

    def error(fn, *args, **kwargs) -> str:
        try:
            fn(*args, **kwargs)
        except Exception as e:   # noqa: BLE001 - the tests assert on the type and message
            return f"{type(e).__name__}: {e}"
        return ""

    # The flattened dims are sliced without torch's deprecation warning.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        submesh(mesh, "dp_shard"), submesh(mesh, "dp")
        out["dense_mesh"] = dense_mesh(mesh, dims).mesh_dim_names
        out["expert_mesh"] = expert_mesh(mesh, dims).mesh_dim_names
    out["warnings"] = [str(w.message) for w in caught]
    out["build_mesh_wrong_world"] = error(ParallelDims(world + 1).build_mesh, "cpu")

    # One rank without FSDP2, ep = 1: no expert parallelism at all.
    with torch.device("meta"):
        plain = Transformer(ARGS)
    out["no_fsdp.error"] = error(parallelize_model, plain, dims, mesh, fsdp=False)
    moes = [b.moe for b in plain.layers if b.moe is not None]
    out["no_fsdp.dispatchers"] = sorted({type(m.dispatcher).__name__ for m in moes})
    out["no_fsdp.dtensors"] = sum(isinstance(p, DTensor) for p in plain.parameters())

    # FSDP2 units: the embedding is one; [norm, output] stays unsharded after forward.
    with torch.device("meta"):
        sharded = Transformer(ARGS)
    parallelize_model(sharded, dims, mesh)
    out["fsdp.embedding_unit"] = isinstance(sharded.tok_embeddings, FSDPModule)
    out["fsdp.head_reshards"] = sharded.norm._get_fsdp_state()._fsdp_param_group._reshard_after_forward
    out["fsdp.block_reshards"] = sharded.layers[0]._get_fsdp_state()._fsdp_param_group._reshard_after_forward
    out["fsdp.prefetch"] = forward_prefetch(sharded)
    out["fsdp.cast_inputs"] = {n: m._get_fsdp_state()._mp_policy.cast_forward_inputs
                               for n, m in sharded.named_modules() if isinstance(m, FSDPModule)}

    # The right shape and flattened dims, but not build_mesh's dim names.
    misnamed = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("dp_replicate", "ep", "efsdp"))
    misnamed["ep", "efsdp"]._flatten("dp_shard")
    misnamed["dp_replicate", "ep", "efsdp"]._flatten("dp")
    with torch.device("meta"):
        out["misnamed_mesh"] = error(parallelize_model, Transformer(ARGS), dims, misnamed)

    # compile=<name> reaches apply_compile as that backend, compile=True as inductor.
    backends = []
    real = parallelize_module.apply_compile
    parallelize_module.apply_compile = lambda model, backend: backends.append(backend)
    try:
        for compile in ("aot_eager", True):
            with torch.device("meta"):
                error(parallelize_model, Transformer(ARGS), dims, mesh, compile=compile)
    finally:
        parallelize_module.apply_compile = real
    out["compile.backends"] = backends

    # apply_expert_parallel's own checks, on the 1-rank "ep" mesh.
    ep_mesh = submesh(mesh, "ep")
    with torch.device("meta"):
        model = Transformer(ARGS, exact_scales=True)
    experts = [m.experts for m in moe_layers(model)]
    out["ep.bad_payload"] = error(apply_expert_parallel, model, ep_mesh, "fp4")
    out["ep.two_d_mesh"] = error(apply_expert_parallel, model, submesh(mesh, ("efsdp", "ep")))
    out["ep.untouched"] = not any(isinstance(p, DTensor) for p in model.parameters())
    experts[0].w2.requires_grad_(False)   # a frozen expert weight stays frozen
    out["ep.apply"] = error(apply_expert_parallel, model, ep_mesh, "float8")
    out["ep.requires_grad"] = [{n: p.requires_grad for n, p in e.named_parameters()}
                               for e in experts]
    dispatchers = [m.dispatcher for m in moe_layers(model)]
    out["ep.dispatchers"] = [(type(d) is AllToAllDispatcher, getattr(d, "payload", None),
                              getattr(d, "exact_scales", None)) for d in dispatchers]
    out["ep.again"] = error(apply_expert_parallel, model, ep_mesh)

    # A problem found in a later layer leaves the earlier ones as they were.
    with torch.device("meta"):
        model = Transformer(ARGS)
    *first, last = moe_layers(model)
    last.experts.w2 = torch.nn.Parameter(DTensor.from_local(last.experts.w2.data, ep_mesh, [Shard(0)]))
    out["ep.late"] = error(apply_expert_parallel, model, ep_mesh)
    out["ep.late.untouched"] = bool(first) and not any(
        isinstance(p, DTensor) or isinstance(m.dispatcher, AllToAllDispatcher)
        for m in first for p in m.experts.parameters())
    out["dtensor.parallelize"] = error(parallelize_model, model, dims, mesh)
    out["dtensor.untouched"] = not hasattr(model, "_ep_fp8_parallelized") and not any(
        isinstance(m, FSDPModule) for m in model.modules())

    model = Transformer(ARGS)
    apply_activation_checkpointing(model.layers[1:2], "full")
    out["ac.late"] = error(parallelize_model, model, dims, mesh, ac_mode="selective")
    out["ac.late.untouched"] = "forward" not in model.layers[0].__dict__ and not any(
        isinstance(m, FSDPModule) for m in model.modules())
    out["ac.late.retry"] = error(parallelize_model, model, dims, mesh, ac_mode="none")
    return out


@pytest.fixture(scope="module")
def one_rank():
    return run_ranks(_one_rank, 1, timeout=120)[0]


def test_flattened_dims_are_sliced_without_warnings_and_meshes_are_1d(one_rank):
    """submesh hides torch's flattened-dim warning; without replicas the FSDP2 meshes are
    the 1-D "dp_shard" and "efsdp" views."""
    assert one_rank["warnings"] == []
    assert one_rank["dense_mesh"] == ("dp_shard",)
    assert one_rank["expert_mesh"] == ("efsdp",)


def test_build_mesh_refuses_a_world_size_other_than_the_process_groups(one_rank):
    """world_size 2 in a 1-rank process group: ValueError naming both sizes."""
    assert one_rank["build_mesh_wrong_world"].startswith("ValueError: world_size (2) does not match")


def test_one_rank_without_fsdp_keeps_the_model_unsharded(one_rank):
    """fsdp=False is allowed with world_size 1, and ep = 1 adds no all-to-all dispatcher
    and no DTensor."""
    assert one_rank["no_fsdp.error"] == ""
    assert one_rank["no_fsdp.dispatchers"] and \
        "AllToAllDispatcher" not in one_rank["no_fsdp.dispatchers"]
    assert one_rank["no_fsdp.dtensors"] == 0


def test_embedding_is_its_own_unit_and_the_head_stays_unsharded_after_forward(one_rank):
    """The FSDP2 units apply_fsdp promises: tok_embeddings alone, [norm, output] with
    reshard_after_forward=False, blocks resharded as usual."""
    assert one_rank["fsdp.embedding_unit"]
    assert one_rank["fsdp.head_reshards"] is False
    assert one_rank["fsdp.block_reshards"] is True


def test_on_one_rank_the_experts_are_no_fsdp2_unit_and_the_others_cast_their_inputs(one_rank):
    """One rank: the experts stay outside FSDP2 (it would only copy them); blocks,
    embedding, head and root cast their inputs to param_dtype."""
    cast = one_rank["fsdp.cast_inputs"]
    assert not any(n.endswith(".moe.experts") for n in cast)
    assert {"", "tok_embeddings", "layers.0", "layers.1"} <= set(cast)
    assert all(cast.values())


def test_no_explicit_forward_prefetch_without_expert_parallelism(one_rank):
    """Explicit prefetch is only set up for ep > 1 (dispatch's host reads); with ep = 1
    every block keeps FSDP2's default schedule."""
    assert one_rank["fsdp.prefetch"] and all(units == [] for units in one_rank["fsdp.prefetch"])


def test_a_mesh_with_other_dim_names_is_rejected(one_rank):
    """Right shape and flattened dims, but not named (dp_replicate, efsdp, ep)."""
    assert one_rank["misnamed_mesh"].startswith(
        "ValueError: mesh must come from ParallelDims.build_mesh")


def test_compile_argument_selects_the_backend(one_rank):
    """A backend name is passed through; True means inductor."""
    assert one_rank["compile.backends"] == ["aot_eager", "inductor"]


def test_apply_expert_parallel_checks_and_what_it_carries_over(one_rank):
    """Bad payload and 2-D mesh raise ValueError before any weight changes; the dispatcher
    gets the payload and the experts' exact_scales; requires_grad survives sharding; a
    second call is refused."""
    assert one_rank["ep.bad_payload"].startswith("ValueError: dispatch_payload must be one of")
    assert one_rank["ep.two_d_mesh"] == "ValueError: ep_mesh must be 1-D, got 2 dimensions"
    assert one_rank["ep.untouched"]
    assert one_rank["ep.apply"] == ""
    first, *rest = one_rank["ep.requires_grad"]
    assert first == {"w13": True, "w2": False}
    assert rest and all(r == {"w13": True, "w2": True} for r in rest)
    assert one_rank["ep.dispatchers"] and \
        set(one_rank["ep.dispatchers"]) == {(True, "float8", True)}
    assert "already a DTensor" in one_rank["ep.again"]


def test_a_problem_in_a_later_layer_is_found_before_any_layer_changes(one_rank):
    """An expert weight of the last MoE layer already a DTensor, or the second block
    already checkpointed: the error names it, and the earlier layers, the FSDP2 units and
    the parallelized flag are untouched, so a corrected call still succeeds."""
    assert one_rank["ep.late"].startswith("ValueError: expert weight w2 of MoE layer")
    assert one_rank["ep.late.untouched"]
    assert "parameter layers." in one_rank["dtensor.parallelize"] and \
        "already a DTensor" in one_rank["dtensor.parallelize"]
    assert one_rank["dtensor.untouched"]
    assert one_rank["ac.late"] == "ValueError: block 1 is already activation-checkpointed"
    assert one_rank["ac.late.untouched"]
    assert one_rank["ac.late.retry"] == ""
