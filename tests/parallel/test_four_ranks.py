"""4 gloo ranks: EP=2 with FSDP2 inside each expert shard, HSDP (both also with activation
checkpointing), EP=4 and the Shard(1) expert placement, each against a single-process
model (one process group for all)."""

import pytest

from tests.parallel import _workers
from tests._dist import run_ranks

pytestmark = pytest.mark.slow

FP32_TOL = 1e-5  # see test_two_ranks.py


@pytest.fixture(scope="module")
def results():
    return run_ranks(_workers.four_ranks, 4)[0]


@pytest.mark.parametrize("layout", ["ep2_efsdp2", "ep2_efsdp2_ac", "hsdp2_ep2", "hsdp2_ep2_ac",
                                    "ep4", "shard1"])
def test_loss_and_grads_match_single_process(results, layout):
    assert results[f"{layout}.loss_err"] < FP32_TOL
    assert results[f"{layout}.grad_err"] < FP32_TOL


@pytest.mark.parametrize("backend", ["cpu:gloo", None])
def test_expert_gradients_reduce_on_gloo_whatever_the_backend_is_called(backend):
    # "cpu:gloo" and init_process_group() without a backend ("undefined") are gloo on the
    # CPU too; FSDP2's PREMUL_SUM, which gloo lacks, must not be chosen for them.
    out = run_ranks(_workers.ep2_efsdp2_only, 4, backend=backend)[0]
    assert out["backend"] == (backend or "undefined")
    assert out["ep2_efsdp2.loss_err"] < FP32_TOL and out["ep2_efsdp2.grad_err"] < FP32_TOL


@pytest.mark.parametrize("layout", ["ep2_efsdp2", "ep2_efsdp2_ac"])
def test_each_block_prefetches_the_next_and_its_experts_only_without_checkpointing(results, layout):
    # A checkpointed block's recompute must issue the ops its forward did: the experts'
    # all-gather stays inside it, so only the next block is named there.
    n, dense = _workers.ARGS.n_layers, _workers.ARGS.n_dense_layers
    expected = [[f"layers.{i}"] + ([f"layers.{i}.moe.experts"] if layout == "ep2_efsdp2" and i >= dense else [])
                for i in range(1, n)]
    assert results[f"{layout}.prefetch"] == expected + [[]]


@pytest.mark.parametrize("layout", ["ep2_efsdp2", "hsdp2_ep2", "ep4"])
def test_the_expert_weights_share_one_optimizer_group(results, layout):
    # Same mesh and placements for w13 and w2, whether or not FSDP2 gave them one mesh object.
    assert results[f"{layout}.expert_groups"] == 1


def test_only_the_experts_unit_leaves_its_forward_inputs_uncast(results):
    """Experts sharded by FSDP2 (efsdp = 2): blocks, embedding, head and root cast their
    inputs to param_dtype; the experts' unit does not (a float8 payload must reach them as
    it is)."""
    cast = results["ep2_efsdp2.cast_inputs"]
    experts = {n for n in cast if n.endswith(".moe.experts")}
    assert experts and all(cast[n] is False for n in experts)
    others = set(cast) - experts
    assert {"", "tok_embeddings", "layers.0", "layers.1"} <= others
    assert all(cast[n] is True for n in others)


def test_a_mesh_with_one_slice_out_of_order_is_refused_on_every_rank(results):
    assert "another rank's ep_mesh lists its ranks in another order" in results["mesh_partly_reversed.error"]


def test_one_expert_per_ep_rank_is_fsdp_sharded_on_dim_1(results):
    assert results["shard1.placements"] == "(Shard(dim=1), Shard(dim=0))"
