"""Checkpoints whose files are damaged: a shard cut short or overwritten is a damaged
checkpoint (CheckpointDamagedError, whose hints say to move the checkpoint away or export
the one before it), not a misfit (CheckpointMismatchError, whose hint is to resume with
the config the run was saved with)."""

import os

import pytest
import torch

from ep_fp8.train.checkpoint import CheckpointDamagedError, Checkpointer, load_weights
from tests.train.test_checkpoint import make_state


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
