"""Activation checkpointing with inductor-compiled blocks: the compiled regions
(attention, norms, dense FFN, shared experts) are one opaque call each to the selective
policy, so "selective" runs them again in backward as "full" does (docs/parallelism.md:
saving them too measured more memory and no speed on the GPU); gradients agree in all
three modes. One process (gloo), inductor on the CPU."""

import pytest
import torch

from tests._dist import run_ranks
from tests.parallel import _workers

pytestmark = pytest.mark.slow

output_code = pytest.importorskip("torch._inductor.output_code")


def _count_compiled_region_runs(rank: int, world: int) -> dict:
    """Runs of inductor's compiled graphs in forward and in backward of a second step (the
    first compiles), per checkpoint mode, and the gradients against mode "none"."""
    runs = {"n": 0}

    def counted(fn):
        def run(*args, **kwargs):
            runs["n"] += 1
            return fn(*args, **kwargs)
        return run

    # Count the compiled graph's own callable before inductor's post_compile wraps it (as
    # one op that selective checkpointing can save), so that a replay from saved outputs
    # does not count.
    post_compile = output_code.CompiledFxGraph.post_compile

    def post_compile_counted(self, *args, **kwargs):
        if self.current_callable is not None and not getattr(self.current_callable, "counted", False):
            self.current_callable = counted(self.current_callable)
            self.current_callable.counted = True
        return post_compile(self, *args, **kwargs)

    output_code.CompiledFxGraph.post_compile = post_compile_counted
    out, grads = {}, {}
    for mode in ("none", "selective", "full"):
        torch._dynamo.reset()
        dims = _workers.ParallelDims(world, ep=1)
        _, _, model, _ = _workers.parallel_step(rank, world, dims, ac_mode=mode, compile=True)
        model.zero_grad()
        tokens = _workers.global_tokens(world)[:_workers.B_LOCAL]
        runs["n"] = 0
        loss = _workers.loss_of(model, tokens)
        out[f"{mode}.fwd"], runs["n"] = runs["n"], 0
        loss.backward()
        out[f"{mode}.bwd"] = runs["n"]
        grads[mode] = {n: _workers.full(p.grad).clone() for n, p in model.named_parameters()}
    for mode in ("selective", "full"):
        out[f"{mode}.grad_vs_none"] = _workers.grad_error(grads[mode], grads["none"])
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_count_compiled_region_runs, 1, timeout=600)[0]


def test_selective_and_full_run_compiled_regions_again_in_backward(results):
    assert results["none.fwd"] > 0
    assert results["selective.fwd"] == results["full.fwd"] == results["none.fwd"]
    # In backward, "none" runs only the compiled backward graphs; both checkpointing modes
    # run every compiled forward graph once more.
    assert results["selective.bwd"] == results["full.bwd"] == results["none.bwd"] + results["none.fwd"], results


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_compiled_checkpointing_gives_the_same_gradients(results, mode):
    assert results[f"{mode}.grad_vs_none"] < 1e-6
