"""Checkpoints and model files saved before the experts' w1 and w3 were one w13 parameter
load as before: w13 = torch.cat([w1, w3], dim=1) in the model and in AdamW's moments, on
one rank and on two (FSDP2 and expert parallelism, whose tensors are DTensors), by
Checkpointer.load, load_weights, export_model and load_exported (format version 1)."""

import dataclasses
import functools
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor

from ep_fp8.model import ModelArgs, Transformer
from ep_fp8.train import export
from ep_fp8.train.checkpoint import CheckpointMismatchError, Checkpointer, _saved_keys, load_weights
from ep_fp8.train.data import DataLoader, MarkovSource
from ep_fp8.train.optim import build_optimizer, build_scheduler

ARGS = ModelArgs(n_layers=3)   # the debug preset's sizes; layers 1 and 2 have experts
EXPERTS = ["layers.1.moe.experts", "layers.2.moe.experts"]


def _halves(t):
    """w1 and w3 of a w13 (or of its moment): its rows' two halves, in its layout."""
    if isinstance(t, DTensor):
        return [distribute_tensor(half.contiguous(), t.device_mesh, t.placements)
                for half in t.full_tensor().chunk(2, dim=1)]
    return [half.clone() for half in t.chunk(2, dim=1)]


def old_layout(state, drop=()):
    """Checkpointer._state's `state` as the code before w13 saved it: each experts' w13,
    and its AdamW moments, as w1 and w3; the param groups name w1 and w3 in its place.
    `drop`: model keys then left out (a damaged or foreign checkpoint)."""
    for table in (state["model"], state["optimizer"]["state"]):
        for key in [k for k in table if k.endswith(".w13")]:
            value, p = table.pop(key), key[:-len(".w13")]
            if isinstance(value, dict):   # the optimizer's: exp_avg and exp_avg_sq split, step shared
                parts = {k: _halves(v) if v.dim() else (v, v.clone()) for k, v in value.items()}
                table[f"{p}.w1"], table[f"{p}.w3"] = ({k: v[i] for k, v in parts.items()} for i in (0, 1))
            else:
                table[f"{p}.w1"], table[f"{p}.w3"] = _halves(value)
    for group in state["optimizer"]["param_groups"]:
        group["params"] = [n for name in group["params"] for n in (
            (name[:-4] + ".w1", name[:-4] + ".w3") if name.endswith(".w13") else (name,))]
    for key in drop:
        del state["model"][key]
    return state


def save_old(folder, step, state, drop=()):
    """Checkpointer(folder).save as the code before w13 did it."""
    real = Checkpointer._state
    with mock.patch.object(Checkpointer, "_state",
                           staticmethod(lambda *a, **k: old_layout(real(*a, **k), drop))):
        path = Checkpointer(folder).save(step, *state)
    saved = _saved_keys(path)
    assert f"model.{EXPERTS[0]}.w1" in saved and f"model.{EXPERTS[0]}.w13" not in saved
    return path


def make_state(seed):
    torch.manual_seed(seed)
    model = Transformer(ARGS)
    opt = build_optimizer(model, 1e-2, (0.9, 0.95), 0.1, 1e-8)
    sched = build_scheduler(opt, steps=10, warmup_steps=2, min_lr_ratio=0.1)
    loader = DataLoader(MarkovSource(ARGS.vocab_size, 4, 16, seed=0), batch_size=2, rank=0, world=1)
    return model, opt, sched, loader


def train_steps(state, n):
    model, opt, sched, loader = state
    for _ in range(n):
        inputs, targets = loader.next()
        F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_a_checkpoint_of_w1_and_w3_resumes_with_its_weights_and_moments_exactly(tmp_path):
    saved = make_state(0)
    train_steps(saved, 3)
    path = save_old(str(tmp_path), 3, saved)
    restored = make_state(1)
    assert Checkpointer(str(tmp_path)).load(path, *restored) == 3
    assert_same_weights(saved[0], restored[0])
    for (name, p), q in zip(saved[0].named_parameters(), restored[0].parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[1].state[p][key], restored[1].state[q][key]), (name, key)
    assert restored[1].param_groups[0]["lr"] == saved[1].param_groups[0]["lr"]
    assert restored[3].state_dict()["samples_seen"] == saved[3].state_dict()["samples_seen"]
    train_steps(saved, 2)       # training goes on as it would have
    train_steps(restored, 2)
    assert_same_weights(saved[0], restored[0])
    # and its next checkpoint is of the new layout
    path = Checkpointer(str(tmp_path)).save(5, *restored)
    assert f"model.{EXPERTS[0]}.w13" in _saved_keys(path)


def test_load_weights_of_a_checkpoint_of_w1_and_w3(tmp_path):
    saved = make_state(0)
    train_steps(saved, 2)
    path = save_old(str(tmp_path), 2, saved)
    model = make_state(1)[0]
    assert load_weights(path, model) == 2
    assert_same_weights(saved[0], model)


def test_a_checkpoint_with_w1_but_not_w3_is_still_refused_naming_it(tmp_path):
    state = make_state(0)
    train_steps(state, 1)
    path = save_old(str(tmp_path), 1, state, drop=[f"{EXPERTS[1]}.w3"])
    message = rf"it holds model tensors this model does not have: {EXPERTS[1]}\.w1$"
    with pytest.raises(CheckpointMismatchError, match=message):
        Checkpointer(str(tmp_path)).load(path, *make_state(1))
    with pytest.raises(CheckpointMismatchError, match=message):
        load_weights(path, make_state(1)[0])


def test_a_checkpoint_of_w1_and_w3_of_other_sizes_is_still_refused(tmp_path):
    state = make_state(0)
    path = save_old(str(tmp_path), 1, state)
    other = Transformer(dataclasses.replace(ARGS, expert_hidden_dim=32))
    # w1 and w3 are taken for w13, and then the sizes do not fit
    with pytest.raises(CheckpointMismatchError, match="could not be loaded into this model: Size mismatch"):
        load_weights(path, other)


def _old_run(tmp_path):
    """A run folder whose checkpoint (step 3) holds the experts as w1 and w3; its model."""
    from ep_fp8.train.config import load_config, resolve_model_args, to_toml

    cfg = load_config(None, ["--model.n_layers=3", "--checkpoint.enabled=true"], world_size=1,
                      run_folder=False)
    assert resolve_model_args(cfg) == ARGS
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(cfg))
    state = make_state(0)
    train_steps(state, 3)
    save_old(str(run / "checkpoints"), 3, state)
    return run, state[0]


def test_export_of_a_run_saved_with_w1_and_w3(tmp_path):
    run, model = _old_run(tmp_path)
    meta = export.export_model(str(run), str(tmp_path / "m.pt"), progress=lambda line: None)
    written = torch.load(tmp_path / "m.pt", weights_only=True)
    assert written["version"] == meta["version"] == 2
    expected = model.state_dict()
    assert list(written["state_dict"]) == list(expected)   # in the model's order
    for key, value in expected.items():
        assert torch.equal(written["state_dict"][key], value), key
    loaded, _ = export.load_exported(str(tmp_path / "m.pt"))
    assert_same_weights(model, loaded)


def test_load_exported_reads_a_version_1_file_of_w1_and_w3(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ARGS).eval()
    weights = model.state_dict()
    for p in EXPERTS:
        weights[f"{p}.w1"], weights[f"{p}.w3"] = _halves(weights.pop(f"{p}.w13"))
    file = {"format": export.FORMAT, "version": 1, "model_args": dataclasses.asdict(ARGS),
            "step": 7, "tokenizer": None, "checkpoint": "/x/step-7", "config": "",
            "state_dict": weights}
    torch.save(file, tmp_path / "v1.pt")
    loaded, meta = export.load_exported(str(tmp_path / "v1.pt"))
    assert (meta["version"], meta["step"]) == (1, 7)
    assert_same_weights(model, loaded)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    # w1 and w3 are version 1's only; a version-1 file without w3 does not fit
    torch.save(dict(file, version=2), tmp_path / "v2.pt")
    del weights[f"{EXPERTS[0]}.w3"]
    torch.save(file, tmp_path / "no-w3.pt")
    for name in ("v2", "no-w3"):
        with pytest.raises(ValueError, match=rf"{name}\.pt'.*its weights do not fit its model_args"):
            export.load_exported(str(tmp_path / f"{name}.pt"))


# --- two gloo ranks: FSDP2 and expert parallelism, the weights and moments DTensors --------

BASE = ["--training.steps=20", "--training.batch_size=4", "--training.seq_len=32",
        "--training.device=cpu", "--training.dtype=float32", "--float8.enabled=false",
        "--model.n_layers=3"]
# name: overrides, and the layout of the experts' weights and moments this gives on 2 ranks
# (the dimensions of their mesh, whether their rows are split)
LAYOUTS = {"ep2": (["--parallel.ep=2"], (1, False)),      # experts split over ep, each on one rank
           "fsdp": (["--parallel.ep=1"], (1, False)),     # FSDP2 over the experts
           "rows": (["--parallel.ep=1", "--model.n_experts=3"], (1, True))}   # 3 experts: rows split


def _build(layout, seed, world):
    from ep_fp8.train.config import load_config
    from ep_fp8.train.loop import build_model, build_optimizer_and_scheduler

    cfg = load_config(None, BASE + LAYOUTS[layout][0] + [f"--job.seed={seed}"], world_size=world,
                      run_folder=False)
    model = build_model(cfg, torch.device("cpu"), torch.float32)[0]
    optimizer, scheduler = build_optimizer_and_scheduler(cfg, model)
    rank = torch.distributed.get_rank()
    loader = DataLoader(MarkovSource(ARGS.vocab_size, 4, 32, seed=0), 2, rank, world)
    return model, optimizer, scheduler, loader


def _step(state):
    from ep_fp8.train.loop import train_step

    model, optimizer, scheduler, loader = state
    return train_step(model, loader, optimizer, scheduler, grad_accum=1, max_norm=1.0,
                      device=torch.device("cpu"))[0].item()


def _entries(model, optimizer=None):
    """{name: tensor} of a model's state dict and, with `optimizer`, of its moments."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return get_model_state_dict(model)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {**model_sd, **{f"{k}.{m}": v for k, state in optim_sd["state"].items()
                           for m, v in state.items()}}


def _differences(a, b, whole=False):
    """The names of the entries (_entries) that differ: their local shards, or with
    `whole` the whole tensors."""
    def view(t):
        return (t.full_tensor() if whole else t.to_local()) if isinstance(t, DTensor) else t
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(view(a[k]), view(b[k]))]


def _two_ranks_worker(rank, world, folder):
    out = {}
    for layout in LAYOUTS:
        saved = _build(layout, 0, world)
        for _ in range(2):
            _step(saved)
        path = save_old(os.path.join(folder, layout), 2, saved)
        restored = _build(layout, 1, world)
        step = Checkpointer(folder).load(path, *restored)
        w13 = restored[0].state_dict()[f"{EXPERTS[0]}.w13"]
        groups = [o.state_dict()["param_groups"] for o in (saved[1], restored[1])]   # lr and all
        experts = {id(p) for n, p in restored[0].named_parameters() if ".experts." in n}
        out[layout] = {"step": step, "layout": (len(w13.placements), any(p.is_shard(1) for p in w13.placements)),
                       # w13 and w2 share a mesh (equal, if not one object) and placements
                       "expert_groups": sum(any(id(p) in experts for p in g["params"])
                                            for g in restored[1].param_groups),
                       "differ": _differences(_entries(*saved[:2]), _entries(*restored[:2])),
                       "same_groups": groups[0] == groups[1]}
        # training goes on as it would have
        out[layout]["losses"] = [(_step(saved), _step(restored)) for _ in range(2)]
        out[layout]["after"] = _differences(_entries(*saved[:2]), _entries(*restored[:2]))
        if layout == "ep2":
            del saved, restored
            # resharded: the ep2 checkpoint into FSDP2 over the experts, whole tensors equal
            moved = _build("fsdp", 1, world)
            Checkpointer(folder).load(path, *moved)
            again = _build("ep2", 1, world)
            Checkpointer(folder).load(path, *again)
            out["into fsdp"] = _differences(_entries(*again[:2]), _entries(*moved[:2]), whole=True)
            weights = _build("ep2", 1, world)[0]
            out["load_weights step"] = load_weights(path, weights)
            out["load_weights"] = _differences(_entries(again[0]), _entries(weights))
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from tests._dist import run_ranks

    folder = str(tmp_path_factory.mktemp("legacy"))
    return run_ranks(functools.partial(_two_ranks_worker, folder=folder), 2, timeout=240)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_two_ranks_resume_a_checkpoint_of_w1_and_w3_exactly(two_ranks, layout):
    for result in two_ranks:
        got = result[layout]
        assert got["layout"] == LAYOUTS[layout][1]
        assert got["step"] == 2 and got["differ"] == [] and got["same_groups"], got
        assert got["expert_groups"] == 1, got
        assert all(a == b for a, b in got["losses"]) and got["after"] == [], got


def test_two_ranks_reshard_a_checkpoint_of_w1_and_w3_and_load_its_weights(two_ranks):
    for result in two_ranks:
        assert result["into fsdp"] == [] and result["load_weights"] == []
        assert result["load_weights step"] == 2
