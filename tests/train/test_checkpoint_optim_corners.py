"""Corners of the schedule, the optimizer groups, clipping, pruning and checkpoint order."""

import json
import math
import os

import pytest
import torch

from ep_fp8.train.checkpoint import MARKER, CheckpointDamagedError, Checkpointer, complete_checkpoints
from ep_fp8.train.optim import build_optimizer, build_scheduler, clip_grad_norm_, lr_factor
from tests.train.test_checkpoint import make_state, train_steps


def _reference_factor(step, steps, warmup, floor):
    """The documented schedule in float64, for a warm-up shorter than the run."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min((step - warmup) / (steps - 1 - warmup), 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _steps_in(folder):
    return [step for step, _ in complete_checkpoints(str(folder))]


# --- schedule ---------------------------------------------------------------------------

@pytest.mark.parametrize("floor", [0.0, 0.1, 0.5])
def test_every_warmup_shorter_than_the_run_follows_the_formula_and_ends_at_the_floor(floor):
    # Python floats are float64 on both sides; 1e-12 absolute leaves room for rounding only.
    for steps in range(2, 16):
        for warmup in range(0, steps - 1):      # down to a single decay step (warmup = steps - 2)
            got = [lr_factor(s, steps, warmup, floor) for s in range(steps)]
            want = [_reference_factor(s, steps, warmup, floor) for s in range(steps)]
            assert got == pytest.approx(want, rel=0, abs=1e-12), (steps, warmup)
            assert got[-1] == pytest.approx(floor, rel=0, abs=1e-12), (steps, warmup)


def test_steps_past_the_end_of_the_run_stay_at_the_floor():
    # Exact float64 formula on both sides; 1e-12 absolute.
    for steps, warmup, floor in [(10, 2, 0.1), (20, 0, 0.0), (6, 4, 0.25), (3, 1, 0.5)]:
        for step in range(steps, steps + 5):
            assert lr_factor(step, steps, warmup, floor) == pytest.approx(floor, rel=0, abs=1e-12)
    # The scheduler is stepped once more after the last optimizer step.
    opt = build_optimizer(torch.nn.Linear(2, 2), lr=0.4, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8)
    sched = build_scheduler(opt, steps=5, warmup_steps=1, min_lr_ratio=0.2)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * 0.2, rel=1e-12)


# --- optimizer groups and clipping ------------------------------------------------------

def _regrouped(state, split: bool):
    """`state` with its optimizer rebuilt over the same parameters and hyperparameters in
    other groups: with `split` each parameter its own group, else all in one group."""
    model, opt, _, loader = state
    params = [{"params": [p], "weight_decay": 0.1} for p in model.parameters()] if split else \
        [{"params": list(model.parameters()), "weight_decay": 0.1}]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    return model, opt, build_scheduler(opt, steps=10, warmup_steps=2, min_lr_ratio=0.1), loader


@pytest.mark.parametrize("split", [True, False], ids=["more_groups", "fewer_groups"])
def test_a_checkpoint_loads_into_an_optimizer_that_groups_the_parameters_otherwise(tmp_path, split):
    # Code that groups parameters otherwise than the code that saved (two groups here:
    # matrices decay, vectors do not) still gets each parameter's moments and step.
    saved = make_state(0)
    train_steps(saved, 3)
    path = Checkpointer(str(tmp_path)).save(3, *saved)
    restored = _regrouped(make_state(1), split)
    assert len(restored[1].param_groups) != len(saved[1].param_groups)
    assert Checkpointer(str(tmp_path)).load(path, *restored) == 3
    for p, q in zip(saved[0].parameters(), restored[0].parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[1].state[p][key], restored[1].state[q][key]), key
    # each group keeps its own hyperparameters, and the lr the schedule gives at step 3
    assert all(g["weight_decay"] == 0.1 for g in restored[1].param_groups)
    assert {g["lr"] for g in restored[1].param_groups} == {saved[1].param_groups[0]["lr"]}

def test_frozen_parameters_are_left_out_of_the_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    opt = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len(in_groups) == 4


def test_clipping_skips_parameters_without_a_gradient():
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((6, 2), (5,), (3, 3))]
    params[0].grad = torch.randn(params[0].shape, generator=gen) * 4
    params[2].grad = torch.randn(params[2].shape, generator=gen) * 4      # params[1]: no grad
    grads64 = {i: params[i].grad.double().clone() for i in (0, 2)}
    ref = torch.sqrt(sum((g ** 2).sum() for g in grads64.values())).item()
    assert ref > 1.0
    norm = clip_grad_norm_(params, max_norm=1.0)
    assert norm.item() == pytest.approx(ref, rel=1e-6)       # float32 sum of 21 squares
    assert params[1].grad is None
    for i, g in grads64.items():
        torch.testing.assert_close(params[i].grad.double(), g / ref, rtol=1e-5, atol=1e-7)
    # No gradient at all: a zero norm, nothing raised.
    assert clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], max_norm=1.0).item() == 0.0


# --- checkpoints ------------------------------------------------------------------------

def test_steps_are_ordered_as_numbers_not_as_names(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep_last=2)
    state = make_state(0)
    for step in (9, 10, 11):
        ckpt.save(step, *state)
    assert _steps_in(tmp_path) == [10, 11]
    assert ckpt.latest() == (11, str(tmp_path / "step-11"))
    for name in ("step-2", "step-100"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / MARKER).write_text("{}")
    assert _steps_in(tmp_path) == [2, 10, 11, 100]
    assert ckpt.latest() == (100, str(tmp_path / "step-100"))


def test_pruning_never_deletes_the_checkpoint_just_saved(tmp_path):
    # Saving a step older than the newest (a run resumed from an earlier checkpoint):
    # keep_last = 1 would make the new save the one to prune.
    ckpt = Checkpointer(str(tmp_path), keep_last=1)
    state = make_state(0)
    ckpt.save(5, *state)
    path = ckpt.save(2, *state)
    assert _steps_in(tmp_path) == [2, 5]
    assert ckpt.load(path, *make_state(1)) == 2


def test_keep_last_zero_keeps_every_checkpoint(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep_last=0)
    state = make_state(0)
    for step in (1, 2, 3, 4):
        ckpt.save(step, *state)
    assert _steps_in(tmp_path) == [1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path)) == ["step-1", "step-2", "step-3", "step-4"]


def test_an_old_save_without_its_new_one_survives_the_next_save_of_another_step(tmp_path):
    # A crash while step 2 was being replaced leaves only step-2.old: the only copy of step 2.
    ckpt = Checkpointer(str(tmp_path), keep_last=3)
    state = make_state(0)
    ckpt.save(2, *state)
    saved = {k: v.clone() for k, v in state[0].state_dict().items()}
    os.rename(tmp_path / "step-2", tmp_path / "step-2.old")
    ckpt.save(3, *state)
    assert complete_checkpoints(str(tmp_path)) == [(2, str(tmp_path / "step-2.old")),
                                                   (3, str(tmp_path / "step-3"))]
    fresh = make_state(1)
    assert ckpt.load(str(tmp_path / "step-2.old"), *fresh) == 2
    assert all(torch.equal(v, saved[k]) for k, v in fresh[0].state_dict().items())


@pytest.mark.parametrize("world_size", [0, -1, "1", None, 1.5])
def test_a_marker_with_an_invalid_world_size_is_a_damaged_checkpoint(tmp_path, world_size):
    ckpt = Checkpointer(str(tmp_path))
    path = ckpt.save(1, *make_state(0))
    marker = os.path.join(path, MARKER)
    with open(marker) as f:
        content = json.load(f)
    content["world_size"] = world_size
    with open(marker, "w") as f:
        json.dump(content, f)
    with pytest.raises(CheckpointDamagedError, match="not a valid marker"):
        ckpt.load(path, *make_state(1))
