"""scripts/gpu_monitor.py without a GPU: which clock event reasons count as the power cap,
the whole-run summary, the id nvidia-smi gets, and a machine without nvidia-smi."""
import subprocess
import types

import pytest
import torch

CAPPED, FREE = "1500 MHz, 1980 MHz, 700 W, 700 W, {}", "1980 MHz, 1980 MHz, 300 W, 700 W, {}"


def test_both_power_cap_reasons_count_and_no_other(gpu_monitor):
    lines = [CAPPED.format("0x0000000000000004"),   # software power cap
             CAPPED.format("0x0000000000000080"),   # hardware power brake
             FREE.format("0x0000000000000001"),     # idle
             FREE.format("0x0000000000000020")]     # software thermal slowdown
    assert gpu_monitor.summarize_gpu_samples(lines)["power_capped"] == 0.5


def _monitor(gpu_monitor, path):
    monitor = gpu_monitor.GpuMonitor.__new__(gpu_monitor.GpuMonitor)  # its file fed by hand
    monitor.path, monitor.proc, monitor.seen = path, object(), 0
    return monitor


def test_take_all_summarizes_every_sample_also_after_take(gpu_monitor, tmp_path):
    monitor = _monitor(gpu_monitor, tmp_path / "s.csv")
    monitor.path.write_text(CAPPED.format("0x4") + "\n" + FREE.format("0x0") + "\n")
    assert monitor.take()["n"] == 2
    monitor.path.write_text(monitor.path.read_text() + FREE.format("0x0") + "\n")
    whole = monitor.take_all()
    assert whole["n"] == 3 and whole["sm_mhz_min"] == 1500 and whole["power_capped"] == pytest.approx(1 / 3)
    monitor.path.unlink()
    assert monitor.take_all() is None


@pytest.mark.parametrize("uuid, visible, expected", [
    ("8f3a0c2e-1111", "3,5", "GPU-8f3a0c2e-1111"), ("GPU-8f3a", None, "GPU-8f3a"),
    (None, "3,5", "5"), (None, None, "1")])
def test_nvidia_smi_gets_the_current_gpu_by_uuid_else_its_visible_index(
        gpu_monitor, monkeypatch, uuid, visible, expected):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(uuid=uuid))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_monitor._this_gpu_for_nvidia_smi() == expected


def test_without_nvidia_smi_the_monitor_has_no_samples(gpu_monitor, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))      # neither nvidia-smi nor stdbuf
    monkeypatch.setattr(gpu_monitor, "_this_gpu_for_nvidia_smi", lambda: "0")
    monitor = gpu_monitor.GpuMonitor(tmp_path / "samples.csv")
    assert monitor.proc is None and monitor.take() is None and monitor.take_all() is None
    monitor.close()


class FakeProc:
    def __init__(self, running, stubborn=False):
        self.running, self.stubborn, self.calls = running, stubborn, []

    def poll(self):
        return None if self.running else 0

    def terminate(self):
        self.calls.append("terminate")

    def wait(self, timeout):
        self.calls.append("wait")
        if self.stubborn:
            raise subprocess.TimeoutExpired("nvidia-smi", timeout)

    def kill(self):
        self.calls.append("kill")


@pytest.mark.parametrize("running, stubborn, calls", [
    (True, False, ["terminate", "wait"]), (True, True, ["terminate", "wait", "kill"]),
    (False, False, [])])
def test_close_ends_a_running_sampler_and_kills_one_that_stays(gpu_monitor, tmp_path,
                                                               running, stubborn, calls):
    monitor = _monitor(gpu_monitor, tmp_path / "s.csv")
    monitor.proc = FakeProc(running, stubborn)
    monitor.close()
    assert monitor.proc.calls == calls


def test_medians_of_an_even_number_of_samples_are_the_mean_of_the_middle_two(gpu_monitor):
    lines = ["1000 MHz, 1980 MHz, 300 W, 700 W, 0x0", "2000 MHz, 1980 MHz, 700 W, 700 W, 0x0"]
    summary = gpu_monitor.summarize_gpu_samples(lines)
    assert summary["sm_mhz_median"] == 1500 and summary["power_w_median"] == 500
