"""GroupedExperts: bf16 path against a float64 per-expert loop; float8 path; bad input."""

import pytest
import torch
import torch.nn.functional as F

import ep_fp8.ops
from ep_fp8.moe import GroupedExperts

HAS_FP8_OPS = hasattr(ep_fp8.ops, "scaled_grouped_mm") and hasattr(ep_fp8.ops, "quantize_rows")
needs_fp8_ops = pytest.mark.skipif(not HAS_FP8_OPS, reason="ep_fp8.ops.scaled_grouped_mm not available")

D, H, E = 16, 32, 4


def _experts(float8=False, seed=0, **kw):
    torch.manual_seed(seed)
    return GroupedExperts(D, H, E, float8=float8, **kw)


def _grouped_input(gen, dtype=torch.float32):
    offs = torch.tensor([16, 16, 48, 64], dtype=torch.int32)  # expert 1 has no rows
    x = torch.randn(64, D, generator=gen, dtype=dtype)
    return x, offs


def _reference(experts, x, offs):
    """float64 per-expert SwiGLU loop, w1 and w3 the halves of w13's rows; also returns
    float64 leaves (w13, w2) for gradients."""
    ws = [w.detach().double().requires_grad_() for w in (experts.w13, experts.w2)]
    (w1, w3), w2 = ws[0].chunk(2, dim=1), ws[1]
    x64 = x.detach().double().requires_grad_()
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        xe = x64[start:end]
        out.append((F.silu(xe @ w1[e].T) * (xe @ w3[e].T)) @ w2[e].T)
        start = end
    return torch.cat(out), x64, ws


def _assert_float32_path_matches_float64(ex, x, offs, gen):
    """Output, grad_x and the two weight gradients of float32 experts against _reference."""
    x.requires_grad_()
    y = ex(x, offs)
    grad = torch.randn(y.shape, generator=gen)
    y.backward(grad)
    y_ref, x64, (w13, w2) = _reference(ex, x, offs)
    y_ref.backward(grad.double())
    tol = dict(rtol=1e-4, atol=1e-6)  # float32 grouped matmuls against float64
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    for got, want in ((ex.w13.grad, w13.grad), (ex.w2.grad, w2.grad)):
        torch.testing.assert_close(got.double(), want, **tol)


def test_bf16_path_output_and_gradients_match_float64_loop():
    gen = torch.Generator().manual_seed(0)
    x, offs = _grouped_input(gen)
    _assert_float32_path_matches_float64(_experts(), x, offs, gen)


def test_bfloat16_activations_stay_bfloat16_and_close_to_float64():
    gen = torch.Generator().manual_seed(1)
    ex = _experts()
    x, offs = _grouped_input(gen, dtype=torch.bfloat16)
    y = ex(x, offs)
    y_ref, _, _ = _reference(ex, x, offs)
    assert y.dtype == torch.bfloat16
    rel = (y.double() - y_ref).norm() / y_ref.norm()
    assert rel < 2e-2  # bf16 inputs and outputs: ~3 significant digits


def test_zero_rows_give_zero_outputs_and_no_weight_gradient():
    ex = _experts()
    x = torch.zeros(32, D, requires_grad=True)
    y = ex(x, torch.tensor([0, 16, 16, 32], dtype=torch.int32))
    y.sum().backward()  # a stride-0 gradient: must not trip the grouped matmul's backward
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(ex.w2.grad, torch.zeros_like(ex.w2))


def test_bf16_path_takes_feature_sizes_that_are_not_a_multiple_of_16_bytes():
    # torch._grouped_mm rejects rows of 10 float32 (40 bytes): the experts pad them.
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    ex = GroupedExperts(10, 20, E)
    offs = torch.tensor([5, 5, 12, 21], dtype=torch.int32)
    _assert_float32_path_matches_float64(ex, torch.randn(21, 10, generator=gen), offs, gen)


def test_no_rows_at_all_give_an_empty_output_and_zero_weight_gradients():
    ex = _experts()
    x = torch.randn(0, D, requires_grad=True)
    y = ex(x, torch.zeros(E, dtype=torch.int32))
    y.sum().backward()   # an empty stride-0 gradient: must not trip the grouped matmul's backward
    assert y.shape == (0, D) and x.grad.shape == (0, D)
    assert torch.equal(ex.w13.grad, torch.zeros_like(ex.w13))


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("float8", [False, True])
def test_rows_past_the_last_group_are_zero_with_zero_gradients(float8):
    # The local dispatcher sizes its buffer at an upper bound, so rows past offs[-1] are
    # common. Memory freed just before (filled with NaN) is what a fresh output would get
    # if those rows were left unwritten.
    gen = torch.Generator().manual_seed(8)
    ex = _experts(float8=float8, float8_backend="emulated")
    M, offs = 96, torch.tensor([16, 16, 48, 64], dtype=torch.int32)
    x = torch.randn(M, D, generator=gen, dtype=torch.bfloat16)
    x[64:] = 0  # what the dispatcher puts there
    x.requires_grad_()
    junk = [torch.full(s, float("nan"), dtype=torch.bfloat16) for s in ((M, H), (M, H), (M, D)) * 4]
    del junk
    with torch.autograd.detect_anomaly():
        y = ex(x, offs)
        y.backward(torch.randn(y.shape, generator=gen, dtype=torch.bfloat16))
    assert torch.equal(y[64:], torch.zeros_like(y[64:]))
    assert torch.equal(x.grad[64:], torch.zeros_like(x.grad[64:]))
    for w in (ex.w13, ex.w2):
        assert torch.isfinite(w.grad).all()


def test_bad_expert_input_raises_clear_errors():
    ex = _experts()
    x = torch.randn(16, D)
    with pytest.raises(TypeError, match="offs must be int32, got torch.int64"):
        ex(x, torch.tensor([4, 8, 12, 16]))
    with pytest.raises(ValueError, match=r"offs must have shape \(4,\)"):
        ex(x, torch.tensor([8, 16], dtype=torch.int32))
    with pytest.raises(ValueError, match="x must be"):
        ex(torch.randn(16, D + 1), torch.tensor([4, 8, 12, 16], dtype=torch.int32))
    with pytest.raises(ValueError, match="hidden_dim"):
        GroupedExperts(D, 0, E)
    with pytest.raises(ValueError, match="float8_backend must be one of.*'bogus'"):
        GroupedExperts(D, H, E, float8=True, float8_backend="bogus")
    with pytest.raises(TypeError, match="exact_scales must be a bool"):
        GroupedExperts(D, H, E, exact_scales=1)
    with pytest.raises(TypeError, match="x must be bfloat16 or float32.*float64"):
        ex(x.double(), torch.tensor([4, 8, 12, 16], dtype=torch.int32))


@needs_fp8_ops
def test_float8_path_is_close_to_float64():
    gen = torch.Generator().manual_seed(2)
    ex = _experts(float8=True, float8_backend="emulated")
    x, offs = _grouped_input(gen, dtype=torch.bfloat16)
    y = ex(x, offs)
    y_ref, _, _ = _reference(ex, x, offs)
    rel = (y.double() - y_ref).norm() / y_ref.norm()
    assert 0 < rel < 0.1  # e4m3 operands in three matmuls; exactly 0 would mean no quantization


@needs_fp8_ops
def test_prequantized_input_gives_the_same_result_as_quantizing_inside():
    from ep_fp8.ops import quantize_rows

    gen = torch.Generator().manual_seed(3)
    ex = _experts(float8=True, float8_backend="emulated")
    x, offs = _grouped_input(gen, dtype=torch.bfloat16)
    x1 = x.clone().requires_grad_()
    y1 = ex(x1, offs)
    grad = torch.randn(y1.shape, generator=gen).to(torch.bfloat16)
    y1.backward(grad)
    g1 = [w.grad.clone() for w in (ex.w13, ex.w2)]
    ex.zero_grad()
    handle = torch.zeros((), dtype=torch.bfloat16).expand(x.shape).requires_grad_()
    y2 = ex(handle, offs, x_fp8=quantize_rows(x))
    y2.backward(grad)
    assert torch.equal(y1, y2)
    torch.testing.assert_close(handle.grad, x1.grad, rtol=0, atol=0)
    for a, w in zip(g1, (ex.w13, ex.w2)):
        torch.testing.assert_close(w.grad, a, rtol=0, atol=0)


@needs_fp8_ops
@pytest.mark.parametrize("float8,backend", [(True, "emulated"), (True, "bf16"), (False, "auto")])
def test_x_goes_through_one_grouped_matmul_with_w1_and_w3_stacked(monkeypatch, float8, backend):
    # One call on x with w13 (2 H columns: one quantization of x, one GEMM, one gradient
    # for x), then one on h with w2; every call gets exact_scales and no pre-quantized rows.
    seen = []
    real = ep_fp8.ops.scaled_grouped_mm

    def recording(a, w_t, offs, *args, **kw):
        seen.append((a, w_t, kw))
        return real(a, w_t, offs, *args, **kw)

    monkeypatch.setattr(ep_fp8.ops, "scaled_grouped_mm", recording)
    ex = _experts(float8=float8, float8_backend=backend, exact_scales=True)
    x, offs = _grouped_input(torch.Generator().manual_seed(6), dtype=torch.bfloat16)
    y = ex(x, offs)
    (a_up, w_up, kw_up), (h, w_down, kw_down) = seen
    # float32 weights go in as they are (the op casts them for its bf16 backend)
    assert a_up is x and torch.equal(w_up, ex.w13.transpose(-2, -1)) and w_up.dtype == torch.float32
    assert h.shape == (x.shape[0], H) and torch.equal(w_down, ex.w2.transpose(-2, -1))
    for kw in (kw_up, kw_down):
        assert kw["exact_scales"] is True and kw["x_fp8"] is None
    # h is SwiGLU of the two halves of x w13^T: a from w1 (the first H rows), b from w3
    up = real(x, ex.w13.transpose(-2, -1), offs, backend=kw_up["backend"], exact_scales=True)
    a, b = up.float().chunk(2, dim=1)
    torch.testing.assert_close(h.float(), torch.nn.functional.silu(a) * b, rtol=2**-7, atol=1e-6)
    assert y.shape == x.shape


@needs_fp8_ops
def test_float8_payload_into_bf16_experts_uses_the_dequantized_rows():
    from ep_fp8.ops import quantize_rows

    gen = torch.Generator().manual_seed(4)
    ex = _experts()
    x, offs = _grouped_input(gen)
    data, scale = quantize_rows(x)
    handle = torch.zeros((), dtype=torch.float32).expand(x.shape).requires_grad_()
    y = ex(handle, offs, x_fp8=(data, scale))
    x_deq = (data.float() / scale[:, None]).requires_grad_()
    y_ref = ex(x_deq, offs)
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.equal(y, y_ref) and torch.equal(handle.grad, x_deq.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("float8", [False, True])
def test_cuda_experts_close_to_float64(float8):
    gen = torch.Generator().manual_seed(5)
    ex = GroupedExperts(256, 512, 8, float8=float8).cuda()
    offs = torch.tensor([64, 64, 192, 256, 256, 512, 528, 1024], dtype=torch.int32)
    x = torch.randn(1024, 256, generator=gen).to(torch.bfloat16)
    y = ex(x.cuda(), offs.cuda())
    y_ref, _, _ = _reference(ex.cpu(), x, offs)
    rel = (y.cpu().double() - y_ref).norm() / y_ref.norm()
    assert rel < (0.1 if float8 else 2e-2)


def _record_backends(monkeypatch, resolve):
    """Installs `resolve` as ep_fp8.ops.resolve_backend; returns the list of the backends
    that scaled_grouped_mm is then called with, filled as the experts run."""
    used, real_mm = [], ep_fp8.ops.scaled_grouped_mm

    def recording(a, w_t, offs, *args, backend="auto", **kw):
        used.append(backend)
        return real_mm(a, w_t, offs, *args, backend=backend, **kw)

    monkeypatch.setattr(ep_fp8.ops, "resolve_backend", resolve)
    monkeypatch.setattr(ep_fp8.ops, "scaled_grouped_mm", recording)
    return used


@needs_fp8_ops
def test_float8_experts_pick_one_backend_from_static_sizes_not_the_row_count(monkeypatch):
    # With auto's size rule, a row count per rank could make ranks (and steps) disagree on
    # float8 vs bf16: the layer resolves from (device, K, N) alone and passes the result on.
    asked = []
    real_resolve = ep_fp8.ops.resolve_backend

    def resolve(backend, device, K, N, *rest, **kw):
        asked.append((backend, K, N, rest, kw))
        return real_resolve(backend, device, K, N)

    used = _record_backends(monkeypatch, resolve)
    ex = _experts(float8=True, float8_backend="auto")
    x, offs = _grouped_input(torch.Generator().manual_seed(7), dtype=torch.bfloat16)
    ex(x, offs)
    D, H = ex.dim, ex.w2.shape[2]
    # x w13^T has 2 H columns: the rule sees the GEMM that runs.
    assert sorted((b, K, N) for b, K, N, _, _ in asked) == sorted([("auto", D, 2 * H), ("auto", H, D)])
    # No row count given; the local expert count G, which is static, is.
    assert all(rest == () and kw == {"G": ex.w13.shape[0]} for *_, rest, kw in asked)
    assert used == ["emulated"] * 2  # resolved, never "auto" passed down


@needs_fp8_ops
def test_each_expert_gemm_runs_its_own_backend_for_the_local_expert_count(monkeypatch):
    # Under expert parallelism a rank holds E / ep experts (the local shard of the DTensor
    # weights): the rule on groups (fewer than 1024 on "cuda") must see that count. And w2
    # (H -> D) runs what was resolved for (H, D), not w13's (D -> 2 H) answer.
    asked = []

    def resolve(backend, device, K, N, *rest, G=None):
        asked.append(G)
        return "emulated" if (K, N) == (D, 2 * H) else "bf16"

    used = _record_backends(monkeypatch, resolve)
    ex = _experts(float8=True, float8_backend="auto")
    for name in ("w13", "w2"):  # what a rank of ep = 2 holds: E / 2 experts
        setattr(ex, name, torch.nn.Parameter(getattr(ex, name).detach()[:E // 2].clone()))
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(8), dtype=torch.bfloat16)
    out = ex(x, torch.tensor([12, 32], dtype=torch.int32))
    assert asked == [E // 2, E // 2]
    assert used == ["emulated", "bf16"]
    assert out.shape == (32, D) and torch.isfinite(out).all()


@pytest.mark.parametrize("float8", [False, True])
def test_grad_scale_scales_the_weights_gradients_only(float8):
    # parallelize_model sets it to 1 / world size where FSDP2 does not divide.
    gen = torch.Generator().manual_seed(9)
    x, offs = _grouped_input(gen)
    grad = torch.randn(x.shape[0], D, generator=gen)
    runs = []
    for scale in (1.0, 0.25):
        ex = _experts(float8=float8, float8_backend="emulated")
        ex.grad_scale = scale
        xs = x.clone().requires_grad_()
        y = ex(xs, offs)
        y.backward(grad)
        runs.append((y, xs.grad, ex.w13.grad, ex.w2.grad))
    (y1, gx1, g13_1, g2_1), (y4, gx4, g13_4, g2_4) = runs
    assert torch.equal(y1, y4) and torch.equal(gx1, gx4)
    assert torch.equal(g13_4, g13_1 * 0.25) and torch.equal(g2_4, g2_1 * 0.25)


@needs_fp8_ops
@pytest.mark.parametrize("float8", [True, False])
def test_float32_weights_keep_no_bf16_copy_for_backward_on_the_float8_path(float8):
    """Experts outside FSDP2 hold float32 weights and take bf16 rows: the float8 path
    quantizes the weights as they are and saves them, not a bf16 cast of each (1.9 GiB on
    moe_1b); the bf16 path still casts them, and keeps the casts."""
    from tests.ops._helpers import saved_by

    gen = torch.Generator().manual_seed(4)
    ex = _experts(float8=float8, float8_backend="emulated")
    x, offs = _grouped_input(gen, dtype=torch.bfloat16)
    y, saved = saved_by(ex, x.requires_grad_(), offs)
    big = [t for t in saved if t.dim() == 3 and t.dtype in (torch.bfloat16, torch.float32)]
    params = {p.untyped_storage().data_ptr() for p in ex.parameters()}
    if float8:
        assert {t.untyped_storage().data_ptr() for t in big} == params
        assert all(t.dtype == torch.float32 for t in big)
    else:
        assert any(t.dtype == torch.bfloat16 for t in big)    # the casts, as before
    y.float().sum().backward()
    assert ex.w13.grad.dtype == ex.w2.grad.dtype == torch.float32
    y_ref, _, _ = _reference(ex, x, offs)
    rel = (y.double() - y_ref).norm() / y_ref.norm()
    assert rel < (0.1 if float8 else 2e-2)   # as test_float8_path_is_close_to_float64 and the bf16 test
