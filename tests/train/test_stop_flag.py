"""Stopping a run by signal: the first SIGTERM or SIGINT asks the loop to finish the step,
save and stop; a second one ends the process by that signal at once; a SIGINT inherited
as ignored stays ignored; the handlers before come back after. And end to end, a Ctrl-C
on a single-process run saves a complete checkpoint and ends the process by SIGINT, so a
calling shell script stops too."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ep_fp8.train.loop import _StopFlag
from tests._paths import ROOT


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_flag_names_the_first_signal_and_restores_the_handlers(sig):
    before = {s: signal.getsignal(s) for s in _StopFlag.SIGNALS}
    with _StopFlag() as stop:
        assert stop.name == ""
        os.kill(os.getpid(), sig)
        _wait_for(lambda: stop.name)
        assert stop.name == sig.name
    assert {s: signal.getsignal(s) for s in _StopFlag.SIGNALS} == before


def _run_child(body: str, ignore_sigint: bool = False) -> subprocess.CompletedProcess:
    code = textwrap.dedent("""
        import os, signal, sys, time
        from ep_fp8.train.loop import _StopFlag
        with _StopFlag() as stop:
    """) + textwrap.indent(textwrap.dedent(body), "    ")
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=pre)


@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGINT), (signal.SIGINT, signal.SIGTERM),
                                           (signal.SIGTERM, signal.SIGINT)])
def test_a_second_signal_ends_the_process_by_that_signal(first, second):
    proc = _run_child(f"""
        os.kill(os.getpid(), {int(first)})
        while not stop.name:
            time.sleep(0.01)
        os.kill(os.getpid(), {int(second)})
        time.sleep(5)
        print("still running")
    """)
    assert proc.returncode == -second, (proc.returncode, proc.stdout, proc.stderr)
    assert "still running" not in proc.stdout
    assert f"{second.name} after {first.name}: ending now without saving" in proc.stderr


def test_an_inherited_ignored_sigint_stays_ignored():
    proc = _run_child("""
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)
        print("name:", repr(stop.name))
    """, ignore_sigint=True)
    assert proc.returncode == 0 and "name: ''" in proc.stdout, (proc.stdout, proc.stderr)


def _start_endless_run(tmp_path, min_lines: int, text: bool):
    """A single-process debug run with checkpoints on and no step limit, once its
    metrics.jsonl has `min_lines` lines: (process, metrics path)."""
    args = [sys.executable, "-m", "ep_fp8.train", "--config", str(ROOT / "train_configs/debug_model.toml"),
            f"--job.output_dir={tmp_path}", "--job.name=run", "--training.steps=100000",
            "--checkpoint.enabled=true", "--checkpoint.interval=100000", "--metrics.log_every=1",
            "--metrics.tensorboard=false"]
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text)
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and sum(1 for _ in metrics.open()) >= min_lines, timeout=120)
    return proc, metrics


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_ends_the_run_by_sigint(tmp_path):
    proc, metrics = _start_endless_run(tmp_path, min_lines=4, text=True)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT, err
    step = max(json.loads(line).get("step", 0) for line in metrics.open())
    assert f"stopped by SIGINT after step {step}" in out
    assert (tmp_path / "run" / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()


@pytest.mark.slow
def test_ctrl_c_with_the_output_pipe_closed_still_saves(tmp_path):
    # `run_train.sh | tee log`: the same Ctrl-C ends tee, so every later print meets a
    # closed pipe; the run must still finish its step and save.
    proc, metrics = _start_endless_run(tmp_path, min_lines=3, text=False)
    proc.stdout.close()                      # the reader of both pipes is gone
    proc.stderr.close()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == -signal.SIGINT
    step = max(json.loads(line).get("step", 0) for line in metrics.open())
    assert (tmp_path / "run" / "checkpoints" / f"step-{step}" / "COMPLETE").is_file()


def _wait_for(condition, timeout=5.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)
