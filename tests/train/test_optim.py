"""Optimizer groups, the warm-up + cosine schedule, and gradient clipping."""

import math

import pytest
import torch

from ep_fp8.train.optim import build_optimizer, build_scheduler, clip_grad_norm_, lr_factor, schedule_note


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    steps, warm, floor = 20, 4, 0.1
    f = [lr_factor(s, steps, warm, floor) for s in range(steps)]
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))               # non-increasing decay
    mid = warm + (steps - 1 - warm) / 2
    assert lr_factor(int(mid), steps, warm, floor) == pytest.approx(
        floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (int(mid) - warm) / (steps - 1 - warm))))


def test_a_warm_up_as_long_as_the_run_is_named_with_the_lr_it_ends_at():
    assert schedule_note(20, 4, 0.1) == "" and schedule_note(6, 4, 0.1) == ""   # one step decays
    assert schedule_note(6, 10, 1.0) == ""                                    # nothing to decay to
    note = schedule_note(6, 10, 0.1)   # the debug config's warm-up in a 6-step run
    assert "warmup_steps = 10 >= [training] steps - 1 = 5" in note
    assert f"ends at {lr_factor(5, 6, 10, 0.1):.3g} x lr" in note and "0.545" in note
    assert "ends at 1 x lr" in schedule_note(5, 4, 0.1)                       # at the peak


def test_scheduler_applies_the_factor_to_the_optimizer_lr():
    model = torch.nn.Linear(3, 3)
    opt = build_optimizer(model, lr=0.5, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    sched = build_scheduler(opt, steps=10, warmup_steps=2, min_lr_ratio=0.0)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5 * lr_factor(s, 10, 2, 0.0) for s in range(10)])


def test_only_matrices_decay():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.3, eps=1e-8)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0.3 for p in g["params"]}
    assert decay == {id(model[0].weight)}
    assert sum(len(g["params"]) for g in opt.param_groups) == 4


def test_clipping_matches_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((5, 3), (7,), (2, 2, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 3
    grads64 = [p.grad.double().clone() for p in params]
    ref = torch.sqrt(sum((g ** 2).sum() for g in grads64))
    norm = clip_grad_norm_(params, max_norm=1.0)
    assert norm.item() == pytest.approx(ref.item(), rel=1e-6)     # float32 sum of 33 squares
    for p, g in zip(params, grads64):
        torch.testing.assert_close(p.grad.double(), g / ref, rtol=1e-5, atol=1e-7)
    # max_norm = 0 measures without clipping.
    before = [p.grad.clone() for p in params]
    assert clip_grad_norm_(params, max_norm=0.0).item() == pytest.approx(1.0, rel=1e-5)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, params))



def _random_grads(seed, scale):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((5, 3), (7,), (2, 2, 2), (4, 6))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale
    grads64 = [p.grad.double().clone() for p in params]
    return params, grads64, torch.sqrt(sum((g ** 2).sum() for g in grads64)).item()


def test_gradients_under_max_norm_are_left_exactly_as_they_are():
    # Never scaled up: the clip coefficient is capped at 1.
    params, grads64, ref = _random_grads(1, scale=0.01)
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, max_norm=10 * ref)
    assert norm.item() == pytest.approx(ref, rel=1e-6)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, params))


def test_gradients_on_several_meshes_are_clipped_by_their_global_norm(monkeypatch):
    # Gradients are grouped by mesh (FSDP2's and the experts' differ); the norm must be
    # the square root of the sum of every group's squares, and all groups scaled alike.
    import ep_fp8.train.optim as optim

    monkeypatch.setattr(optim, "_mesh_key", lambda g: g.ndim)  # three groups here
    params, grads64, ref = _random_grads(2, scale=3.0)
    norm = clip_grad_norm_(params, max_norm=1.0)
    assert norm.item() == pytest.approx(ref, rel=1e-6)
    for p, g in zip(params, grads64):
        torch.testing.assert_close(p.grad.double(), g / ref, rtol=1e-5, atol=1e-7)
