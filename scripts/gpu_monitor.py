"""GPU clock and power while a benchmark runs: nvidia-smi sampled into a file beside its
JSON (GpuMonitor), and the samples summarized (summarize_gpu_samples). The H200 runs large
GEMMs at its power limit, which lowers its clocks; these samples show by how much."""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
from pathlib import Path

import torch

GPU_FIELDS = "clocks.sm,clocks.max.sm,power.draw,power.limit,clocks_event_reasons.active"
POWER_CAP_BITS = 0x4 | 0x80  # clock event reasons: software power cap, hardware power brake


def summarize_gpu_samples(lines: list[str]) -> dict | None:
    """nvidia-smi CSV lines of GPU_FIELDS ('1650 MHz, 1980 MHz, 693.29 W, 700.00 W,
    0x0000000000000004') -> {n, sm_mhz_median, sm_mhz_min, sm_mhz_max_rated, power_w_median,
    power_limit_w, power_capped}: power_capped is the fraction of samples whose clocks were
    held down by the power cap. Lines that do not parse are skipped; None without any."""
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 5:
            continue
        try:
            sm, sm_max = (float(c.split()[0]) for c in cells[:2])
            power, limit = (float(c.split()[0]) for c in cells[2:4])
            reasons = int(cells[4], 16)
        except (ValueError, IndexError):
            continue
        rows.append((sm, sm_max, power, limit, reasons))
    if not rows:
        return None
    median = statistics.median
    return {"n": len(rows), "sm_mhz_median": median([r[0] for r in rows]),
            "sm_mhz_min": min(r[0] for r in rows), "sm_mhz_max_rated": rows[0][1],
            "power_w_median": median([r[2] for r in rows]), "power_limit_w": rows[0][3],
            "power_capped": sum(1 for r in rows if r[4] & POWER_CAP_BITS) / len(rows)}


def nvidia_smi_id(cuda_index: int, visible: str | None) -> str:
    """The id nvidia-smi knows CUDA device cuda_index by: its entry in CUDA_VISIBLE_DEVICES
    (an index or a GPU-... UUID) when that is set, else the index itself."""
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    return entries[cuda_index] if cuda_index < len(entries) else str(cuda_index)


def _this_gpu_for_nvidia_smi() -> str:
    """The current CUDA device as nvidia-smi's -i wants it: by UUID (CUDA's and
    nvidia-smi's device orders can differ), else through CUDA_VISIBLE_DEVICES."""
    index = torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid:
        text = str(uuid)
        return text if text.startswith("GPU-") else f"GPU-{text}"
    return nvidia_smi_id(index, os.environ.get("CUDA_VISIBLE_DEVICES"))


def _parent_death_signal():
    """A preexec_fn for Popen that has the child sent SIGTERM when this process dies, even by
    SIGKILL (Linux prctl PR_SET_PDEATHSIG), or None where there is no prctl. Looked up
    here, in the parent: the child only makes the call."""
    try:
        import ctypes
        import signal

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)


class GpuMonitor:
    """Samples the GPU's SM clock, power and clock event reasons with nvidia-smi every
    0.5 s into a file while the benchmark runs; take() returns the samples since the last
    call, summarized (summarize_gpu_samples). Without nvidia-smi there are no samples."""

    def __init__(self, path: Path):
        self.path, self.proc, self.seen = path, None, 0
        cmd = ["nvidia-smi", f"--query-gpu={GPU_FIELDS}", "--format=csv,noheader", "-lms", "500",
               "-i", _this_gpu_for_nvidia_smi()]
        if shutil.which("stdbuf"):  # line-buffered, so that take() sees each sample at once
            cmd = ["stdbuf", "-oL"] + cmd
        try:
            with path.open("w") as f:
                self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.DEVNULL,
                                             preexec_fn=_parent_death_signal())
        except OSError:
            self.proc = None

    def take(self) -> dict | None:
        if self.proc is None:
            return None
        text = self.path.read_text()
        lines = text[:text.rfind("\n") + 1].splitlines()  # whole lines only: the last may be half written
        new, self.seen = lines[self.seen:], len(lines)
        return summarize_gpu_samples(new)

    def take_all(self) -> dict | None:
        """The summary of every sample of the run."""
        if self.proc is None or not self.path.exists():
            return None
        return summarize_gpu_samples(self.path.read_text().splitlines())

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
