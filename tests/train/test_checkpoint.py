"""Checkpoints: a full round trip, pruning, and atomicity under a kill mid-save."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ep_fp8.train.checkpoint import (MARKER, CheckpointMismatchError, Checkpointer, CheckpointSaveError,
                                     complete_checkpoints)
from ep_fp8.train.data import DataLoader, MarkovSource
from ep_fp8.train.optim import build_optimizer, build_scheduler, lr_factor
from tests._paths import ROOT


def make_state(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    opt = build_optimizer(model, 1e-2, (0.9, 0.95), 0.1, 1e-8)
    sched = build_scheduler(opt, steps=10, warmup_steps=2, min_lr_ratio=0.1)
    loader = DataLoader(MarkovSource(16, 2, 4, seed=0), batch_size=2, rank=0, world=1)
    return model, opt, sched, loader


def train_steps(state, n):
    model, opt, sched, loader = state
    for _ in range(n):
        model(torch.randn(3, 4)).square().sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        loader.next()


def test_round_trip_restores_model_optimizer_schedule_data_position_and_rng(tmp_path):
    saved = make_state(0)
    train_steps(saved, 3)
    ckpt = Checkpointer(str(tmp_path), keep_last=2)
    path = ckpt.save(3, *saved)
    rng_after_save = torch.rand(4)
    restored = make_state(1)
    assert ckpt.latest() == (3, path)
    assert ckpt.load(path, *restored) == 3
    assert torch.equal(torch.rand(4), rng_after_save)               # RNG restored
    for a, b in zip(saved[0].state_dict().values(), restored[0].state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(saved[0].parameters(), restored[0].parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[1].state[p][key], restored[1].state[q][key])
    assert restored[2].last_epoch == 3
    assert restored[1].param_groups[0]["lr"] == saved[1].param_groups[0]["lr"]
    assert restored[3].state_dict()["samples_seen"] == 6


def test_resume_takes_lr_weight_decay_betas_and_schedule_length_from_the_new_config(tmp_path):
    saved = make_state(0)   # lr 1e-2, weight decay 0.1, betas (0.9, 0.95), 10 steps
    train_steps(saved, 3)
    path = Checkpointer(str(tmp_path), keep_last=2).save(3, *saved)
    model, _, _, loader = make_state(1)
    opt = build_optimizer(model, 1e-5, (0.8, 0.9), 0.0, 1e-6)
    sched = build_scheduler(opt, steps=20, warmup_steps=2, min_lr_ratio=0.1)
    Checkpointer(str(tmp_path), keep_last=2).load(path, model, opt, sched, loader)
    for p, q in zip(saved[0].parameters(), model.parameters()):   # the moments are the saved ones
        assert torch.equal(saved[1].state[p]["exp_avg_sq"], opt.state[q]["exp_avg_sq"])
    for group in opt.param_groups:
        assert (group["weight_decay"], group["betas"], group["eps"]) == (0.0, (0.8, 0.9), 1e-6)
        assert group["lr"] == pytest.approx(1e-5 * lr_factor(3, 20, 2, 0.1), rel=1e-12)
    train_steps((model, opt, sched, loader), 1)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5 * lr_factor(4, 20, 2, 0.1), rel=1e-12)


def test_keep_last_prunes_and_latest_ignores_incomplete_folders(tmp_path):
    state = make_state(0)
    ckpt = Checkpointer(str(tmp_path), keep_last=2)
    for step in (1, 2, 3):
        ckpt.save(step, *state)
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [2, 3]
    os.makedirs(tmp_path / "step-9.tmp")          # a crashed save
    os.makedirs(tmp_path / "step-8")              # a folder without the marker
    assert ckpt.latest()[0] == 3
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load(str(tmp_path / "step-8"), *state)
    ckpt.save(4, *state)
    assert not (tmp_path / "step-9.tmp").exists()  # the next save clears crashed ones


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, {tests!r})
    from test_checkpoint import make_state, train_steps
    from ep_fp8.train import checkpoint

    state = make_state(0)
    train_steps(state, 2)
    ckpt = checkpoint.Checkpointer({folder!r}, keep_last=3)
    ckpt.save(2, *state)
    torch.save(state[0].state_dict(), {weights!r})
    train_steps(state, 2)
    # Die the hard way after the DCP files of step 4 are written, before the marker.
    checkpoint.Checkpointer._commit = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
    ckpt.save(4, *state)
""")


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    folder, weights = str(tmp_path / "ckpt"), str(tmp_path / "step2.pt")
    script = KILLED_SAVE.format(tests=os.path.dirname(__file__), folder=folder, weights=weights)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert os.path.isdir(os.path.join(folder, "step-4.tmp"))      # the half-done save
    assert os.path.isfile(os.path.join(folder, "step-4.tmp", ".metadata"))
    assert not os.path.exists(os.path.join(folder, "step-4.tmp", MARKER))
    ckpt = Checkpointer(folder, keep_last=3)
    step, path = ckpt.latest()
    assert step == 2
    state = make_state(5)
    assert ckpt.load(path, *state) == 2
    expected = torch.load(weights)
    for key, value in state[0].state_dict().items():
        assert torch.equal(value, expected[key])


def test_a_crash_while_replacing_a_step_keeps_the_old_save_of_that_step(tmp_path, monkeypatch):
    state = make_state(0)
    ckpt = Checkpointer(str(tmp_path), keep_last=1)
    ckpt.save(2, *state)
    saved = {k: v.clone() for k, v in state[0].state_dict().items()}
    train_steps(state, 1)
    real_rename = os.rename

    def crash_on_the_new_one(src, dst):   # the old step-2 is set aside, then the crash
        if os.path.basename(src) == "step-2.tmp":
            raise OSError("simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_the_new_one)
    with pytest.raises(CheckpointSaveError, match="rank 0: simulated crash"):
        ckpt.save(2, *state)
    monkeypatch.setattr(os, "rename", real_rename)
    step, path = ckpt.latest()            # keep_last = 1: still a checkpoint, the old one
    assert step == 2 and path.endswith("step-2.old")
    fresh = make_state(5)
    assert ckpt.load(path, *fresh) == 2
    for key, value in fresh[0].state_dict().items():
        assert torch.equal(value, saved[key])
    ckpt.save(2, *state)                  # a successful redo replaces it and clears the rest
    assert sorted(os.listdir(tmp_path)) == ["step-2"]


def test_a_step_with_both_a_new_and_an_old_save_counts_as_the_new_one(tmp_path):
    for name in ("step-2.old", "step-2", "step-3.old", "step-1"):   # each with its marker
        os.makedirs(tmp_path / name)
        (tmp_path / name / MARKER).write_text("{}")
    os.makedirs(tmp_path / "step-5.old")                             # no marker: not counted
    assert complete_checkpoints(str(tmp_path)) == [
        (1, str(tmp_path / "step-1")), (2, str(tmp_path / "step-2")),
        (3, str(tmp_path / "step-3.old"))]
    assert Checkpointer(str(tmp_path)).latest() == (3, str(tmp_path / "step-3.old"))
    (tmp_path / "step-3").mkdir()
    (tmp_path / "step-3" / MARKER).write_text("{}")
    assert Checkpointer(str(tmp_path)).latest() == (3, str(tmp_path / "step-3"))



def test_the_next_save_removes_the_old_copy_a_crash_left_beside_its_new_one(tmp_path):
    # A crash between the two renames of a redone step leaves step-N and step-N.old, both
    # complete; step-N counts, and the next save sweeps the .old away.
    for name in ("step-2", "step-2.old"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / MARKER).write_text("{}")
    Checkpointer(str(tmp_path), keep_last=3).save(3, *make_state(0))
    assert sorted(os.listdir(tmp_path)) == ["step-2", "step-3"]

def test_rng_is_left_to_the_callers_seeding_when_the_world_size_differs(tmp_path):
    import json

    state = make_state(0)
    train_steps(state, 1)
    ckpt = Checkpointer(str(tmp_path))
    path = ckpt.save(1, *state)
    saved_stream = torch.rand(4)                 # what a restored RNG would give
    with open(os.path.join(path, MARKER)) as f:
        marker = json.load(f)
    assert marker["world_size"] == 1
    marker["world_size"] = 2                     # saved by two ranks, loaded by one
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump(marker, f)
    restored = make_state(1)
    torch.manual_seed(1234)
    assert ckpt.load(path, *restored) == 1
    got = torch.rand(4)
    torch.manual_seed(1234)
    assert torch.equal(got, torch.rand(4))       # the caller's seed stands
    assert not torch.equal(got, saved_stream)


def test_a_save_clears_a_stale_tmp_folder_of_the_same_step_first(tmp_path):
    state = make_state(0)
    os.makedirs(tmp_path / "step-4.tmp")         # left by a crashed save of step 4
    (tmp_path / "step-4.tmp" / "junk.distcp").write_text("from the crashed save")
    path = Checkpointer(str(tmp_path)).save(4, *state)
    assert path == str(tmp_path / "step-4")
    assert "junk.distcp" not in os.listdir(path)
    assert not (tmp_path / "step-4.tmp").exists()
    assert Checkpointer(str(tmp_path)).load(path, *make_state(1)) == 4


def test_a_checkpoint_of_another_model_shape_is_a_named_mismatch_error(tmp_path):
    saved = make_state(0)
    path = Checkpointer(str(tmp_path)).save(1, *saved)
    torch.manual_seed(0)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
    opt = build_optimizer(wider, 1e-2, (0.9, 0.95), 0.1, 1e-8)
    sched = build_scheduler(opt, steps=10, warmup_steps=2, min_lr_ratio=0.1)
    with pytest.raises(CheckpointMismatchError, match=r"could not be loaded into this model and optimizer: .*[Ss]ize"):
        Checkpointer(str(tmp_path)).load(path, wider, opt, sched, saved[3])


def test_a_checkpoint_of_a_larger_model_is_a_named_mismatch_error(tmp_path):
    # DCP loads only the keys the model asks for: without a check, the first layers of a
    # deeper model's checkpoint would load into a shallower one without a word.
    saved = make_state(0)
    path = Checkpointer(str(tmp_path)).save(1, *saved)
    torch.manual_seed(0)
    shallower = torch.nn.Sequential(torch.nn.Linear(4, 8))
    opt = build_optimizer(shallower, 1e-2, (0.9, 0.95), 0.1, 1e-8)
    sched = build_scheduler(opt, steps=10, warmup_steps=2, min_lr_ratio=0.1)
    with pytest.raises(CheckpointMismatchError, match=r"model tensors this model does not have: 1\.bias"):
        Checkpointer(str(tmp_path)).load(path, shallower, opt, sched, saved[3])


def test_a_ctrl_c_during_the_load_is_an_interrupt_not_a_mismatch(tmp_path, monkeypatch):
    # DCP wraps what a rank raised, a KeyboardInterrupt too, in a CheckpointException.
    from torch.distributed.checkpoint.api import CheckpointException

    import ep_fp8.train.checkpoint as ckpt_mod

    saved = make_state(0)
    path = Checkpointer(str(tmp_path)).save(1, *saved)

    def interrupted_load(*args, **kwargs):
        raise CheckpointException("load failed", {0: (KeyboardInterrupt(), None)})

    monkeypatch.setattr(ckpt_mod.dcp, "load", interrupted_load)
    with pytest.raises(KeyboardInterrupt):
        Checkpointer(str(tmp_path)).load(path, *make_state(1))


@pytest.mark.parametrize("damage", ["garbage marker", "marker without world_size", "missing shard",
                                    "missing rng file"])
def test_a_damaged_checkpoint_is_a_named_error_before_anything_is_set(tmp_path, damage):
    from ep_fp8.train.checkpoint import CheckpointDamagedError

    ckpt = Checkpointer(str(tmp_path), keep_last=0)
    path = ckpt.save(1, *make_state(0))
    if damage == "garbage marker":
        (tmp_path / "step-1" / MARKER).write_text("garbage{")
    elif damage == "marker without world_size":
        (tmp_path / "step-1" / MARKER).write_text('{"step": 1}')
    elif damage == "missing shard":
        next(p for p in (tmp_path / "step-1").iterdir() if p.suffix == ".distcp").unlink()
    else:
        (tmp_path / "step-1" / "rng-rank0.pt").unlink()
    state = make_state(5)
    with pytest.raises(CheckpointDamagedError, match="step-1"):
        ckpt.load(path, *state)
    if damage != "missing rng file":   # found before the weights were touched
        assert all(torch.equal(a, b) for a, b in zip(state[0].state_dict().values(),
                                                        make_state(5)[0].state_dict().values()))


def test_pruning_takes_a_checkpoint_out_of_the_complete_set_before_deleting_it(tmp_path, monkeypatch):
    import shutil

    from ep_fp8.train import checkpoint

    ckpt = Checkpointer(str(tmp_path), keep_last=1)
    state = make_state(0)
    ckpt.save(1, *state)
    real_rmtree, deleting = shutil.rmtree, []

    def killed_midway(path, ignore_errors=False):   # the process dies while deleting
        if os.path.basename(path) == "step-1.tmp" and os.path.isdir(path):
            deleting.append(sorted(os.listdir(path)))
            os.remove(os.path.join(path, sorted(os.listdir(path))[0]))   # one file gone...
            raise KeyboardInterrupt                                      # ...then the end
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, *state)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert deleting and [s for s, _ in complete_checkpoints(str(tmp_path))] == [2]   # not step 1
    ckpt.save(3, *state)
    assert sorted(os.listdir(tmp_path)) == ["step-3"]   # the half-deleted folder swept away


def _agree_worker(rank, world):
    from ep_fp8.train.checkpoint import CheckpointDamagedError, _agree

    def read(r):
        if r == 1:
            raise CheckpointDamagedError("rank 1's file is missing")
        return "fine"
    try:
        return _agree(read, rank)
    except CheckpointDamagedError as e:
        return f"raised: {e}"


def test_a_damaged_part_seen_by_one_rank_is_raised_on_every_rank():
    from tests._dist import run_ranks

    # Else rank 0 would return and write the run's files while rank 1 exits.
    assert run_ranks(_agree_worker, 2, timeout=120) == ["raised: rank 1's file is missing"] * 2


def _fail_rng_file_save(monkeypatch):
    """torch.save of a rank's RNG file fails as on a full disk; DCP's own writes work."""
    import errno
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))   # a path or an open file
        if os.path.basename(name).startswith("rng-rank"):
            raise OSError(errno.ENOSPC, "No space left on device", name)
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk)


def test_a_failed_save_is_a_named_error_that_keeps_the_complete_checkpoints(tmp_path, monkeypatch):
    state = make_state(0)
    ckpt = Checkpointer(str(tmp_path), keep_last=1)
    first = ckpt.save(2, *state)
    _fail_rng_file_save(monkeypatch)
    with pytest.raises(CheckpointSaveError) as info:
        ckpt.save(4, *state)
    message = str(info.value)
    assert "could not save step 4 to " + str(tmp_path) in message
    assert "No space left on device" in message and "GiB free there" in message
    assert message.endswith(f"the newest complete checkpoint is {first}.")
    assert os.listdir(tmp_path) == ["step-2"]            # the partial save removed, step 2 kept
    monkeypatch.undo()
    assert ckpt.save(4, *state).endswith("step-4")        # the next save works


def test_a_real_write_failure_inside_dcp_is_the_same_named_error(tmp_path):
    # The writes fail in the OS (a file-size limit: EFBIG), not in a patched function.
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch
        from ep_fp8.train.checkpoint import Checkpointer, CheckpointSaveError
        from ep_fp8.train.data import DataLoader, MarkovSource
        from ep_fp8.train.optim import build_optimizer, build_scheduler
        model = torch.nn.Linear(4, 8192)                     # a shard above the limit
        opt = build_optimizer(model, 1e-2, (0.9, 0.95), 0.1, 1e-8)
        state = (model, opt, build_scheduler(opt, steps=10, warmup_steps=2, min_lr_ratio=0.1),
                 DataLoader(MarkovSource(16, 2, 4, seed=0), batch_size=2, rank=0, world=1))
        ckpt = Checkpointer({str(tmp_path)!r})
        ckpt.save(1, *state)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            ckpt.save(2, *state)
        except CheckpointSaveError as e:
            print(e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "could not save step 2" in out.stdout and "File too large" in out.stdout, out.stdout
    assert sorted(os.listdir(tmp_path)) == ["step-1"]


def second_save_failing_on(rank, failing_rank, patch, folder):
    """A rank's part of a 2-rank test: save step 1, then step 2 with `patch(monkeypatch)`
    applied on `failing_rank` only; "saved", or what CheckpointSaveError says after its
    first ': '."""
    import pytest as _pytest

    from ep_fp8.train.checkpoint import CheckpointSaveError

    state = make_state(0)
    ckpt = Checkpointer(folder, keep_last=3)
    ckpt.save(1, *state)
    with _pytest.MonkeyPatch.context() as mp:
        if rank == failing_rank:
            patch(mp)
        try:
            ckpt.save(2, *state)
            return "saved"
        except CheckpointSaveError as e:
            return str(e).split(": ", 1)[1]


def _save_fails_on_rank_1_worker(rank, world, folder):
    return second_save_failing_on(rank, 1, _fail_rng_file_save, folder)


def test_a_save_that_fails_on_one_rank_is_raised_on_every_rank(tmp_path):
    import functools

    from tests._dist import run_ranks

    # Else rank 0 would commit a checkpoint missing rank 1's RNG file, or wait forever.
    results = run_ranks(functools.partial(_save_fails_on_rank_1_worker, folder=str(tmp_path)),
                        2, timeout=120)
    assert results[0] == results[1] and results[0].startswith("rank 1: [Errno 28]"), results
    assert sorted(os.listdir(tmp_path)) == ["step-1"]



def _rng_per_rank_worker(rank, world, folder):
    saved, restored = make_state(0), make_state(1)   # (each seeds torch itself)
    torch.manual_seed(100 + rank)                # each rank its own stream
    ckpt = Checkpointer(folder)
    path = ckpt.save(1, *saved)
    after_save = torch.rand(4)
    torch.manual_seed(0)                         # the same on both ranks, then restored
    ckpt.load(path, *restored)
    return torch.equal(torch.rand(4), after_save), after_save.tolist()


def test_each_rank_gets_its_own_rng_state_back(tmp_path):
    import functools

    from tests._dist import run_ranks

    results = run_ranks(functools.partial(_rng_per_rank_worker, folder=str(tmp_path)), 2, timeout=120)
    assert results[0][0] and results[1][0], results
    assert results[0][1] != results[1][1]        # the two streams did differ

def test_a_checkpoint_saved_before_data_fingerprints_still_loads(tmp_path, monkeypatch):
    from ep_fp8.train.data import DataLoader

    state = make_state(0)
    train_steps(state, 2)
    monkeypatch.setattr(DataLoader, "state_dict", lambda self: {"samples_seen": self.samples_seen})
    path = Checkpointer(str(tmp_path)).save(2, *state)
    monkeypatch.undo()
    fresh = make_state(1)
    assert Checkpointer(str(tmp_path)).load(path, *fresh) == 2
    assert fresh[3].samples_seen == 4 and fresh[3].resume_note == ""
