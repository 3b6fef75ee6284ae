"""Metrics: the log line, the JSONL file (and TensorBoard when installed), MFU, and the
end-of-run summary. Only rank 0 prints and writes; docs/metrics.md explains each value.

JSONL schema, one object per line: first
  {"run": {"name", "config", "world_size", "device", "torch", "date"}}
then every `log_every` steps
  {"step", "loss", "grad_norm", "lr", "tokens_per_s", "tokens_per_s_per_gpu", "mfu",
   "peak_mem_gib", "load_imbalance", "time_s"}
and, with [validation] enabled, after each evaluation
  {"step", "val_loss"}.
A resumed run drops the lines of steps after its checkpoint and appends a new "run" line.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import time

import torch

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (half their "with sparsity"
# figures), by a word of the device name: the SXM parts (named "H100 80GB HBM3", "H200")
# 989 TFLOP/s, the PCIe H100 756, the NVL cards (H100 NVL, H200 NVL) 835. float8 runs are
# reported against the bf16 peak too, so their MFU compares directly.
H100_H200_BF16_PEAK_FLOPS = 989e12
_OTHER_FORMS_BF16_PEAK_FLOPS = {"PCIe": 756e12, "NVL": 835e12}

METRIC_KEYS = ("step", "loss", "grad_norm", "lr", "tokens_per_s", "tokens_per_s_per_gpu",
               "mfu", "peak_mem_gib", "load_imbalance", "time_s")


def peak_flops(device: torch.device, configured: float = 0.0) -> float:
    """FLOP/s that MFU divides by: `configured` when > 0, else the bf16 dense peak of an
    H100/H200 (SXM, PCIe or NVL by its name), else 0.0 (unknown GPU or CPU: MFU is then
    reported as 0.0)."""
    if configured > 0:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "H100" in name or "H200" in name:
            return next((peak for form, peak in _OTHER_FORMS_BF16_PEAK_FLOPS.items()
                         if form in name), H100_H200_BF16_PEAK_FLOPS)
    return 0.0


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by this process so far, GiB; 0.0 on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0


def format_line(r: dict, steps: int, mfu: bool = True, memory: bool = True) -> str:
    """One human-readable log line for a metrics record; `mfu` / `memory` False leave out
    values that are not measured here (no known peak; the CPU)."""
    return (f"step {r['step']:>{len(str(steps))}}/{steps}  loss {r['loss']:.4f}  "
            f"grad_norm {r['grad_norm']:.3f}  lr {r['lr']:.2e}  "
            f"tok/s {r['tokens_per_s']:,.0f} ({r['tokens_per_s_per_gpu']:,.0f}/rank)  "
            + (f"mfu {100 * r['mfu']:.1f}%  " if mfu else "")
            + (f"mem {r['peak_mem_gib']:.2f} GiB  " if memory else "")
            + f"imbalance {r['load_imbalance']:.2f}")


def _drop_steps_after(path: str, step: int) -> None:
    """Rewrite `path` without the records of steps > `step` (a resumed run redoes them),
    and without a line that is not JSON (the torn last line of a crash or a full disk)."""
    keep = []
    with open(path) as f:
        for ln in f:
            try:
                record = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", -1) <= step:
                keep.append(ln if ln.endswith("\n") else ln + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


class MetricsLogger:
    """Collects per-step values and, every `log_every` steps, turns them into a record that
    is printed and written (rank 0 only).

    `flops_per_token` is the training FLOPs per token (ep_fp8.model.flops_per_token);
    `peak` the FLOP/s MFU divides by (0: MFU 0.0); `tokens_per_step` the global tokens of
    one optimizer step.
    """

    def __init__(self, run_dir: str, *, rank: int, world: int, steps: int, log_every: int,
                 tokens_per_step: int, flops_per_token: float, peak: float,
                 device: torch.device, jsonl: bool = True, tensorboard: bool = True,
                 printer=print):
        self.rank, self.world, self.steps, self.log_every = rank, world, steps, log_every
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
        self.device, self.print = device, printer
        self.path = os.path.join(run_dir, "metrics.jsonl") if jsonl and rank == 0 else None
        self.records: list[dict] = []
        self._tb, self._tb_dir = None, os.path.join(run_dir, "tb") if tensorboard else None
        self._start = time.perf_counter()
        self._window_start, self._window_steps = self._start, 0
        self._windows: list[tuple[int, float]] = []   # (steps, seconds) of each logged window
        self._imbalance: list[float] = []
        self._resumed_step = 0
        self.val_records: list[dict] = []

    def start(self, name: str, config: dict, resumed_step: int) -> None:
        """Write the "run" record (after dropping the lines a resumed run will redo), then
        start the clock."""
        self._resumed_step = resumed_step
        try:
            self._open(name, config, resumed_step)
        finally:  # time_s and the first window count from here: setup excluded
            self._start = self._window_start = time.perf_counter()

    def _open(self, name: str, config: dict, resumed_step: int) -> None:
        if self.rank != 0:
            return
        if self._tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(self._tb_dir, purge_step=resumed_step + 1)
            except ImportError:
                self.print("metrics: tensorboard is not installed; writing JSONL only")
        if self.path is None:
            return
        if resumed_step > 0 and os.path.exists(self.path):
            _drop_steps_after(self.path, resumed_step)
        elif os.path.exists(self.path):
            os.remove(self.path)   # a fresh run in an old folder starts a fresh file
        run = {"name": name, "config": config, "world_size": self.world,
               "device": str(self.device) if self.device.type == "cpu"
               else torch.cuda.get_device_name(self.device),
               "torch": torch.__version__,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        if resumed_step > 0:
            run["resumed_from_step"] = resumed_step
        self._write({"run": run})

    @contextlib.contextmanager
    def paused(self):
        """The time spent inside (a checkpoint save) is left out of tokens/s and MFU; it
        still counts in time_s."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self._window_start += time.perf_counter() - begin

    def close(self) -> None:
        """Flushes and closes TensorBoard's writer (also done by summary); idempotent."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _write(self, obj: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(obj) + "\n")

    def step(self, step: int, loss: float, grad_norm: float, lr: float,
             load_imbalance: float, last: bool = False) -> dict | None:
        """Record one optimizer step; returns the record on a log step (every log_every-th,
        the run's final step, and `last`: a step the run stops after early), else None."""
        self._window_steps += 1
        self._imbalance.append(load_imbalance)
        if step % self.log_every != 0 and step != self.steps and not last:
            return None
        now = time.perf_counter()
        seconds = max(now - self._window_start, 1e-9)
        self._windows.append((self._window_steps, seconds))
        tokens_per_s = self.tokens_per_step * self._window_steps / seconds
        per_rank = tokens_per_s / self.world
        record = {
            "step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
            "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": per_rank,
            "mfu": self.flops_per_token * per_rank / self.peak if self.peak > 0 else 0.0,
            "peak_mem_gib": peak_memory_gib(self.device),
            "load_imbalance": sum(self._imbalance) / len(self._imbalance),
            "time_s": now - self._start,
        }
        self._window_start, self._window_steps, self._imbalance = now, 0, []
        self.records.append(record)
        if self.rank == 0:
            self.print(format_line(record, self.steps, mfu=self.peak > 0,
                                   memory=self.device.type == "cuda"))
            if self.path is not None:
                self._write(record)
            if self._tb is not None:
                for key in METRIC_KEYS[1:]:
                    self._tb.add_scalar(f"train/{key}", record[key], step)
        return record

    def validation(self, step: int, val_loss: float) -> dict:
        """Record one evaluation on held-out data (rank 0 prints and writes it)."""
        record = {"step": step, "val_loss": val_loss}
        self.val_records.append(record)
        if self.rank == 0:
            self.print(f"step {step:>{len(str(self.steps))}}/{self.steps}  val_loss {val_loss:.4f}")
            if self.path is not None:
                self._write(record)
            if self._tb is not None:
                self._tb.add_scalar("val/loss", val_loss, step)
        return record

    def summary(self, *, stopped: str = "", entropy: float | None = None,
                checkpoint: str | None = None) -> str:
        """The end-of-run summary text. Throughput is the tokens of the log windows over
        their time, leaving out the first window (compile, warm-up) when there is more
        than one."""
        self.close()
        r = self.records
        if not r:
            return "summary: no step was logged"
        steady = self._windows[1:] if len(self._windows) > 1 else self._windows
        tokens_per_s = (self.tokens_per_step * sum(n for n, _ in steady)
                        / sum(seconds for _, seconds in steady))
        per_rank = tokens_per_s / self.world
        mfu = self.flops_per_token * per_rank / self.peak if self.peak > 0 else 0.0
        ran = f"in {r[-1]['time_s']:.1f} s"
        if self._resumed_step:  # the records and the clock are this session's
            ran = (f"({r[-1]['step'] - self._resumed_step} in {r[-1]['time_s']:.1f} s, resumed "
                   f"from step {self._resumed_step})")
        lines = [
            "=" * 72,
            f"summary: {r[-1]['step']}/{self.steps} steps {ran}" + (f" ({stopped})" if stopped else ""),
            f"  loss        first logged{' this session' if self._resumed_step else ''} "
            f"{r[0]['loss']:.4f}  last {r[-1]['loss']:.4f}  best {min(x['loss'] for x in r):.4f}",
        ]
        if v := self.val_records:
            lines.append(f"  validation  val_loss at step {v[-1]['step']} {v[-1]['val_loss']:.4f}"
                         f"  best{' this session' if self._resumed_step else ''} "
                         f"{min(x['val_loss'] for x in v):.4f}")
        if entropy is not None:
            lines.append(f"  data        entropy floor {entropy:.4f} nats/token; last loss is "
                         f"{r[-1]['loss'] - entropy:+.4f} above it")
        lines += [
            f"  throughput  {tokens_per_s:,.0f} tok/s  ({per_rank:,.0f} per rank)  "
            + (f"mfu {100 * mfu:.1f}% of {self.peak / 1e12:.0f} TFLOP/s bf16"
               if self.peak > 0 else "mfu n/a (no known peak for this device)"),
            f"  memory      peak {max(x['peak_mem_gib'] for x in r):.2f} GiB"
            + ("" if self.device.type == "cuda" else " (GPU memory; 0 on CPU)"),
            f"  experts     load imbalance (max/mean tokens) last {r[-1]['load_imbalance']:.2f}",
        ]
        if self.path:
            lines.append(f"  metrics     {self.path}")
        if checkpoint:
            lines.append(f"  checkpoint  {checkpoint}")
        lines.append("=" * 72)
        return "\n".join(lines)
