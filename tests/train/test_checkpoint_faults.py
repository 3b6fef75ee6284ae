"""Checkpoints, model files and the optimizer: behaviours the other tests left open.

- Only step-N/ and step-N.old/ folders with the marker count as checkpoints.
- Redoing a step that a crash left as both step-N and step-N.old replaces both.
- A pruned step-N.old that a death interrupts leaves nothing the next save does not sweep.
- A save failure's message gives the free space in GiB; a write that torch reports as a
  RuntimeError (a full disk) fails the save as an OSError does; a GPU's RNG state is saved
  and restored with the CPU's.
- A resumed loader gets its whole saved state (the data source's fingerprint too), so a
  changed [data] is noticed.
- Markers that are JSON but not an object, shards that are not readable files or were cut
  short or overwritten, and RNG files holding pickled objects are damaged checkpoints
  (CheckpointDamagedError, whose hints say to move the checkpoint away or export the one
  before it), never a raw TypeError, a misfit (CheckpointMismatchError, whose hint is to
  resume with the config the run was saved with), or code run by unpickling.
- A list of exactly three missing tensors is named whole.
- Export: a damaged newest checkpoint names the newest one before it; an unreadable
  config.toml, a model file that is a folder and a torch file of another kind are named
  as such; a blend whose first token file is readable records its tokenizer without a
  warning.
- The optimizer gives parameters of another device mesh or placement, and plain tensors,
  param groups of their own.
"""

import json
import os
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ep_fp8.train import checkpoint
from ep_fp8.train.checkpoint import (MARKER, CheckpointDamagedError, CheckpointMismatchError, Checkpointer,
                                     CheckpointSaveError, complete_checkpoints, load_weights)
from ep_fp8.train.data import DataLoader, MarkovSource
from ep_fp8.train.export import export_model, load_exported
from tests.train.test_checkpoint import _fail_rng_file_save, make_state, train_steps
from tests.train.test_export import _quiet
from tests.train.test_export_corners import _fake_run


# --- saving -------------------------------------------------------------------------------

def test_only_step_n_and_step_n_old_folders_count_as_checkpoints(tmp_path):
    # Names that merely begin like a checkpoint's are not one, marker or not.
    for name in ("step-1", "step-2.old", "step-3.old.tmp", "step-4.older", "step-5.tmp", "step-6x"):
        os.makedirs(tmp_path / name)
        (tmp_path / name / MARKER).write_text("{}")
    assert complete_checkpoints(str(tmp_path)) == [(1, str(tmp_path / "step-1")),
                                                   (2, str(tmp_path / "step-2.old"))]


def test_redoing_a_step_that_has_both_a_new_and_an_old_save_replaces_them(tmp_path):
    # A crash between a redo's two renames leaves step-N and step-N.old; the next redo of
    # step N (a run resumed again before it) must not fail on the old copy still there.
    ckpt = Checkpointer(str(tmp_path), keep_last=3)
    state = make_state(0)
    ckpt.save(2, *state)
    shutil.copytree(tmp_path / "step-2", tmp_path / "step-2.old")
    train_steps(state, 1)
    path = ckpt.save(2, *state)
    assert sorted(os.listdir(tmp_path)) == ["step-2"]
    fresh = make_state(1)
    ckpt.load(path, *fresh)
    assert all(torch.equal(v, state[0].state_dict()[k]) for k, v in fresh[0].state_dict().items())


def test_a_failed_save_gives_the_free_space_in_gib(tmp_path, monkeypatch):
    state = make_state(0)
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(1, *state)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10 * 2**30, 7 * 2**30, 3 * 2**30))
    _fail_rng_file_save(monkeypatch)
    with pytest.raises(CheckpointSaveError, match=r"\(3\.0 GiB free there\)"):
        ckpt.save(2, *state)


def test_a_write_that_torch_reports_as_a_runtime_error_is_a_named_save_error(tmp_path, monkeypatch):
    # torch.save reports a full disk as a RuntimeError ("unexpected pos"), not an OSError.
    state = make_state(0)
    ckpt = Checkpointer(str(tmp_path), keep_last=1)
    first = ckpt.save(1, *state)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if os.path.basename(str(getattr(f, "name", f))).startswith("rng-rank"):
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointSaveError, match=r"could not save step 2 .*rank 0: .*unexpected pos"):
        ckpt.save(2, *state)
    assert os.listdir(tmp_path) == ["step-1"] and ckpt.latest() == (1, first)


def test_an_old_copy_pruned_by_a_save_that_dies_midway_is_swept_by_the_next(tmp_path, monkeypatch):
    # A step-N.old (left by a crash while step N was redone) is pruned like step-N: renamed
    # to step-N.tmp first, so that what a death during its deletion leaves is swept away.
    ckpt = Checkpointer(str(tmp_path), keep_last=1)
    state = make_state(0)
    ckpt.save(1, *state)
    os.rename(tmp_path / "step-1", tmp_path / "step-1.old")
    real_rmtree = shutil.rmtree

    def killed_midway(path, ignore_errors=False):   # dies while deleting a checkpoint
        if os.path.isfile(os.path.join(path, MARKER)) and str(path).endswith(".tmp"):
            os.remove(os.path.join(path, MARKER))
            raise KeyboardInterrupt
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, *state)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert ckpt.latest() == (2, str(tmp_path / "step-2"))
    ckpt.save(3, *state)
    assert sorted(os.listdir(tmp_path)) == ["step-3"]


class _FakeCuda:
    """torch.cuda as the checkpoint module sees it on a GPU machine: its RNG state `state`;
    what it is set to is recorded in `restored`."""

    def __init__(self, state):
        self.state, self.restored = state, []

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_rng_state(self):
        return self.state.clone()

    def set_rng_state(self, state):
        self.restored.append(state)


class _TorchWithCuda:
    """The torch module with `cuda` replaced, for the checkpoint module's own calls only
    (DCP's stay on the CPU)."""

    def __init__(self, cuda):
        self.cuda = cuda

    def __getattr__(self, name):
        return getattr(torch, name)


def test_a_gpus_rng_state_is_saved_and_restored_with_the_cpus(tmp_path, monkeypatch):
    cuda = _FakeCuda(torch.tensor([7, 1, 2, 3], dtype=torch.uint8))
    monkeypatch.setattr(checkpoint, "torch", _TorchWithCuda(cuda))
    ckpt = Checkpointer(str(tmp_path))
    path = ckpt.save(1, *make_state(0))
    saved = torch.load(os.path.join(path, "rng-rank0.pt"), weights_only=True)
    assert set(saved) == {"cpu", "cuda"} and torch.equal(saved["cuda"], cuda.state)
    ckpt.load(path, *make_state(1))
    assert len(cuda.restored) == 1 and torch.equal(cuda.restored[0], cuda.state)


# --- loading ------------------------------------------------------------------------------

def test_the_loaders_whole_state_is_restored_and_another_data_source_is_noticed(tmp_path):
    saved = make_state(0)
    train_steps(saved, 2)
    path = Checkpointer(str(tmp_path)).save(2, *saved)
    same = make_state(1)
    Checkpointer(str(tmp_path)).load(path, *same)
    assert same[3].state_dict() == saved[3].state_dict() and same[3].resume_note == ""
    model, opt, sched, _ = make_state(1)
    other = DataLoader(MarkovSource(16, 2, 4, seed=1), batch_size=2, rank=0, world=1)
    assert other.state_dict()["source"] != saved[3].state_dict()["source"]
    Checkpointer(str(tmp_path)).load(path, model, opt, sched, other)
    assert other.samples_seen == 4
    assert "differs from the checkpoint's" in other.resume_note


@pytest.mark.parametrize("content", ["[1, 2]", "1", '"world_size"', "null"])
def test_a_marker_that_is_json_but_not_an_object_is_a_damaged_checkpoint(tmp_path, content):
    path = Checkpointer(str(tmp_path)).save(1, *make_state(0))
    with open(os.path.join(path, MARKER), "w") as f:
        f.write(content)
    with pytest.raises(CheckpointDamagedError, match="not a valid marker"):
        Checkpointer(str(tmp_path)).load(path, *make_state(1))
    with pytest.raises(CheckpointDamagedError, match="not a valid marker"):
        load_weights(path, make_state(1)[0])


def test_a_shard_that_is_not_a_readable_file_is_a_damaged_checkpoint(tmp_path):
    # Not only a missing file: any OSError reading a shard means damage, not a misfit.
    path = Checkpointer(str(tmp_path)).save(1, *make_state(0))
    shard = next(p for p in sorted(os.listdir(path)) if p.endswith(".distcp"))
    os.remove(os.path.join(path, shard))
    os.mkdir(os.path.join(path, shard))   # IsADirectoryError, an OSError but no FileNotFoundError
    with pytest.raises(CheckpointDamagedError, match=f"{path} is damaged"):
        Checkpointer(str(tmp_path)).load(path, *make_state(1))
    with pytest.raises(CheckpointDamagedError, match=f"{path} is damaged"):
        load_weights(path, make_state(1)[0])


def _damage_shard(path, how):
    """The first shard of checkpoint `path` cut to a fraction of its size, or overwritten."""
    shard = os.path.join(path, next(p for p in sorted(os.listdir(path)) if p.endswith(".distcp")))
    with open(shard, "rb") as f:
        data = f.read()
    if how == "overwritten":
        data = bytes(b ^ 0xA5 for b in data)
    elif how == "garbage":
        data = b"not a checkpoint shard\n" * 8
    else:
        data = data[:int(len(data) * how)]
    with open(shard, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("how", [0.0, 0.3, 0.5, 0.8, 0.999, "overwritten", "garbage"])
def test_a_shard_cut_short_or_overwritten_is_a_damaged_checkpoint_not_a_misfit(tmp_path, how):
    # A copy or a disk that failed: the error says to move the checkpoint away (resume) or
    # names the step before it (export), not that the model's config differs.
    ckpt = Checkpointer(str(tmp_path), keep_last=0)
    saved = make_state(0)
    ckpt.save(1, *saved)
    path = ckpt.save(2, *saved)
    _damage_shard(path, how)
    with pytest.raises(CheckpointDamagedError, match=f"{path} is damaged"):
        ckpt.load(path, *make_state(1))
    # load_weights reads the model's tensors only: their bytes lost, it is the same error;
    # only the optimizer's lost (a cut near the end), it loads the intact weights.
    model = make_state(1)[0]
    try:
        load_weights(path, model)
    except CheckpointDamagedError as e:
        assert f"{path} is damaged" in str(e)
    else:
        assert how in (0.8, 0.999)
        assert all(torch.equal(v, saved[0].state_dict()[k]) for k, v in model.state_dict().items())


class _Payload:
    """A pickled object of a class: what a tampered RNG file could hold."""


def test_an_rng_file_holding_a_pickled_object_is_refused_not_unpickled(tmp_path):
    path = Checkpointer(str(tmp_path)).save(1, *make_state(0))
    torch.save({"cpu": torch.get_rng_state(), "note": _Payload()}, os.path.join(path, "rng-rank0.pt"))
    with pytest.raises(CheckpointDamagedError, match="rank 0's RNG state could not be read"):
        Checkpointer(str(tmp_path)).load(path, *make_state(1))


def test_three_missing_tensors_are_all_named(tmp_path):
    saved = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    with warnings.catch_warnings():   # DCP's warning that it runs without a process group
        warnings.simplefilter("ignore")
        dcp.save({"model": saved.state_dict()}, checkpoint_id=str(tmp_path / "step-1"), no_dist=True)
    (tmp_path / "step-1" / MARKER).write_text(json.dumps({"step": 1, "world_size": 1}))
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2),
                                 torch.nn.Linear(2, 2, bias=False))
    with pytest.raises(CheckpointMismatchError,
                       match=r"it lacks tensors of this model: 2\.bias, 2\.weight, 3\.weight$"):
        load_weights(str(tmp_path / "step-1"), bigger)


# --- export -------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["metadata gone", "shard cut short"])
def test_a_damaged_newest_checkpoint_names_the_newest_one_before_it(tmp_path, damage):
    _fake_run(tmp_path / "run", steps=(1, 2, 3))
    if damage == "metadata gone":
        os.unlink(tmp_path / "run" / "checkpoints" / "step-3" / ".metadata")
    else:
        _damage_shard(str(tmp_path / "run" / "checkpoints" / "step-3"), 0.5)
    with pytest.raises(CheckpointDamagedError, match=r"step-3 is damaged: .*; --step 2 exports the one "
                                                     r"before it$"):
        export_model(str(tmp_path / "run"), str(tmp_path / "m.pt"), progress=_quiet)
    assert not (tmp_path / "m.pt").exists()


def test_a_run_whose_config_cannot_be_read_is_named(tmp_path):
    _fake_run(tmp_path / "run")
    (tmp_path / "run" / "config.toml").write_text("[model\n")
    with pytest.raises(ValueError, match="the run's config cannot be read"):
        export_model(str(tmp_path / "run"), str(tmp_path / "m.pt"), progress=_quiet)
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_model_file_that_is_a_folder_cannot_be_read(tmp_path):
    with pytest.raises(ValueError, match=r"model file '.*' cannot be read \(Is a directory\)"):
        load_exported(str(tmp_path))


def test_a_torch_file_of_another_kind_is_not_a_model_file(tmp_path):
    # A plain state dict, or torch's own conversion of a DCP checkpoint: a dict, no format.
    torch.save({"model": {"w": torch.zeros(2)}, "version": 2}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a model file of python -m ep_fp8.train.export"):
        load_exported(str(tmp_path / "other.pt"))



# --- optimizer ----------------------------------------------------------------------------

def test_parameters_of_other_meshes_or_placements_get_param_groups_of_their_own(tmp_path):
    # A foreach or fused AdamW step must not mix DTensors of different meshes or placements
    # (the experts' EP mesh, FSDP2's), nor DTensors and plain tensors. One process group of
    # one rank gives such DTensors here.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from ep_fp8.train.optim import build_optimizer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = torch.nn.Module()
        model.sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]))
        model.replicated = torch.nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Replicate()]))
        model.plain = torch.nn.Parameter(torch.randn(4, 4))
        model.vector = torch.nn.Parameter(distribute_tensor(torch.randn(4), mesh, [Shard(0)]))
        opt = build_optimizer(model, 1e-2, (0.9, 0.95), 0.1, 1e-8)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = sorted((sorted(names[id(p)] for p in g["params"]), g["weight_decay"])
                        for g in opt.param_groups)
        assert groups == [(["plain"], 0.1), (["replicated"], 0.1), (["sharded"], 0.1), (["vector"], 0.0)]
    finally:
        dist.destroy_process_group()
