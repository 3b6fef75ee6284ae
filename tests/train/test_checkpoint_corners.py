"""Checkpoints: corners of the commit order, pruning, and the checks of load and load_weights."""

import json
import os
import warnings

import pytest
import torch

from ep_fp8.train import checkpoint
from ep_fp8.train.checkpoint import (MARKER, CheckpointDamagedError, Checkpointer, complete_checkpoints,
                                     load_weights)
from tests.train.test_checkpoint import make_state, second_save_failing_on


def _steps_in(folder):
    return [s for s, _ in complete_checkpoints(str(folder))]


def test_the_marker_rng_files_and_folder_are_synced_to_disk_around_the_rename(tmp_path, monkeypatch):
    # The rename makes step-N a checkpoint: its marker must be on disk by then, or a power
    # cut could leave a step-N whose marker is empty.
    events, real_fsync, real_rename = [], os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "rename", rename)
    final = Checkpointer(str(tmp_path)).save(3, *make_state(0))
    tmp = final + ".tmp"
    commit = events.index(("rename", tmp, final))
    assert ("fsync", os.path.join(tmp, MARKER)) in events[:commit]
    assert ("fsync", os.path.join(tmp, "rng-rank0.pt")) in events[:commit]
    # The folder's entries (shards, marker) before the rename, and the rename after it.
    assert events.index(("fsync", tmp)) > events.index(("fsync", os.path.join(tmp, MARKER)))
    assert events.index(("fsync", tmp)) < commit
    assert ("fsync", str(tmp_path)) in events[commit:]


def test_a_tmp_folder_that_already_has_its_marker_is_not_a_checkpoint(tmp_path):
    # A crash between the marker's write and the rename leaves step-N.tmp with a marker.
    ckpt = Checkpointer(str(tmp_path), keep_last=3)
    state = make_state(0)
    ckpt.save(2, *state)
    os.makedirs(tmp_path / "step-7.tmp")
    (tmp_path / "step-7.tmp" / MARKER).write_text(json.dumps({"step": 7, "world_size": 1}))
    assert ckpt.latest() == (2, str(tmp_path / "step-2"))
    assert _steps_in(tmp_path) == [2]
    ckpt.save(3, *state)
    assert sorted(os.listdir(tmp_path)) == ["step-2", "step-3"]


def test_keep_last_one_keeps_only_the_newest(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep_last=1)
    state = make_state(0)
    for step in (1, 2, 3):
        ckpt.save(step, *state)
    assert sorted(os.listdir(tmp_path)) == ["step-3"]


def test_keep_last_keeps_exactly_that_many(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep_last=3)
    state = make_state(0)
    for step in range(1, 7):
        ckpt.save(step, *state)
    assert sorted(os.listdir(tmp_path)) == ["step-4", "step-5", "step-6"]


def _refuse_rename(mp, name, error):
    """Make the checkpoint module's os.rename of a folder called `name` raise `error`."""
    real_rename = os.rename

    def refuse(src, dst):
        if os.path.basename(src) == name:
            raise error
        real_rename(src, dst)

    mp.setattr(checkpoint.os, "rename", refuse)


def test_an_old_checkpoint_that_cannot_be_removed_is_a_warning_and_the_save_stands(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path), keep_last=1)
    state = make_state(0)
    ckpt.save(1, *state)
    real_rename = os.rename
    _refuse_rename(monkeypatch, "step-1", PermissionError("read-only"))
    with pytest.warns(UserWarning, match="could not remove the old checkpoint .*step-1: read-only"):
        path = ckpt.save(2, *state)
    monkeypatch.setattr(checkpoint.os, "rename", real_rename)
    assert path == str(tmp_path / "step-2") and _steps_in(tmp_path) == [1, 2]
    assert ckpt.load(path, *make_state(1)) == 2


def test_a_folder_that_does_not_exist_has_no_checkpoints(tmp_path):
    assert complete_checkpoints(str(tmp_path / "nowhere")) == []
    assert Checkpointer(str(tmp_path / "nowhere")).latest() is None


@pytest.mark.parametrize("damage", ["empty", "cut short", "not a pickle", "a pickle of a dict"])
def test_a_damaged_metadata_file_is_a_damaged_checkpoint(tmp_path, damage):
    import pickle

    path = Checkpointer(str(tmp_path)).save(1, *make_state(0))
    metadata = os.path.join(path, ".metadata")
    with open(metadata, "rb") as f:
        whole = f.read()
    with open(metadata, "wb") as f:
        f.write({"empty": b"", "cut short": whole[:len(whole) // 2], "not a pickle": b"garbage\n",
                 "a pickle of a dict": pickle.dumps({"model": 1})}[damage])
    with pytest.raises(CheckpointDamagedError, match="metadata"):
        Checkpointer(str(tmp_path)).load(path, *make_state(1))
    with pytest.raises(CheckpointDamagedError, match="metadata"):
        load_weights(path, make_state(1)[0])


def test_load_weights_refuses_a_folder_without_the_marker(tmp_path):
    path = Checkpointer(str(tmp_path)).save(1, *make_state(0))
    os.remove(os.path.join(path, MARKER))
    model = make_state(1)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_weights(path, model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("marker", ["garbage{", '{"step": 1}', '{"step": 1, "world_size": 0}'])
def test_load_weights_refuses_a_damaged_marker(tmp_path, marker):
    path = Checkpointer(str(tmp_path)).save(1, *make_state(0))
    with open(os.path.join(path, MARKER), "w") as f:
        f.write(marker)
    with pytest.raises(CheckpointDamagedError, match="not a valid marker"):
        load_weights(path, make_state(1)[0])


def test_load_weights_loads_the_weights_and_returns_the_step(tmp_path):
    saved = make_state(0)
    path = Checkpointer(str(tmp_path)).save(4, *saved)
    model = make_state(1)[0]
    assert load_weights(path, model) == 4
    assert all(torch.equal(v, saved[0].state_dict()[k]) for k, v in model.state_dict().items())


def test_the_marker_records_the_step_and_the_world_size(tmp_path):
    path = Checkpointer(str(tmp_path)).save(6, *make_state(0))
    with open(os.path.join(path, MARKER)) as f:
        marker = json.load(f)
    assert (marker["step"], marker["world_size"]) == (6, 1)


def test_a_redone_step_leaves_no_old_copy(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep_last=0)
    state = make_state(0)
    ckpt.save(2, *state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.save(2, *state)
    assert sorted(os.listdir(tmp_path)) == ["step-2"]


def test_a_checkpoint_lacking_tensors_of_the_model_names_them(tmp_path):
    from ep_fp8.train.checkpoint import CheckpointMismatchError
    from ep_fp8.train.optim import build_optimizer, build_scheduler

    _, _, _, loader = make_state(0)
    shallow = torch.nn.Sequential(torch.nn.Linear(4, 8))
    opt = build_optimizer(shallow, 1e-2, (0.9, 0.95), 0.1, 1e-8)
    sched = build_scheduler(opt, steps=10, warmup_steps=2, min_lr_ratio=0.1)
    path = Checkpointer(str(tmp_path)).save(1, shallow, opt, sched, loader)
    with pytest.raises(CheckpointMismatchError, match=r"it lacks tensors of this model: 1\.bias, 1\.weight, "
                                                      r"2\.bias and 1 more"):
        Checkpointer(str(tmp_path)).load(path, *make_state(1))
    with pytest.raises(CheckpointMismatchError, match=r"lacks tensors of this model: 1\.bias"):
        load_weights(path, make_state(1)[0])


# --- two ranks: what one rank sees, every rank raises --------------------------------------

def _refuse_to_commit_step_2(mp):
    _refuse_rename(mp, "step-2.tmp", OSError("simulated rename failure"))


def _commit_fails_on_rank_0_worker(rank, world, folder):
    return second_save_failing_on(rank, 0, _refuse_to_commit_step_2, folder)


def test_a_commit_that_fails_on_rank_0_is_raised_on_every_rank(tmp_path):
    import functools

    from tests._dist import run_ranks

    results = run_ranks(functools.partial(_commit_fails_on_rank_0_worker, folder=str(tmp_path)),
                        2, timeout=60, pg_timeout=20)
    assert results[0] == results[1] and "rank 0: simulated rename failure" in results[0], results
    assert sorted(os.listdir(tmp_path)) == ["step-1"]


def _folder_cannot_be_made_worker(rank, world, folder):
    from ep_fp8.train.checkpoint import CheckpointSaveError

    try:
        Checkpointer(folder).save(1, *make_state(0))
        return "saved"
    except CheckpointSaveError as e:
        return f"raised: {e}"


def test_a_checkpoint_folder_rank_0_cannot_make_is_raised_on_every_rank(tmp_path):
    import functools

    from tests._dist import run_ranks

    # A file where the folder should be: only rank 0 makes the folder, and rank 1 must not
    # go on alone into DCP's collectives (it would wait there until the timeout).
    (tmp_path / "ckpt").write_text("not a folder")
    folder = str(tmp_path / "ckpt" / "inner")
    results = run_ranks(functools.partial(_folder_cannot_be_made_worker, folder=folder),
                        2, timeout=60, pg_timeout=20)
    assert results[0] == results[1], results
    assert results[0].startswith(f"raised: could not save step 1 to {folder}"), results
    assert "rank 0: " in results[0] and "Not a directory" in results[0], results
    assert (tmp_path / "ckpt").read_text() == "not a folder"


def _hide_marker(mp):
    """os.path.isfile does not see the marker (a rank whose view of the folder lags)."""
    real_isfile = os.path.isfile
    mp.setattr(checkpoint.os.path, "isfile",
               lambda p: False if str(p).endswith(MARKER) else real_isfile(p))


def _lock_marker(mp):
    """Opening the marker is refused."""
    import builtins

    real_open = builtins.open

    def unreadable_marker(file, *args, **kwargs):
        if str(file).endswith(MARKER):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)
    mp.setattr(checkpoint, "open", unreadable_marker, raising=False)


def _load_with_rank_1_patched_worker(rank, world, folder, weights_only, patch):
    """Save step 1, then load it (or only its weights) with `patch(monkeypatch)` on rank 1:
    "loaded", or "raised: <error type>: <message>"."""
    import pytest as _pytest

    path = Checkpointer(folder).save(1, *make_state(0))
    with _pytest.MonkeyPatch.context() as mp:
        if rank == 1:
            patch(mp)
        try:
            if weights_only:
                load_weights(path, make_state(1)[0])
            else:
                Checkpointer(folder).load(path, *make_state(1))
            return "loaded"
        except ValueError as e:
            return f"raised: {type(e).__name__}: {e}"


def _load_on_two_ranks(folder, weights_only, patch):
    import functools

    from tests._dist import run_ranks

    results = run_ranks(functools.partial(_load_with_rank_1_patched_worker, folder=folder,
                                          weights_only=weights_only, patch=patch),
                        2, timeout=60, pg_timeout=20)
    assert results[0] == results[1], results
    return results[0]


@pytest.mark.parametrize("weights_only", [False, True])
def test_a_marker_only_one_rank_cannot_see_is_raised_on_every_rank(tmp_path, weights_only):
    assert _load_on_two_ranks(str(tmp_path), weights_only, _hide_marker) == (
        f"raised: ValueError: {tmp_path / 'step-1'} is not a complete checkpoint "
        f"(no {MARKER} marker seen by rank 1)")


@pytest.mark.parametrize("weights_only", [False, True])
def test_a_marker_only_one_rank_cannot_read_is_raised_on_every_rank(tmp_path, weights_only):
    result = _load_on_two_ranks(str(tmp_path), weights_only, _lock_marker)
    assert result.startswith("raised: CheckpointDamagedError: ") and "Permission denied" in result


def test_a_load_failure_is_named_by_the_last_line_of_the_error_behind_it(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.api import CheckpointException

    from ep_fp8.train.checkpoint import CheckpointMismatchError

    path = Checkpointer(str(tmp_path)).save(1, *make_state(0))

    def failing_load(*args, **kwargs):
        error = RuntimeError("Error(s) in loading:\nsize mismatch for 0.weight: [8, 4] vs [16, 4]")
        raise CheckpointException("load failed", {0: (error, None)})

    monkeypatch.setattr(checkpoint.dcp, "load", failing_load)
    with pytest.raises(CheckpointMismatchError) as info:
        Checkpointer(str(tmp_path)).load(path, *make_state(1))
    assert str(info.value).endswith("this model and optimizer: size mismatch for 0.weight: [8, 4] vs [16, 4]")


@pytest.mark.parametrize("world_size", [True, False])
def test_a_marker_whose_world_size_is_a_boolean_is_a_damaged_checkpoint(tmp_path, world_size):
    # json's true is an int to Python: without a check it would read as a world of 1.
    path = Checkpointer(str(tmp_path)).save(1, *make_state(0))
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"step": 1, "world_size": world_size}, f)
    with pytest.raises(CheckpointDamagedError, match=f"world_size {world_size}"):
        Checkpointer(str(tmp_path)).load(path, *make_state(1))


def test_a_save_sweeps_only_the_tmp_folders_of_its_own_saves(tmp_path):
    for name in ("scratch.tmp", "step-x.tmp", "step-3.old.tmp"):
        os.makedirs(tmp_path / name)
    Checkpointer(str(tmp_path), keep_last=1).save(4, *make_state(0))
    assert sorted(os.listdir(tmp_path)) == ["scratch.tmp", "step-3.old.tmp", "step-4", "step-x.tmp"]
