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


def test_slurm_script_sends_the_early_sigterm_to_the_torchrun_agents():
    # For the batch shell (B:TERM) the signal would have to go through srun, which turns a
    # SIGTERM into SIGKILL for its tasks: the workers would never save.
    text = (SCRIPTS / "run_multinode.slurm").read_text()
    directives = [line.split()[1] for line in text.splitlines() if line.startswith("#SBATCH --signal")]
    assert directives == ["--signal=TERM@300"]
    proc = subprocess.run(["bash", "-n", str(SCRIPTS / "run_multinode.slurm")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
