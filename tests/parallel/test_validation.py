"""Parallel degrees and arguments are checked before anything changes; the activation
checkpoint policy saves what it promises. In-process, no process group needed."""

import dataclasses

import pytest
import torch
from torch.utils.checkpoint import CheckpointPolicy

from ep_fp8.model import PRESETS, Transformer
from ep_fp8.parallel import AC_MODES, ParallelDims, parallelize_model
from ep_fp8.parallel.checkpointing import ac_policy, apply_activation_checkpointing


def test_dims_derive_dp_shard_and_efsdp():
    dims = ParallelDims(world_size=16, dp_replicate=2, ep=4)
    assert (dims.dp_shard, dims.efsdp) == (8, 2)


@pytest.mark.parametrize("kwargs, key", [
    (dict(world_size=4, ep=3), "parallel.ep"),
    (dict(world_size=8, dp_replicate=2, ep=8), "parallel.ep"),
    (dict(world_size=6, dp_replicate=4), "parallel.dp_replicate"),
    (dict(world_size=4, ep=0), "parallel.ep"),
])
def test_dims_that_do_not_divide_raise_value_error_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ParallelDims(**kwargs)


def test_non_int_degree_raises_type_error():
    with pytest.raises(TypeError, match="parallel.ep"):
        ParallelDims(world_size=4, ep=2.0)


def test_build_mesh_without_process_group_raises():
    with pytest.raises(ValueError, match="init_process_group"):
        ParallelDims(world_size=2).build_mesh("cpu")


@pytest.fixture(scope="module")
def model():
    return Transformer(PRESETS["debug"])


@pytest.mark.parametrize("kwargs, error, key", [
    (dict(ac_mode="some"), ValueError, "activation_checkpoint.mode"),
    (dict(dispatch_payload="fp4"), ValueError, "dispatch_payload"),
    (dict(compile=3), TypeError, "compile must be a bool or a backend name"),
    (dict(compile="inductr"), ValueError, "compile: 'inductr' is not a torch.compile backend"),
    (dict(param_dtype="bfloat16"), TypeError, "param_dtype must be a floating-point torch.dtype"),
    (dict(param_dtype=torch.float16), TypeError, "param_dtype must be torch.bfloat16 or torch.float32"),
    (dict(reduce_dtype=torch.int32), TypeError, "reduce_dtype must be a floating-point torch.dtype"),
    (dict(fsdp=False), ValueError, "fsdp=False"),
])
def test_bad_arguments_raise_naming_the_key(model, kwargs, error, key):
    with pytest.raises(error, match=key):
        parallelize_model(model, ParallelDims(world_size=2), None, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_a_reduce_dtype_fsdp2_divides_twice_is_rejected_with_expert_parallelism(model, dtype):
    # FSDP2 divides such gradients before and after the reduction, and once more for
    # experts with one rank per shard: they came out ep times too small.
    with pytest.raises(ValueError, match="reduce_dtype must be torch.float32 or torch.bfloat16 with parallel.ep > 1"):
        parallelize_model(model, ParallelDims(world_size=2, ep=2), None, reduce_dtype=dtype)


def test_ep_not_dividing_n_experts_raises_naming_parallel_ep():
    model = Transformer(dataclasses.replace(PRESETS["debug"], n_experts=6))
    with pytest.raises(ValueError, match="parallel.ep"):
        parallelize_model(model, ParallelDims(world_size=4, ep=4), None)


def test_a_mesh_not_from_build_mesh_is_rejected(model):
    with pytest.raises(ValueError, match="build_mesh"):
        parallelize_model(model, ParallelDims(world_size=2), None)


def test_policy_saves_all_to_all_in_every_mode_and_matmuls_only_when_selective():
    a2a = torch.ops._c10d_functional.all_to_all_single.default
    wait = torch.ops._c10d_functional.wait_tensor.default
    for save_matmuls in (False, True):
        assert ac_policy(None, a2a, save_matmuls=save_matmuls) == CheckpointPolicy.MUST_SAVE
        assert ac_policy(None, wait, save_matmuls=save_matmuls) == CheckpointPolicy.MUST_SAVE
    # Every attention kernel this build has (the CPU one included), with the matmuls.
    attention = [getattr(torch.ops.aten, name).default for name in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
        if hasattr(torch.ops.aten, name)]
    assert attention
    for op in [torch.ops.aten.mm.default, torch.ops.aten._grouped_mm.default] + attention:
        assert ac_policy(None, op, save_matmuls=True) == CheckpointPolicy.MUST_SAVE, op
        assert ac_policy(None, op, save_matmuls=False) == CheckpointPolicy.PREFER_RECOMPUTE, op
    assert ac_policy(None, torch.ops.aten.mul.Tensor, save_matmuls=True) == \
        CheckpointPolicy.PREFER_RECOMPUTE


def test_policy_saves_the_ep_fp8_custom_ops_when_selective_only():
    import ep_fp8.ops  # noqa: F401  registers the ops

    ops = [getattr(torch.ops.ep_fp8, name).default for name in dir(torch.ops.ep_fp8)
           if not name.startswith("_") and hasattr(getattr(torch.ops.ep_fp8, name), "default")]
    assert ops, "ep_fp8 registers custom ops"
    for op in ops:
        assert ac_policy(None, op, save_matmuls=True) == CheckpointPolicy.MUST_SAVE
        assert ac_policy(None, op, save_matmuls=False) == CheckpointPolicy.PREFER_RECOMPUTE


@pytest.mark.parametrize("mode", [m for m in AC_MODES if m != "none"])
def test_checkpointing_keeps_parameter_names_and_gradients(mode):
    args = dataclasses.replace(PRESETS["debug"], dim=16, n_layers=2, vocab_size=32)
    tokens = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(0))
    plain, checkpointed = Transformer(args), Transformer(args)
    apply_activation_checkpointing(checkpointed.layers, mode)
    assert [n for n, _ in plain.named_parameters()] == \
        [n for n, _ in checkpointed.named_parameters()]
    for m in (plain, checkpointed):
        m(tokens).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="already"):
        apply_activation_checkpointing(checkpointed.layers, mode)


@pytest.mark.parametrize("backend", ["emulated", "bf16"])
@pytest.mark.parametrize("mode", [m for m in AC_MODES if m != "none"])
def test_checkpointing_float8_experts_gives_the_same_gradients(mode, backend):
    # The experts' GEMM results are what selective checkpointing saves: the op must not
    # change them in place afterwards (the recompute refuses a mutated saved tensor).
    args = dataclasses.replace(PRESETS["debug"], dim=16, n_layers=2, vocab_size=32)
    tokens = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    plain = Transformer(args, float8=True, float8_backend=backend)
    checkpointed = Transformer(args, float8=True, float8_backend=backend)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed.layers, mode)
    for m in (plain, checkpointed):
        m(tokens).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-7, msg=name)
