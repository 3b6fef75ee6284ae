#!/usr/bin/env python3
"""Benchmark the MoE token dispatchers against the raw data movement they wrap.

    torchrun --nproc-per-node 8 scripts/bench_dispatch.py --out outputs/bench_dispatch.json
    python scripts/bench_dispatch.py --out outputs/bench_dispatch_local.json    # 1 GPU
    python scripts/bench_dispatch.py --quick                                    # small sizes

Defaults are DeepSeek-V3-like: 4096 tokens per rank, D = 7168, top-8 of 256 experts,
uniformly random routing (--routing skewed: half of the tokens add 1 to the scores of the
first eighth of the experts, so those win most of their choices and the ranks holding
them receive more rows).

With more than one rank (expert parallelism over all of them), for each payload (bf16,
float8) and phase:
- fwd: AllToAllDispatcher.dispatch + combine (the experts replaced by the identity),
  against `raw`: torch.distributed.all_to_all_single of the same bytes with the same
  splits, forward rows then bf16 rows back (float8 payload: D float8 bytes, a 4-byte
  scale and padding to 16 bytes per row, then bf16 back).
- fwd_bwd: the same plus backward, against four raw all-to-alls (the gradient comes
  back in bf16 both ways).
ratio = dispatcher time / raw time (target: <= 1.3 for fwd).

On every rank count, the local path (LocalDispatcher, EP = 1): dispatch + combine against
one index_select of the T*k routed rows plus one index_add of them back (target: ratio
<= 2 for fwd).

Times: `--iters` runs after `--warmup` runs, all ranks in step (a barrier, then a fixed
number of iterations, so collectives never wait on a rank that stopped early), the mean
per iteration, the maximum over ranks (the local path too: under torchrun every rank
times it at once on its own GPU). fwd_bwd, as in training: the routing weights require
grad (combine's backward computes their gradient), and every call starts from no
gradients (.grad set to None after each backward) rather than adding into the last one's.
On CPU (gloo) it runs too, slowly: that is the smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ep_fp8.moe import AllToAllDispatcher, LocalDispatcher
from ep_fp8.moe.all_to_all import float8_row_bytes
from ep_fp8.paths import output_path_problem

FULL = dict(tokens=4096, dim=7168, top_k=8, experts=256)  # DeepSeek-V3-like
QUICK = dict(tokens=256, dim=512, top_k=4, experts=16)


# ----------------------------------------------------------------------------------------
# Pure parts: records, ratios, the table.


def record(path, payload, phase, ms, baseline, baseline_ms, **extra) -> dict:
    """One measurement row; ratio = ms / baseline_ms (lower is better, 1 = no overhead)."""
    ratio = ms / baseline_ms if baseline_ms else None
    return dict(path=path, payload=payload, phase=phase, ms=ms, baseline=baseline,
                baseline_ms=baseline_ms, ratio=ratio, **extra)


def format_table(records: list[dict]) -> str:
    header = ["path", "payload", "phase", "ms", "baseline", "baseline ms", "ratio", "MB/rank"]
    rows = [header]
    for r in records:
        mb = r.get("payload_bytes")
        rows.append([
            r["path"], r["payload"], r["phase"], f"{r['ms']:.3f}", r["baseline"],
            f"{r['baseline_ms']:.3f}", "-" if r["ratio"] is None else f"{r['ratio']:.2f}",
            "-" if mb is None else f"{mb / 1e6:.1f}",
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Measurement.


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, warmup: int, iters: int, group=None) -> float:
    """Mean ms per call of fn over iters calls, maximum over the ranks of group."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if group is not None:
        dist.barrier(group)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    ms = torch.tensor([(time.perf_counter() - start) * 1e3 / iters], device=device)
    if group is not None:
        dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=group)
    return float(ms)


def make_routing(T, k, E, kind, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(T, E, generator=gen, device=device)
    if kind == "skewed":  # half of the tokens prefer the first eighth of the experts
        scores[: T // 2, : max(1, E // 8)] += 1.0
    return scores.topk(k, dim=-1).indices


def backward_then_clear(fwd, grad, *leaves):
    """-> a call of fwd().backward(grad) that then sets the leaves' .grad to None, so that
    each timed call allocates its gradients afresh, as a training step after
    zero_grad(set_to_none=True), rather than adding into those of the call before."""
    def run():
        fwd().backward(grad)
        for t in leaves:
            t.grad = None
    return run


def routing_weights(T, k, device) -> torch.Tensor:
    """(T, k) float32 requiring grad, as the router's topk_w: combine's backward then
    computes their gradient, as in training."""
    return torch.rand(T, k, device=device).requires_grad_()


def bench_local(x, idx, args, device, group=None) -> list[dict]:
    """group: the ranks whose times are maxed (each runs this on its own device)."""
    T, k = idx.shape
    w = routing_weights(T, k, device)
    d = LocalDispatcher(args.experts)
    tok = idx.flatten().argsort() // k  # the baseline moves the same rows, sorted by expert
    x_req = x.detach().requires_grad_()
    grad = torch.randn_like(x)

    def local_fwd():
        xg, offs, st = d.dispatch(x_req, idx)
        return d.combine(xg, w, st)

    def base_fwd():
        rows = x_req.index_select(0, tok)
        return torch.zeros_like(x_req).index_add_(0, tok, rows)

    out = []
    for phase, fn, base in (("fwd", local_fwd, base_fwd),
                            ("fwd_bwd", backward_then_clear(local_fwd, grad, x_req, w),
                             backward_then_clear(base_fwd, grad, x_req))):
        ms = time_ms(fn, device, args.warmup, args.iters, group)
        base_ms = time_ms(base, device, args.warmup, args.iters, group)
        out.append(record("local", "-", phase, ms, "index_select+index_add", base_ms,
                          payload_bytes=T * k * x.shape[1] * x.element_size()))
    return out


class _IdentityExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, handle, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def bench_all_to_all(x, idx, args, device, group, payload) -> list[dict]:
    T, k = idx.shape
    D = x.shape[1]
    w = routing_weights(T, k, device)
    d = AllToAllDispatcher(group, args.experts, payload=payload)
    x_req = x.detach().requires_grad_()
    grad = torch.randn_like(x)
    _, _, st = d.dispatch(x_req, idx)
    in_splits, out_splits = st.input_splits, st.output_splits
    y_fp8 = torch.zeros(st.n_grouped, D, dtype=x.dtype, device=device)

    def fwd():
        xg, offs, st = d.dispatch(x_req, idx)
        # The experts are the identity: x_grouped itself for bf16; for float8 (x_grouped
        # is only the stride-0 autograd handle) a ready output whose gradient goes to it.
        y = xg if payload == "bf16" else _IdentityExperts.apply(xg, y_fp8)
        return d.combine(y, w, st)

    row_bytes = float8_row_bytes(D) if payload == "float8" else D * x.element_size()
    send_fwd = torch.empty(sum(in_splits), row_bytes, dtype=torch.uint8, device=device)
    recv_fwd = torch.empty(sum(out_splits), row_bytes, dtype=torch.uint8, device=device)
    send_back = torch.empty(sum(out_splits), D, dtype=x.dtype, device=device)
    recv_back = torch.empty(sum(in_splits), D, dtype=x.dtype, device=device)

    def raw(n_round_trips):
        def run():
            for _ in range(n_round_trips):
                dist.all_to_all_single(recv_fwd, send_fwd, out_splits, in_splits, group=group)
                dist.all_to_all_single(recv_back, send_back, in_splits, out_splits, group=group)
        return run

    def raw_fwd_bwd():  # forward rows, bf16 back; gradients: bf16 there and back
        raw(1)()
        dist.all_to_all_single(send_back, recv_back, out_splits, in_splits, group=group)
        dist.all_to_all_single(recv_back, send_back, in_splits, out_splits, group=group)

    out = []
    for phase, fn, base in (("fwd", fwd, raw(1)),
                            ("fwd_bwd", backward_then_clear(fwd, grad, x_req, w), raw_fwd_bwd)):
        ms = time_ms(fn, device, args.warmup, args.iters, group)
        base_ms = time_ms(base, device, args.warmup, args.iters, group)
        out.append(record("all_to_all", payload, phase, ms, "all_to_all_single", base_ms,
                          payload_bytes=sum(in_splits) * row_bytes))
    return out


def environment(args, world, device) -> dict:
    env = dict(world_size=world, device=str(device), torch=torch.__version__,
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Sizes default to FULL, or QUICK with --quick; an explicit option wins either way.
    p.add_argument("--tokens", type=int, help=f"tokens per rank ({FULL['tokens']})")
    p.add_argument("--dim", type=int, help=f"model dimension D ({FULL['dim']})")
    p.add_argument("--top-k", type=int, help=f"experts per token ({FULL['top_k']})")
    p.add_argument("--experts", type=int, help=f"experts E ({FULL['experts']})")
    p.add_argument("--routing", choices=("uniform", "skewed"), default="uniform")
    p.add_argument("--payloads", default="bf16,float8", help="comma-separated: bf16, float8")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help=f"small sizes {QUICK}")
    p.add_argument("--out", default="outputs/bench_dispatch.json", help="JSON results")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag in ("tokens", "dim", "top_k", "experts", "iters"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.top_k > args.experts:
        p.error(f"--top-k ({args.top_k}) exceeds --experts ({args.experts})")
    payloads = args.payloads.split(",")
    bad = set(payloads) - {"bf16", "float8"}
    if bad:
        p.error(f"unknown payloads {sorted(bad)}; choose from bf16, float8")
    args.payloads = ",".join(dict.fromkeys(payloads))   # each once: one row per payload
    if problem := output_path_problem(args.out):
        p.error(f"--out {args.out!r} {problem}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    group = None
    if world > 1:
        if args.experts % world:
            print(f"--experts ({args.experts}) must be divisible by the world size ({world})", file=sys.stderr)
            return 2
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        group = dist.group.WORLD
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(args.seed + rank)
    x = torch.randn(args.tokens, args.dim, generator=gen, device=device).to(dtype)
    idx = make_routing(args.tokens, args.top_k, args.experts, args.routing, device, args.seed + rank)

    records = bench_local(x, idx, args, device, group)
    if group is not None:
        for payload in args.payloads.split(","):
            records += bench_all_to_all(x, idx, args, device, group, payload)
    if rank == 0:
        config = {k: v for k, v in vars(args).items() if k != "out"}
        print(f"dispatch benchmark: {config}, world {world}, {device}")
        print(format_table(records))
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(env=environment(args, world, device), config=config,
                                        records=records), indent=1))
        print(f"wrote {path}")
    if group is not None:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
