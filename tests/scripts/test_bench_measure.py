"""scripts/bench_grouped_mm.py's measurement (prepare, time_once, build_forward) on CPU:
triton's do_bench, the CUDA memory counters, torchao and the backend choice are faked, so
what is checked is what the script hands them, not any time."""
import sys
import types

import pytest
import torch

import ep_fp8.ops

SHAPE, SIZES = (64, 2, 32, 16), [16, 48]  # (M, G, K, N), uneven groups


def cpu_inputs(shape=SHAPE, sizes=SIZES):
    """make_inputs' tensors, on CPU: x (M, K), w (G, N, K) bf16 requiring grad, offs, grad_out."""
    M, G, K, N = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(G, N, K, generator=gen) * K**-0.5).bfloat16().requires_grad_()
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    return x, w, offs, torch.randn(M, N, generator=gen).bfloat16()


def fake_torchao(calls):
    """A stand-in for torchao's grouped mm that checks the weight layout it is handed."""
    def fn(A, B_t, offs, out_dtype=None, pad_token_groups_for_grouped_mm=True):
        G, K, N = B_t.shape
        # The experts' (G, N, K) weight seen as (G, K, N): column-major, not a copy.
        assert B_t.stride() == (N * K, 1, K), B_t.stride()
        assert out_dtype == torch.bfloat16 and pad_token_groups_for_grouped_mm is False
        calls.append(B_t)
        return torch._grouped_mm(A, B_t, offs=offs)
    return fn


@pytest.fixture
def cuda_log(monkeypatch):
    """The CUDA calls prepare makes, faked on CPU; the peak-memory ones append to the log
    that is returned ('reset', 'peak'); the peak read is 1 GiB above the base (0)."""
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: log.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: log.append("peak") or 2**30)
    # backend="cuda" cannot run here: the ep_fp8 method runs the emulated path instead.
    real = ep_fp8.ops.scaled_grouped_mm
    monkeypatch.setattr(ep_fp8.ops, "scaled_grouped_mm", lambda *a, backend, **k: real(
        *a, backend="emulated" if backend == "cuda" else backend, **k))
    return log


def prepared(bench, method, inputs, torchao_calls):
    ref = bench.reference_output(inputs[0].detach(), inputs[1].detach().transpose(-2, -1), inputs[2])
    torchao = (fake_torchao(torchao_calls), "fake torchao")
    return bench.prepare(method, SHAPE, "uneven", SIZES, inputs, ref, torchao)


@pytest.mark.parametrize("method", ["bf16", "ep_fp8", "ep_fp8_auto", "torchao"])
def test_every_timed_forward_backward_starts_without_gradients(bench, cuda_log, monkeypatch, method):
    x, w, offs, grad_out = inputs = cpu_inputs()
    timed = []

    def do_bench(fn, warmup, rep, grad_to_none=None, return_mode="mean"):
        for _ in range(3):  # as triton's timed runs: the listed tensors' .grad cleared before each
            for t in grad_to_none or ():
                t.grad = None
            assert x.grad is None and w.grad is None, "gradients left from the previous call"
            fn()
        timed.append(fn)
        return 1.0

    monkeypatch.setitem(sys.modules, "triton.testing", types.SimpleNamespace(do_bench=do_bench))
    state = prepared(bench, method, inputs, [])
    assert state["rec"]["status"] == "ok", state["rec"]
    bench.time_once(state, inputs, 1.0, 1.0)
    bench.time_once(state, inputs, 1.0, 1.0)
    rec = state["rec"]
    assert rec["status"] == "ok", rec
    assert timed == [state["fwd"], state["step"]] * 2
    assert rec["fwd_ms_rounds"] == rec["fwd_bwd_ms_rounds"] == [1.0, 1.0]
    assert x.grad is None and w.grad is None  # and none left for the next method


@pytest.mark.parametrize("method", ["bf16", "ep_fp8_auto"])
def test_peak_memory_is_read_after_the_backward(bench, cuda_log, method):
    x, w, _, _ = inputs = cpu_inputs()
    x.register_hook(lambda g: cuda_log.append("grad x"))
    w.register_hook(lambda g: cuda_log.append("grad w"))
    rec = prepared(bench, method, inputs, [])["rec"]
    assert rec["status"] == "ok", rec
    start = len(cuda_log) - 1 - cuda_log[::-1].index("reset")
    end = cuda_log.index("peak", start)
    assert {"grad x", "grad w"} <= set(cuda_log[start:end]), cuda_log  # both gradients counted
    assert rec["peak_mem_gib"] == 1.0


def test_torchao_gets_the_weight_as_its_column_major_transpose(bench):
    x, w, offs, _ = cpu_inputs()
    calls = []
    forward, has_backward, _ = bench.build_forward("torchao", x, w, offs, fake_torchao(calls), "")
    y = forward()
    assert has_backward and len(calls) == 1 and calls[0].data_ptr() == w.data_ptr()
    torch.testing.assert_close(y, torch._grouped_mm(x, w.transpose(-2, -1), offs=offs))


def test_auto_note_passes_the_group_count_as_the_op_does(bench, monkeypatch):
    seen = []

    def resolve_backend(backend, device, K, N, M=None, G=None):  # G >= 1024: not the cuda kernels
        seen.append((backend, K, N, M, G))
        return "emulated" if G is not None and G >= 1024 else "cuda"

    monkeypatch.setattr(ep_fp8.ops, "resolve_backend", resolve_backend)
    x, w = torch.zeros(32, 16), torch.zeros(1024, 48, 16)  # G = 1024, N = 48, K = 16
    _, _, note = bench.build_forward("ep_fp8_auto", x, w, torch.zeros(1024, dtype=torch.int32), None, "")
    assert note == "auto picked emulated" and seen == [("auto", 16, 48, 32, 1024)]
