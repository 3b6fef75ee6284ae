"""scripts/bench_experts.py without a GPU: the two layouts it compares compute the same
function, its table's ratio, and the options it refuses before any work."""
import re

import pytest
import torch

from ep_fp8.moe import GroupedExperts
from tests.scripts.conftest import load_script


@pytest.fixture
def bench():
    return load_script("bench_experts")


@pytest.mark.parametrize("float8", [False, True])
def test_the_separate_layout_is_the_stacked_experts_arithmetic(bench, float8):
    # Forward values bit for bit (the weight's scales are per output row either way), and
    # the gradients of w1 and w3 those of w13's halves up to rounding (float32 GEMMs; with
    # float8, grad_out's rows are scaled over both halves: e4m3's error, 2^-4 relative).
    gen = torch.Generator().manual_seed(0)
    experts = GroupedExperts(32, 48, 4, float8=float8, float8_backend="emulated")
    w1, w3 = (w.detach().clone().requires_grad_() for w in experts.w13.chunk(2, dim=1))
    x = torch.randn(64, 32, generator=gen, dtype=torch.bfloat16)
    offs = torch.tensor([16, 16, 48, 64], dtype=torch.int32)
    grad = torch.randn(64, 32, generator=gen, dtype=torch.bfloat16)
    stacked = experts(x, offs)
    separate = bench.separate_forward(experts, w1, w3, x, offs)
    assert torch.equal(stacked, separate)
    stacked.backward(grad)
    separate.backward(grad)
    tol = dict(rtol=0.1, atol=0.1 * w1.grad.abs().max().item()) if float8 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(torch.cat([w1.grad, w3.grad], dim=1), experts.w13.grad, **tol)


def test_the_table_gives_each_layout_against_the_separate_one(bench):
    records = [{"float8": f8, "layout": layout, "fwd_bwd_ms": ms, "spread": 0.01, "peak_gib": 1.0}
               for f8, layout, ms in ((False, "stacked", 8.0), (False, "separate", 10.0),
                                      (True, "stacked", 4.0), (True, "separate", 6.0))]
    rows = [line.split() for line in bench.format_table(records).splitlines()[2:]]
    assert [(r[0], r[1], r[-1]) for r in rows] == [("bf16", "stacked", "1.250"), ("bf16", "separate", "1.000"),
                                                   ("float8", "stacked", "1.500"), ("float8", "separate", "1.000")]


@pytest.mark.parametrize("args, message", [
    (["--rows", "0"], "--rows must be at least 1"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--dim", "2040"], "multiples of 16"),
    (["--hidden", "100"], "multiples of 16"),
    (["--rows", "100"], "--rows 100 over --experts 16"),
    (["--rows", "16", "--experts", "2"], "at least 16\\*G"),
    (["--out", "results/"], "ends with a '/'"),
])
def test_bad_options_are_refused_before_any_work(bench, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(args)
    assert e.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_without_cuda_it_says_so(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--rows", "256"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
