#!/usr/bin/env python3
"""Benchmark the routed experts' SwiGLU (ep_fp8.moe.GroupedExperts) forward+backward on one
GPU: w1 and w3 stacked as one w13 weight (the module) against the same arithmetic with w1
and w3 as two weights (two grouped matmuls on x, whose float8 rows they share, SwiGLU of
two tensors, x's gradient as the sum of two), in bf16 and float8.

    python scripts/bench_experts.py --out outputs/bench_experts.json
    python scripts/bench_experts.py --rows 131072 --experts 16 --dim 2048 --hidden 2048

Inputs are fresh random bf16 rows in uneven groups (multiples of 16, the largest about 3x
the smallest, as scripts/bench_grouped_mm.py draws them), weights ~ N(0, 0.02^2) cast to
bf16 (as FSDP2's mixed precision hands them to the experts), and a random bf16 gradient
of the output. Each of --rounds rounds times every method once with triton.testing.do_bench
(median), in an order rotated from round to round; the record is the median over rounds
and the spread (max - min) / median. Peak memory: the largest allocation above the inputs
during one forward+backward. Both layouts compute the same function: their outputs are
compared (max relative difference) as a check, not a benchmark.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

from grouped_mm_records import group_sizes

import ep_fp8.ops as ops
from ep_fp8.moe import GroupedExperts
from ep_fp8.paths import output_path_problem

LAYOUTS = ("stacked", "separate")


def separate_forward(experts: GroupedExperts, w1, w3, x, offs):
    """The experts' arithmetic with w1 and w3 as two weights: x's float8 rows quantized once
    for both GEMMs, SwiGLU of two tensors, w2 as in the module."""
    backend = experts.float8_backend if experts.float8 else "bf16"
    x_fp8 = ops.quantize_rows(x) if backend != "bf16" else None

    def gmm(a, w, a_fp8=None):
        w = w if w.dtype == torch.float32 else w.to(x.dtype)   # as GroupedExperts passes them
        return ops.scaled_grouped_mm(a, w.transpose(-2, -1), offs, backend=backend, x_fp8=a_fp8)

    h = ops.swiglu(gmm(x, w1, x_fp8), gmm(x, w3, x_fp8))
    return gmm(h, experts.w2)


def build(args, float8: bool):
    """The experts (bf16 weights), w1 and w3 as separate contiguous leaves, and the inputs."""
    torch.manual_seed(args.seed)
    E, D, H = args.experts, args.dim, args.hidden
    experts = GroupedExperts(D, H, E, float8=float8, float8_backend="cuda").cuda().to(torch.bfloat16)
    w1, w3 = (w.detach().clone().requires_grad_() for w in experts.w13.chunk(2, dim=1))
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    x = torch.randn(args.rows, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    grad = torch.randn(args.rows, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    offs = torch.tensor(group_sizes(args.rows, E, "uneven", args.seed), device="cuda").cumsum(0).to(torch.int32)
    return experts, w1, w3, x, grad, offs


def peak_gib(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def bench_one(args, float8: bool) -> list[dict]:
    """The records of both layouts, bf16 or float8 experts."""
    from triton.testing import do_bench

    experts, w1, w3, x, grad, offs = build(args, float8)
    leaves = [x, experts.w13, experts.w2, w1, w3]
    forwards = {"stacked": lambda: experts(x, offs),
                "separate": lambda: separate_forward(experts, w1, w3, x, offs)}
    with torch.no_grad():
        y = {name: f() for name, f in forwards.items()}
    diff = ((y["stacked"].float() - y["separate"].float()).abs().max()
            / y["separate"].float().abs().max()).item()
    del y
    steps = {name: (lambda f=f: f().backward(grad)) for name, f in forwards.items()}
    times = {name: [] for name in LAYOUTS}
    for r in range(args.rounds):
        for name in LAYOUTS[r % 2:] + LAYOUTS[:r % 2]:
            times[name].append(do_bench(steps[name], warmup=args.warmup, rep=args.rep,
                                        grad_to_none=leaves, return_mode="median"))
    records = []
    for name in LAYOUTS:
        for leaf in leaves:
            leaf.grad = None
        med = statistics.median(times[name])
        records.append({"float8": float8, "layout": name, "fwd_bwd_ms": med,
                        "spread": (max(times[name]) - min(times[name])) / med,
                        "rounds_ms": times[name], "peak_gib": peak_gib(steps[name]),
                        "max_rel_diff_stacked_vs_separate": diff})
    return records


def bench(args) -> list[dict]:
    records = []
    for float8 in (False, True):
        records += bench_one(args, float8)
        torch.cuda.empty_cache()
    return records


def format_table(records: list[dict]) -> str:
    lines = [f"{'experts':8}  {'layout':9}  {'f+b ms':>7}  {'spread':>6}  {'peak GiB':>8}  {'x separate':>10}",
             "-" * 58]
    by = {(r["float8"], r["layout"]): r for r in records}
    for r in records:
        base = by[(r["float8"], "separate")]["fwd_bwd_ms"]
        lines.append(f"{'float8' if r['float8'] else 'bf16':8}  {r['layout']:9}  {r['fwd_bwd_ms']:7.3f}  "
                     f"{100 * r['spread']:5.1f}%  {r['peak_gib']:8.2f}  {base / r['fwd_bwd_ms']:10.3f}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=131072, help="routed rows (tokens x top-k); moe_1b: 131072")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=float, default=25.0, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=float, default=100.0, help="do_bench repetitions, ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the header and records as JSON here")
    args = p.parse_args(argv)
    for name in ("rows", "experts", "dim", "hidden", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.dim % 16 or args.hidden % 16:
        p.error("--dim and --hidden must be multiples of 16 (float8 operands)")
    try:
        group_sizes(args.rows, args.experts, "uneven")
    except ValueError as e:
        p.error(f"--rows {args.rows} over --experts {args.experts}: {e}")
    if args.out and (problem := output_path_problem(args.out)):
        p.error(f"--out {args.out!r} {problem}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_experts.py times GPU kernels: it needs CUDA", file=sys.stderr)
        return 2
    header = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **{k: getattr(args, k) for k in ("rows", "experts", "dim", "hidden", "rounds", "warmup", "rep", "seed")}}
    print(f"{header['gpu']}, torch {header['torch']}, {header['date']}: {args.rows} rows, "
          f"{args.experts} experts, dim {args.dim}, hidden {args.hidden}", flush=True)
    records = bench(args)
    print(format_table(records))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**header, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
