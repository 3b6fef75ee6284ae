"""A run that starts from step 0 in the folder of an earlier run without checkpoints keeps
that run's files (config.toml, metrics.jsonl) rather than overwriting them."""

import json
import os
import subprocess
import sys

import pytest

from tests._paths import ROOT


def _run(tmp_path, *overrides):
    args = [sys.executable, "-m", "ep_fp8.train", "--config", str(ROOT / "train_configs/debug_model.toml"),
            f"--job.output_dir={tmp_path}", "--job.name=run", "--training.steps=2",
            "--metrics.log_every=1", "--metrics.tensorboard=false", *overrides]
    done = subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_a_second_run_under_the_same_name_moves_the_first_runs_files_aside(tmp_path):
    _run(tmp_path, "--optimizer.lr=1e-3")
    run = tmp_path / "run"
    first = (run / "metrics.jsonl").read_text()
    out = _run(tmp_path, "--optimizer.lr=2e-3")
    [kept] = (run / "earlier-runs").iterdir()
    assert f"moved to {kept}" in out, out
    assert (kept / "metrics.jsonl").read_text() == first
    assert "lr = 0.001" in (kept / "config.toml").read_text()
    assert "lr = 0.002" in (run / "config.toml").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["run"]["config"]["optimizer"]["lr"] == 2e-3 and records[-1]["step"] == 2
