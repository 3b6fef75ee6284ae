"""scripts/bench_dispatch.py: table, JSON and the local measurement on CPU (the timings
themselves are not checked; the expert-parallel part runs in test_all_to_all.py). What the
timed calls do is checked through a time_ms stand-in, the all-to-all path on a gloo group
of one rank."""

import json

import pytest
import torch
import torch.distributed as dist

from tests.moe.bench_script import load_bench_dispatch


@pytest.fixture(scope="module")
def bench():
    return load_bench_dispatch()


def test_record_ratio_is_time_over_baseline(bench):
    r = bench.record("local", "-", "fwd", 3.0, "index_select+index_add", 2.0, payload_bytes=10)
    assert r["ratio"] == 1.5 and r["payload_bytes"] == 10


def test_table_has_a_row_per_record(bench):
    records = [bench.record("all_to_all", p, ph, 1.2, "all_to_all_single", 1.0, payload_bytes=2e6)
               for p in ("bf16", "float8") for ph in ("fwd", "fwd_bwd")]
    lines = bench.format_table(records).splitlines()
    assert len(lines) == 2 + len(records)
    assert "1.20" in lines[2] and "float8" in lines[-1]


def test_single_process_run_writes_local_records(bench, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--tokens", "16", "--dim", "32", "--warmup", "0", "--iters", "1",
                       "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["env"]["world_size"] == 1 and data["config"]["tokens"] == 16
    assert [(r["path"], r["phase"]) for r in data["records"]] == [("local", "fwd"), ("local", "fwd_bwd")]
    assert "index_select+index_add" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "9", "--experts", "8"], "exceeds --experts"),
    (["--payloads", "bf16,int4"], "unknown payloads"),
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--dim", "0"], "--dim must be >= 1, got 0"),
    (["--tokens", "-5"], "--tokens must be >= 1, got -5"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--out", __file__ + "/dispatch.json"], f"{__file__!r} is a file, not a folder"),
])
def test_bad_options_exit_with_a_message(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def _grad_checking_timer(leaves, groups):
    """A time_ms stand-in: records the group, then runs fn three times, checking before each
    call that no gradient is left from the call before."""
    def time_ms(fn, device, warmup, iters, group=None):
        groups.append(group)
        for _ in range(3):
            for name, t in leaves.items():
                assert t.grad is None, f"{name}.grad left from the previous timed call"
            fn()
        return 1.0
    return time_ms


def _recording(dispatcher_cls, leaves, w_grads):
    """dispatcher_cls, recording the tokens x and routing weights w it is passed (leaves)
    and the gradients that reach w (w_grads)."""
    class Recording(dispatcher_cls):
        def dispatch(self, x, idx):
            leaves.setdefault("x", x)
            return super().dispatch(x, idx)

        def combine(self, y, w, state):
            if "w" not in leaves:
                leaves["w"] = w
                w.register_hook(w_grads.append)  # raises unless w requires grad
            return super().combine(y, w, state)
    return Recording


def test_a_payload_given_twice_is_measured_once(bench):
    assert bench.parse_args(["--payloads", "float8,bf16,float8"]).payloads == "float8,bf16"


def _small_inputs(bench, argv=()):
    args = bench.parse_args(["--quick", "--tokens", "16", "--dim", "32", *argv])
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    idx = bench.make_routing(16, args.top_k, args.experts, "skewed", torch.device("cpu"), 0)
    return args, x, idx


def test_local_fwd_bwd_clears_gradients_and_reaches_the_routing_weights(bench, monkeypatch):
    leaves, w_grads, groups = {}, [], []
    monkeypatch.setattr(bench, "time_ms", _grad_checking_timer(leaves, groups))
    monkeypatch.setattr(bench, "LocalDispatcher", _recording(bench.LocalDispatcher, leaves, w_grads))
    args, x, idx = _small_inputs(bench)
    records = bench.bench_local(x, idx, args, torch.device("cpu"))
    assert [r["phase"] for r in records] == ["fwd", "fwd_bwd"]
    assert set(leaves) == {"x", "w"} and leaves["x"].grad is None and leaves["w"].grad is None
    assert len(w_grads) == 3 and w_grads[0].shape == idx.shape  # once per timed fwd_bwd call


def test_local_times_are_maxed_over_the_ranks(bench, monkeypatch):
    groups, group = [], object()  # under torchrun: every rank times the local path at once
    monkeypatch.setattr(bench, "time_ms", _grad_checking_timer({}, groups))
    args, x, idx = _small_inputs(bench)
    bench.bench_local(x, idx, args, torch.device("cpu"), group)
    assert groups == [group] * 4  # dispatcher and baseline, fwd and fwd_bwd


@pytest.fixture
def gloo_world_of_one():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("payload", ["bf16", "float8"])
def test_all_to_all_fwd_bwd_clears_gradients_and_reaches_the_routing_weights(
        bench, monkeypatch, gloo_world_of_one, payload):
    leaves, w_grads, groups = {}, [], []
    monkeypatch.setattr(bench, "time_ms", _grad_checking_timer(leaves, groups))
    monkeypatch.setattr(bench, "AllToAllDispatcher", _recording(bench.AllToAllDispatcher, leaves, w_grads))
    args, x, idx = _small_inputs(bench)
    records = bench.bench_all_to_all(x, idx, args, torch.device("cpu"), gloo_world_of_one, payload)
    assert [r["phase"] for r in records] == ["fwd", "fwd_bwd"]
    assert set(leaves) == {"x", "w"} and len(w_grads) == 3 and w_grads[0].shape == idx.shape
    assert groups == [gloo_world_of_one] * 4
