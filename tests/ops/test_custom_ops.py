"""The custom ops behind scaled_grouped_mm: schema, fake (meta) kernels and autograd
registration checked by torch.library.opcheck, and torch.compile without graph breaks."""

import pytest
import torch

from ep_fp8.ops import quantize_rows, scaled_grouped_mm
from tests.ops._helpers import offsets

# test_aot_dispatch_dynamic would sum the float8 outputs and test_schema compares float8
# inputs for mutation, neither of which CPU torch can do with float8: those two run only
# where no float8 tensor is involved, and the compile tests below trace forward and
# backward through AOTAutograd.
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")
FP8_IN_OPCHECKS = ("test_autograd_registration", "test_faketensor")


def _case(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(45, 16, generator=gen).to(dtype)
    w = torch.randn(3, 32, 16, generator=gen).to(dtype)  # (G, N, K)
    grad_out = torch.randn(45, 32, generator=gen).to(dtype)
    return x, w, offsets([10, 0, 20]), grad_out


@pytest.mark.parametrize("exact", [False, True])
def test_float8_ops_pass_opcheck(exact):
    x, w, offs, grad_out = _case()
    w_t = w.transpose(1, 2)
    fwd = torch.ops.ep_fp8.scaled_grouped_mm_fwd.default
    args = (x.requires_grad_(), w_t.requires_grad_(), offs, None, None, "emulated", exact, torch.float32,
            True, True, "")
    torch.library.opcheck(fwd, args, test_utils=OPCHECKS)
    data, scale = quantize_rows(x)
    torch.library.opcheck(fwd, (x, w_t, offs, data, scale, "emulated", exact, torch.bfloat16, False, True, ""),
                          test_utils=FP8_IN_OPCHECKS)
    bwd = torch.ops.ep_fp8.scaled_grouped_mm_bwd.default
    for dtype in (torch.float32, torch.bfloat16):  # the placeholders of gradients not asked for too
        x_d, w_d, g_d = x.detach().to(dtype), w_t.detach().to(dtype), grad_out.to(dtype)
        _, *saved = fwd(x_d, w_d, offs, None, None, "emulated", exact, dtype, True, True, "")
        for need_x, need_w in ((True, True), (True, False), (False, True)):
            torch.library.opcheck(bwd, (g_d, w_d, *saved, offs, "emulated", exact, dtype, dtype, need_x, need_w, True),
                                  test_utils=FP8_IN_OPCHECKS)
    torch.library.opcheck(torch.ops.ep_fp8.quantize_rows.default, (x.detach(), exact), test_utils=OPCHECKS)


def test_bf16_ops_pass_opcheck():
    x, w, offs, grad_out = _case(torch.bfloat16)
    w_t = w.transpose(1, 2)
    torch.library.opcheck(torch.ops.ep_fp8.grouped_mm_hp_fwd.default,
                          (x.requires_grad_(), w_t.requires_grad_(), offs, None, None, torch.bfloat16),
                          test_utils=OPCHECKS)
    torch.library.opcheck(torch.ops.ep_fp8.grouped_mm_hp_bwd.default,
                          (grad_out, x.detach(), w_t.detach(), offs, None, None, True, True), test_utils=OPCHECKS)


@pytest.mark.parametrize("backend", ["emulated", "bf16"])
@pytest.mark.parametrize("with_x_fp8", [False, True])
def test_compiles_fullgraph_and_matches_eager(backend, with_x_fp8):
    # aot_eager traces forward and backward through the custom ops; a graph break fails.
    torch._dynamo.reset()
    x, w, offs, grad_out = _case(seed=1)
    x_fp8 = quantize_rows(x) if with_x_fp8 else None

    def step(x, w):
        return scaled_grouped_mm(x, w.transpose(1, 2), offs, backend=backend, x_fp8=x_fp8)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xl, wl)
        out.backward(grad_out)
        results.append((out, xl.grad, wl.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
