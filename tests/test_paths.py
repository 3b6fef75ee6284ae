"""ep_fp8.paths: the output-path check that configs and scripts run before any work."""

import os

import pytest

from ep_fp8.paths import output_path_problem


def test_a_new_file_or_folder_under_missing_folders_can_be_written(tmp_path):
    assert output_path_problem(str(tmp_path / "a" / "b" / "out.json")) == ""
    assert output_path_problem(str(tmp_path / "a" / "b"), folder=True) == ""
    (tmp_path / "old.json").write_text("{}")
    assert output_path_problem(str(tmp_path / "old.json")) == ""     # overwritten
    assert output_path_problem(str(tmp_path), folder=True) == ""


def test_a_path_under_a_file_or_of_the_other_kind_is_named(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    assert output_path_problem(str(tmp_path / "notes.md" / "out.json")) == (
        f"cannot be made: {str(tmp_path / 'notes.md')!r} is a file, not a folder")
    assert output_path_problem(str(tmp_path)) == "cannot be written: it is a folder, not a file"
    assert output_path_problem(str(tmp_path / "notes.md"), folder=True) == (
        "cannot be written: it is a file, not a folder")
    # A file's name ending with '/' (not yet a folder): not a file with the slash dropped.
    assert output_path_problem(str(tmp_path / "new") + "/") == (
        "cannot be written: it ends with a '/', which names a folder, not a file")
    assert output_path_problem(str(tmp_path / "new") + "/", folder=True) == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_without_write_permission_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "no write permission" in output_path_problem(str(locked / "out.json"))
