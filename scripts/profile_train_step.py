"""Where one training step's GPU time goes: torch.profiler over a few steps of a recipe.

    torchrun --standalone --nproc-per-node=1 scripts/profile_train_step.py \
        --config train_configs/moe_1b_h200.toml [--section.key=value ...] \
        [--warmup 5] [--steps 3] [--out profile.json] [--trace trace.json] [--host 25]

Builds the model, optimizer and data exactly as the training loop does and runs its steps
(the router bias update and the loss all-reduce included): `--warmup` steps, `--steps`
timed steps (the wall time per step, unprofiled), then `--steps` profiled steps. Prints GPU
kernel time per step by category:
expert GEMMs (CUTLASS grouped kernels and the op's zeroing of rows past the last group),
dense GEMMs (attention projections, dense FFN, output head), attention (SDPA kernels),
float8 quantization (ep_fp8's Triton quant kernels), dispatch (ep_fp8's index and row
kernels, index ops, all-to-all), optimizer (foreach/fused AdamW and norms), the other
collectives (FSDP2's all-gathers and reduce-scatters) and everything else (elementwise,
norms, reductions). NCCL kernels overlap compute on their own stream and count the time
they wait for other ranks.
Categories come from kernel names, so they are a guide, not an exact accounting.

`--host N` also says whether the host or the GPU bounds the step, and where the host time
goes: how long the host waits at each unprofiled step's read (the GPU's lead), the GPU's
busy time per step (the union of its kernels over all streams) against the unprofiled
wall time, the GPU's idle gaps grouped by the kernels on either side of them, the host
synchronisations of one step (torch.cuda's sync debug mode), and the N Python functions
with the most own time (and with their callees) over `--steps` more steps under
cProfile. On a power-capped GPU the profiled kernels run at higher clocks than unprofiled
ones (the profiler slows the host, the GPU idles and cools), so wall minus busy time
overstates the GPU's idle time. A wait at the read shows that the GPU was still behind
the host when the step ended (not whether it idled earlier in the step).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from ep_fp8.paths import output_path_problem

# Order matters: the first category whose patterns match a kernel name takes it.
CATEGORIES = [
    ("float8 quantization", ("_quant", "_weight_fwd", "_weight_bwd_cast", "_cols_amax", "_cols_cast",
                             "quant_")),
    # NCCL kernels run on their own stream and their time includes waiting for the peers:
    # the all-to-alls (SendRecv) belong to dispatch, the other collectives are FSDP2's
    # all-gathers and reduce-scatters and the loop's small all-reduces.
    ("dispatch", ("_group_indices", "_scatter_rows", "_gather_rows", "SendRecv", "alltoall",
                  "index", "scatter", "gather", "sort", "histc", "bincount", "cumsum", "topk")),
    ("other collectives (FSDP2)", ("nccl",)),
    # The grouped matmul op zeroes the rows past the last group of its outputs (bf16 too).
    ("expert GEMMs", ("grouped", "cutlass", "Grouped", "_zero_rows")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("dense GEMMs", ("gemm", "nvjet", "xmma", "cublas", "sm90_", "matmul")),
    ("optimizer", ("adam", "Adam", "multi_tensor", "foreach", "lerp", "_amp_")),
]


def categorize(name: str) -> str:
    for category, patterns in CATEGORIES:
        if any(p in name for p in patterns):
            return category
    return "other"


def summarize(events, steps: int) -> list[dict]:
    """Kernel events (name, device time in us) -> rows {category, ms_per_step, share, top}."""
    per_cat: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    for name, us in events:
        per_cat[categorize(name)] += us
        per_kernel[name] += us
    total = sum(per_cat.values()) or 1.0
    rows = []
    for cat, us in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        top = sorted(((n, t) for n, t in per_kernel.items() if categorize(n) == cat), key=lambda kv: -kv[1])[:3]
        rows.append({"category": cat, "ms_per_step": us / 1e3 / steps, "share": us / total,
                     "top_kernels": [{"name": n[:120], "ms_per_step": t / 1e3 / steps} for n, t in top]})
    return rows


def format_rows(rows: list[dict]) -> str:
    width = max(len(name) for name, _ in CATEGORIES)
    lines = [f"{'category':<{width}} {'ms/step':>9} {'share':>7}   largest kernel"]
    for r in rows:
        top = r["top_kernels"][0]["name"][:60] if r["top_kernels"] else ""
        lines.append(f"{r['category']:<{width}} {r['ms_per_step']:>9.2f} {100 * r['share']:>6.1f}%   {top}")
    lines.append(f"{'total GPU kernel time':<{width}} {sum(r['ms_per_step'] for r in rows):>9.2f}")
    return "\n".join(lines)


def kernel_events(prof) -> list:
    """The profiler's GPU kernel, copy and memset events. GPU-side user annotations (e.g.
    "Optimizer.step#AdamW.step") span kernels that are listed too: counting them would
    count that time twice."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False) and "#" not in e.name]


def busy_and_gaps(kernels, min_gap_us: float = 20.0) -> tuple[float, list[tuple[float, str, str]]]:
    """Kernel intervals (start us, end us, name), on any streams -> (the length of their
    union in us, the gaps of at least `min_gap_us` between the union's pieces as (gap us,
    the kernel that ends before it, the kernel that starts after it))."""
    busy, gaps = 0.0, []
    cur_start = cur_end = None
    last_name = ""
    for start, end, name in sorted(kernels):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
                if start - cur_end >= min_gap_us:
                    gaps.append((start - cur_end, last_name, name))
            cur_start, cur_end = start, end
            last_name = name
        elif end > cur_end:
            cur_end, last_name = end, name
    if cur_end is not None:
        busy += cur_end - cur_start
    return busy, gaps


def format_gaps(gaps, steps: int, top: int = 12) -> str:
    """The gaps of busy_and_gaps, summed per (kernel before, kernel after), largest first."""
    per_pair: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for us, before, after in gaps:
        pair = per_pair[(before[:48], after[:48])]
        pair[0] += us
        pair[1] += 1
    lines = [f"{'ms/step':>8} {'gaps':>5}   kernel before -> kernel after"]
    for (before, after), (us, n) in sorted(per_pair.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{us / 1e3 / steps:>8.2f} {n / steps:>5.0f}   {before} -> {after}")
    return "\n".join(lines)


@contextlib.contextmanager
def timed_host_reads(waits: list[float]):
    """Appends to `waits` the seconds each Tensor.tolist() inside takes. The training
    step's read is its last: there, how long the host waits for the GPU to finish."""
    tolist = torch.Tensor.tolist

    def timed(tensor):
        start = time.perf_counter()
        try:
            return tolist(tensor)
        finally:
            waits.append(time.perf_counter() - start)

    torch.Tensor.tolist = timed
    try:
        yield waits
    finally:
        torch.Tensor.tolist = tolist


def host_wait_line(waits_ms: list[float], wall_ms: float) -> str:
    """--host's sentence on the host's wait at each step's read (`waits_ms`, unprofiled
    steps) against the unprofiled wall time per step: the GPU was behind the host when
    the median wait is 5% of a step or more, else the host set the pace."""
    waits = sorted(waits_ms)
    mid = statistics.median(waits)
    line = (f"unprofiled, the host waited {mid:.1f} ms (median; {waits[0]:.1f} to "
            f"{waits[-1]:.1f}) at each step's read for the GPU to finish: ")
    if mid >= 0.05 * wall_ms:
        line += "the GPU was still behind the host when each step ended, so the GPU bounds the step."
    else:
        line += ("the GPU had caught up by then, so the host (launching kernels, drawing data) "
                 "bounds the step.")
    return line + (" The profiled kernel times above ran at the clocks of a GPU the profiler "
                   "slows down: on a power-capped GPU those are higher than in unprofiled "
                   "steps, so wall minus busy overstates the idle time.")


def host_report(step, events, steps: int, wall_ms: float, read_waits: list[float], top: int,
                show: bool = True) -> None:
    """Prints (if `show`) where a step's host time goes (see --host in the module
    docstring), from the kernel_events of `steps` profiled steps; runs 1 + `steps` more
    steps."""
    import cProfile
    import io
    import pstats
    import warnings

    busy_us, gaps = busy_and_gaps([(e.time_range.start, e.time_range.end, e.name) for e in events])
    busy_ms = busy_us / 1e3 / steps
    say = print if show else (lambda *a, **k: None)
    say(f"GPU busy {busy_ms:.1f} ms/step (union of kernels), unprofiled wall {wall_ms:.1f} ms/step: "
        f"idle {wall_ms - busy_ms:.1f} ms/step; in the profiled steps, gaps of 20 us or more "
        f"{sum(g for g, _, _ in gaps) / 1e3 / steps:.1f} ms/step:")
    say(format_gaps(gaps, steps))
    if read_waits:
        say(host_wait_line([1e3 * w for w in read_waits], wall_ms))

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    say(f"host synchronisations in one step: {len(syncs)}")
    for w in syncs[:10]:
        say(f"  {w.filename}:{w.lineno}")

    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    for key, what in (("tottime", "own time"), ("cumulative", "time with their callees")):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(top)
        say(f"host: the {top} functions with the most {what} over {steps} steps (cProfile):")
        say(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    from ep_fp8.train.config import ConfigError, load_config
    from ep_fp8.train.data import DataLoader, build_source
    from ep_fp8.train.loop import (build_model, build_optimizer_and_scheduler, loop_step, resolve_device,
                                   resolve_dtype)
    from ep_fp8.train.main import init_distributed, parse_cli

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Also --config FILE (the training TOML, required) and --section.key=value "
               "overrides, as for python -m ep_fp8.train.")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", help="write the summary as JSON here")
    parser.add_argument("--trace", help="write a Chrome trace here")
    parser.add_argument("--host", type=int, default=0, metavar="N",
                        help="also report host time: GPU idle gaps, host syncs, the N largest "
                             "Python functions by own time")
    ours, rest = parser.parse_known_args(argv)
    if ours.warmup < 1 or ours.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if ours.host < 0:
        parser.error("--host must be 0 (off) or a number of functions to list")
    for flag, path in (("--out", ours.out), ("--trace", ours.trace)):
        if path and (problem := output_path_problem(path)):
            parser.error(f"{flag} {path!r} {problem}")
    try:
        path, overrides = parse_cli(rest)
        # Writes nothing in the run's folder: its checks (an earlier run's checkpoints there,
        # say) do not apply.
        cfg = load_config(path, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")),
                          run_folder=False)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    device = resolve_device(cfg)
    if device.type != "cuda":
        print("profile_train_step.py profiles GPU kernels: it needs a CUDA device", file=sys.stderr)
        return 2
    init_distributed(device.type)
    rank, world = dist.get_rank(), dist.get_world_size()
    t = cfg.training
    try:  # before the model: a data file that does not hold what [data] asks stops it early
        source = build_source(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    model, _, _ = build_model(cfg, device, resolve_dtype(cfg, device))
    optimizer, scheduler = build_optimizer_and_scheduler(cfg, model)
    loader = DataLoader(source, t.batch_size, rank, world)

    group = dist.group.WORLD if world > 1 else None

    def step():  # what the training loop runs per step, its host sync included
        loop_step(cfg, model, loader, optimizer, scheduler, device, group)

    for _ in range(ours.warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    read_waits: list[float] = []   # with --host: the host's wait at each step's read
    for _ in range(ours.steps):
        waits: list[float] = []
        with timed_host_reads(waits) if ours.host else contextlib.nullcontext():
            step()
        if waits:   # the step's read is its last (with EP, each dispatch reads split sizes)
            read_waits.append(waits[-1])
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3 / ours.steps

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(ours.steps):
            step()
        torch.cuda.synchronize()
    events = kernel_events(prof)
    rows = summarize([(e.name, e.device_time_total) for e in events], ours.steps)
    if rank == 0:
        tokens = world * t.batch_size * t.seq_len * t.grad_accum
        print(f"{cfg.job.name}: float8 {'on' if cfg.float8.enabled else 'off'}, {world} rank(s), "
              f"{tokens} tokens/step, wall {wall_ms:.1f} ms/step (unprofiled), "
              f"{tokens / wall_ms * 1e3 / world:,.0f} tokens/s per GPU")
        print(format_rows(rows))
        for path in (ours.out, ours.trace):  # a missing folder is made, as the check said
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        if ours.out:
            with open(ours.out, "w") as f:
                json.dump({"job": cfg.job.name, "float8": cfg.float8.enabled, "world": world,
                           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "warmup_steps": ours.warmup, "timed_steps": ours.steps, "profiled_steps": ours.steps,
                           "tokens_per_step": tokens, "wall_ms_per_step": wall_ms,
                           # with --host: the host's wait at each timed step's read
                           "host_read_wait_ms": [1e3 * w for w in read_waits],
                           "categories": rows}, f, indent=1)
        if ours.trace:
            prof.export_chrome_trace(ours.trace)
    if ours.host:  # every rank runs the same steps; rank 0 prints
        host_report(step, events, ours.steps, wall_ms, read_waits, ours.host, show=rank == 0)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
