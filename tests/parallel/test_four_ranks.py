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


def test_a_mesh_with_one_slice_out_of_order_is_refused_on_every_rank(results):
    assert "another rank's ep_mesh lists its ranks in another order" in results["mesh_partly_reversed.error"]


def test_one_expert_per_ep_rank_is_fsdp_sharded_on_dim_1(results):
    assert results["shard1.placements"] == "(Shard(dim=1), Shard(dim=0))"
