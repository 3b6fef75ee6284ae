"""Metrics: corners of the resume truncation, the rank-0-only writes and TensorBoard."""

import json
import os

import pytest

from ep_fp8.train import metrics
from tests.train.test_metrics import make, read


def _logged(tmp_path, steps, **kw):
    m = make(tmp_path, log_every=1, **kw)
    m.start("a", {}, resumed_step=0)
    for step in range(1, steps + 1):
        m.step(step, 1.0, 0.0, 0.0, 1.0)
    return m


def test_a_last_line_cut_just_before_its_newline_is_kept_on_a_line_of_its_own(tmp_path):
    _logged(tmp_path, 2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}))   # the write of "\n" never happened
    make(tmp_path, log_every=1).start("a", {}, resumed_step=3)
    lines = read(tmp_path)
    assert [r.get("step") for r in lines] == [None, 1, 2, 3, None]
    assert lines[-1]["run"]["resumed_from_step"] == 3


def test_a_failure_while_truncating_leaves_the_metrics_file_as_it_was(tmp_path, monkeypatch):
    _logged(tmp_path, 5)
    before = (tmp_path / "metrics.jsonl").read_text()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        make(tmp_path, log_every=1).start("a", {}, resumed_step=3)
    assert (tmp_path / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("line", ["5", "[1, 2]", '"text"', "null"])
def test_a_line_of_json_that_is_not_a_record_is_dropped_on_resume(tmp_path, line):
    _logged(tmp_path, 2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(line + "\n")
    make(tmp_path, log_every=1).start("a", {}, resumed_step=2)
    assert [r.get("step") for r in read(tmp_path)] == [None, 1, 2, None]


def test_a_resume_purges_tensorboard_from_the_first_redone_step(tmp_path, tensorboard):
    make(tmp_path, tensorboard=True).start("a", {}, resumed_step=40)
    assert tensorboard[0] == ("open", str(tmp_path / "tb"), 41)


def test_only_rank_0_opens_tensorboard(tmp_path, tensorboard):
    m = make(tmp_path, rank=1, tensorboard=True, log_every=1)
    m.start("a", {}, resumed_step=0)
    m.step(1, 1.0, 0.0, 0.0, 1.0)
    m.validation(1, 2.0)
    m.summary()
    assert tensorboard == [] and not os.path.exists(tmp_path / "metrics.jsonl")


def test_a_failure_to_write_the_run_line_is_raised(tmp_path):
    m = make(tmp_path / "missing-folder")
    with pytest.raises(OSError):
        m.start("a", {}, resumed_step=0)


def test_without_tensorboard_installed_a_note_is_printed_and_jsonl_written(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails
    printed = []
    m = make(tmp_path, tensorboard=True, printer=printed.append, log_every=1)
    m.start("a", {}, resumed_step=0)
    m.step(1, 1.0, 0.0, 0.0, 1.0)
    assert any("tensorboard is not installed" in p for p in printed)
    assert [r.get("step") for r in read(tmp_path)] == [None, 1]


def test_validation_records_go_to_the_file_and_a_resume_drops_the_redone_ones(tmp_path):
    m = _logged(tmp_path, 4)
    m.validation(2, 3.5)
    m.validation(4, 3.0)
    make(tmp_path, log_every=1).start("a", {}, resumed_step=3)
    lines = read(tmp_path)
    assert {"step": 2, "val_loss": 3.5} in lines
    assert all(r.get("step", 0) <= 3 for r in lines)


def test_a_resume_leaves_no_temporary_file_in_the_run_folder(tmp_path):
    _logged(tmp_path, 4)
    make(tmp_path, log_every=1).start("a", {}, resumed_step=2)
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
