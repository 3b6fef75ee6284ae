"""EP=2 on 2 gloo ranks: against a single-process model, activation checkpointing,
torch.compile, the float8 payload and meta-device init (one process group for all)."""

import pytest

from tests.parallel import _workers
from tests._dist import run_ranks

pytestmark = pytest.mark.slow

# fp32 on CPU: the parallel step sums the same terms in another order (per-rank losses,
# reduce-scatter), so it differs from the single process by rounding only.
FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def results():
    per_rank = run_ranks(_workers.two_ranks, 2)
    return per_rank[0]


def test_ep2_loss_and_grads_match_single_process(results):
    assert results["ep2.loss_err"] < FP32_TOL
    assert results["ep2.grad_err"] < FP32_TOL


def test_a_model_cannot_be_parallelized_twice(results):
    assert "already passed to parallelize_model" in results["again.error"]
    assert results["again.unchanged"]  # refused before activation checkpointing wrapped a block


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(results, mode):
    # Recomputation replays the same ops on the same inputs: identical up to rounding.
    assert results[f"{mode}.grad_vs_none"] < 1e-6


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_never_repeats_an_all_to_all(results, mode):
    assert results["none.a2a_bwd"] > 0  # the backward of dispatch and combine
    assert results[f"{mode}.a2a_fwd"] == results["none.a2a_fwd"]
    assert results[f"{mode}.a2a_bwd"] == results["none.a2a_bwd"]


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_each_block_prefetches_the_next(results, mode):
    # ep = 2 on 2 ranks: every expert on one rank, so the experts are no FSDP2 unit to
    # prefetch (four ranks with efsdp = 2: tests/parallel/test_four_ranks.py).
    n = _workers.ARGS.n_layers
    assert results[f"{mode}.prefetch"] == [[f"layers.{i}"] for i in range(1, n)] + [[]]


def test_experts_alone_on_their_ranks_are_outside_fsdp2_and_scale_their_gradients(results):
    # FSDP2 would only copy them; their gradients are divided by the world size instead
    # of by FSDP2 (the gradients themselves are checked against the single process above).
    assert not any(name.endswith(".moe.experts") for name in results["none.cast_inputs"])
    assert {"", "layers.0", "layers.1"} <= set(results["none.cast_inputs"])
    assert results["grad_scale"] == {0.5}


def test_full_checkpointing_recomputes_matmuls_and_selective_saves_them(results):
    assert results["full.mm_bwd"] > results["none.mm_bwd"]
    assert results["selective.mm_bwd"] == results["none.mm_bwd"]


def test_compiled_blocks_run_and_match_eager(results):
    assert results["compile.graphs"] > 0
    assert results["compile.loss_vs_eager"] < FP32_TOL
    assert results["compile.grad_vs_eager"] < FP32_TOL


def test_float8_dispatch_payload_is_wired_and_close_to_bf16(results):
    assert results["float8.payloads"] == ["float8"]
    # e4m3 rows (3 mantissa bits) feed tiny-init experts: the loss moves by far less than
    # 1%; an unscaled or garbled payload moves it by much more.
    assert results["float8.loss_vs_bf16"] < 1e-3


def test_float8_payload_reaches_float8_experts_uncast(results):
    # The experts' FSDP2 unit must not cast x_fp8 (float8 data, float32 scales) to the
    # parameter dtype: float8 experts raise on anything but e4m3 data. Errors stay at the
    # float8 level: e4m3 rounds each operand by up to 2^-4 relative; measured ~7% in the
    # worst parameter's gradient norm, a broken path gives O(1).
    assert results["float8_experts.loss_vs_fp32"] < 1e-3
    assert results["float8_experts.grad_vs_fp32"] < 0.15


def test_meta_device_model_initialised_after_sharding_equals_unsharded_init(results):
    assert results["meta_init.max_diff"] == 0.0
    assert "Shard(dim=0)" in results["meta_init.expert_placements"]


def test_mixed_precision_reaches_every_fsdp_unit_the_experts_included(results):
    # Per block: the experts and the block; then the embedding, norm + head, the root.
    blocks = _workers.ARGS.n_layers
    assert results["mixed.units"] >= blocks + (blocks - _workers.ARGS.n_dense_layers)
    assert results["mixed.dtypes"] == ["torch.bfloat16 torch.float32"]


def test_a_mesh_of_another_layout_or_without_the_flattened_dims_is_rejected(results):
    assert "mesh has shape (1, 1, 2)" in results["mesh_mismatch.error"]
    assert "parallel.ep = 1" in results["mesh_mismatch.error"]
    assert "mesh lacks the flattened 'dp_shard' and 'dp' dims" in results["mesh_unflattened.error"]
    assert results["mesh_unflattened.model_untouched"]
    assert "ep_mesh lists ranks [1, 0], its process group [0, 1]" in results["mesh_reversed.error"]


def test_a_dispatcher_over_the_default_group_round_trips(results):
    assert results["group_none.combined_err"] < 1e-6
