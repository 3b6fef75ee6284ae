"""The training loop's stop flag: SIGTERM or a first SIGINT asks the loop to finish the
step, save and stop; a second SIGINT aborts at once; the old handlers come back after."""

import os
import signal
import time

import pytest

from ep_fp8.train.loop import _StopFlag


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_flag_names_the_first_signal_and_restores_the_handlers(sig):
    before = {s: signal.getsignal(s) for s in _StopFlag.SIGNALS}
    with _StopFlag() as stop:
        assert stop.name == ""
        os.kill(os.getpid(), sig)
        _wait_for(lambda: stop.name)
        assert stop.name == sig.name
        os.kill(os.getpid(), signal.SIGTERM)  # a later SIGTERM does not rename the stop
        time.sleep(0.05)
        assert stop.name == sig.name
    assert {s: signal.getsignal(s) for s in _StopFlag.SIGNALS} == before


def test_a_second_sigint_aborts_at_once():
    with pytest.raises(KeyboardInterrupt):
        with _StopFlag() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: stop.name)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler raises in the main thread before this ends
            pytest.fail("the second SIGINT did not abort")


def _wait_for(condition, timeout=5.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting for the signal handler"
        time.sleep(0.01)
