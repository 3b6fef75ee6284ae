"""GPU ranks (NCCL): the CUDA paths the gloo tests cannot reach. See test_gpu.py."""

from __future__ import annotations

import torch

from ep_fp8.parallel import ParallelDims
from tests.parallel._workers import compare, parallel_step, reference


def _exact_fp32() -> None:
    # TF32 would blur the comparison with the fp32 reference.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def gpu_ranks(rank: int, world: int) -> dict:
    """world = 1: FSDP2 over one GPU; world >= 2: EP = world over NCCL."""
    _exact_fp32()
    device = torch.device("cuda", rank)
    out: dict = {}
    ref_loss, ref_grads = reference(world, device=device)
    dims = ParallelDims(world, ep=world)

    base = parallel_step(rank, world, dims, device=device, count=True)
    compare(out, "fp32", base, ref_loss, ref_grads)
    out["none.a2a_bwd"] = base[3][1]
    for mode in ("full", "selective"):
        step = parallel_step(rank, world, dims, device=device, count=True, ac_mode=mode)
        out[f"{mode}.a2a_bwd"] = step[3][1]
        compare(out, f"{mode}_fp32", step, ref_loss, ref_grads)

    # The production path: bf16 parameters, selective AC, inductor per block.
    torch._dynamo.reset()
    bf16 = parallel_step(rank, world, dims, device=device, ac_mode="selective", compile=True,
                         param_dtype=torch.bfloat16)
    compare(out, "bf16_compiled", bf16, ref_loss, ref_grads)
    out["bf16_compiled.graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    # float8 experts on the CUDA backend, float8 payload when there is an all-to-all.
    fp8 = parallel_step(rank, world, dims, device=device, ac_mode="selective",
                        param_dtype=torch.bfloat16,
                        dispatch_payload="float8" if world > 1 else "bf16",
                        model_kwargs=dict(float8=True, float8_backend="cuda"))
    compare(out, "float8", fp8, ref_loss, ref_grads)
    return out
