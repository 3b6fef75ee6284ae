"""CUDA + NCCL: FSDP2 on one GPU, EP=2 on two, bf16 + compile + AC, float8 experts.

Skipped without CUDA. Run on the GPU machine with `pytest tests/parallel/test_gpu.py`.
"""

import pytest
import torch

from tests.parallel import _gpu_workers
from tests._dist import run_ranks

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FP32_TOL = 1e-4     # fp32 on the GPU, TF32 off: reduction order only
BF16_LOSS_TOL = 2e-2  # bf16 weights and activations vs the fp32 reference
BF16_GRAD_TOL = 0.05  # ||g - g_ref|| / ||g_ref|| over all parameters: bf16 rounds by 2^-9
FP8_GRAD_TOL = 0.15   # the same for e4m3 expert matmuls, which round by up to 2^-4


def _results(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    return run_ranks(_gpu_workers.gpu_ranks, world, backend="nccl", timeout=400)[0]


@pytest.fixture(scope="module", params=[1, 2], ids=["1gpu", "2gpu_ep2"])
def results(request):
    return _results(request.param)


def test_fp32_loss_and_grads_match_single_process(results):
    assert results["fp32.loss_err"] < FP32_TOL
    assert results["fp32.grad_err"] < FP32_TOL
    for mode in ("full", "selective"):
        assert results[f"{mode}_fp32.grad_err"] < FP32_TOL


def test_activation_checkpointing_never_repeats_an_all_to_all(results):
    for mode in ("full", "selective"):
        assert results[f"{mode}.a2a_bwd"] == results["none.a2a_bwd"]


def test_bf16_compiled_checkpointed_step_tracks_fp32(results):
    assert results["bf16_compiled.graphs"] > 0
    assert results["bf16_compiled.loss_err"] < BF16_LOSS_TOL
    assert results["bf16_compiled.grad_norm_err"] < BF16_GRAD_TOL, results["bf16_compiled.worst_parameter"]


def test_float8_experts_step_tracks_fp32(results):
    # e4m3 expert matmuls on top of bf16: the loss stays within a few percent.
    assert results["float8.loss_err"] < 5e-2
    assert results["float8.grad_norm_err"] < FP8_GRAD_TOL, results["float8.worst_parameter"]
