"""Behaviours of ep_fp8.parallel that need real ranks exchanging data, on 2 spawned gloo
ranks (one process group for all):

- first_problem / first_difference agree over 2 ranks too (not only over 3 or more);
- apply_expert_parallel keeps, on each rank, its own slice of the weights it holds
  (rank r: experts [r E/ep, (r+1) E/ep)), without taking rank 0's.
"""

import dataclasses

import pytest
import torch

from ep_fp8.model import PRESETS, Transformer
from tests._dist import run_ranks

pytestmark = pytest.mark.slow

ARGS = dataclasses.replace(PRESETS["debug"], dim=16, n_layers=2, vocab_size=32)


def _two_ranks(rank: int, world: int) -> dict:
    from ep_fp8.parallel import ParallelDims, submesh
    from ep_fp8.parallel.agree import first_difference, first_problem
    from ep_fp8.parallel.expert_parallel import apply_expert_parallel, moe_layers

    out: dict = {}
    out["first_problem"] = first_problem({0: "", 1: "rank 1: bad"}[rank])
    out["first_difference"] = first_difference({0: "a", 1: "b"}[rank])

    # Each rank initialises its model from another seed: what it keeps must be its own.
    model = Transformer(ARGS)
    model.init_weights(100 + rank)
    before = [{n: p.detach().clone() for n, p in m.experts.named_parameters()}
              for m in moe_layers(model)]
    apply_expert_parallel(model, submesh(ParallelDims(world, ep=world).build_mesh("cpu"), "ep"))
    per = ARGS.n_experts // world
    out["own_slice"] = [all(torch.equal(p.to_local(), full[n][rank * per:(rank + 1) * per])
                            for n, p in m.experts.named_parameters())
                        for m, full in zip(moe_layers(model), before)]
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_two_ranks, 2, timeout=120)


def test_two_ranks_agree_on_the_first_problem_and_the_first_difference(results):
    assert [r["first_problem"] for r in results] == ["rank 1: bad"] * 2
    assert [r["first_difference"] for r in results] == ["rank 1: b; rank 0: a"] * 2


def test_each_ep_rank_keeps_its_own_slice_of_its_own_weights(results):
    for rank, r in enumerate(results):
        assert r["own_slice"] and all(r["own_slice"]), rank
