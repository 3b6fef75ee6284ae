"""The shell launchers: argument checks that run before torchrun starts."""
import os
import subprocess

import pytest

from .conftest import SCRIPTS


@pytest.mark.parametrize("ngpu", ["0", "abc", "-1", "2x"])
def test_run_train_rejects_an_ngpu_that_is_not_a_positive_integer(ngpu):
    proc = subprocess.run(["bash", str(SCRIPTS / "run_train.sh"), "--training.steps=1"],
                          env={**os.environ, "NGPU": ngpu}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"NGPU must be a positive integer (processes to start), got '{ngpu}'" in proc.stderr
