#!/usr/bin/env python3
"""Benchmark float8 grouped matmuls against bf16 `torch._grouped_mm` (and torchao).

    python scripts/bench_grouped_mm.py --out outputs/bench_grouped_mm.json
    python scripts/bench_grouped_mm.py --quick                      # smoke test, 2 small shapes
    python scripts/bench_grouped_mm.py --shape 8192,8,4096,2048 --groups uneven --methods bf16,ep_fp8

For each shape (M, G, K, N) = (routed tokens, local experts, in features, out features),
each group-size mode (uniform: M/G rows each; uneven: seeded, multiples of 16, the largest
at most 3x the smallest) and each method, on fresh random inputs (x (M, K) bf16 requiring grad;
w (G, N, K) bf16 passed as w.transpose(-2, -1), as the experts do; grad_out (M, N) bf16):

- fwd_ms / fwd_bwd_ms: the median over --rounds rounds (5) of triton.testing.do_bench's
  median after its warm-up. Each round times every method once, in an order rotated (and
  reversed) from round to round, so that a slow spell of the GPU (clocks, power) falls on
  all methods alike rather than on whichever ran then; fwd_bwd_spread is (max - min) /
  median of the rounds' forward+backward times. The forward is timed with autograd
  recording (as in training); fwd+bwd = forward -> backward(grad_out), with x.grad and
  w.grad set to None before each timed run.
- TFLOP/s: 2*M*K*N per forward, 6*M*K*N per forward+backward.
- --cuda-graph: every call is captured once in a CUDA graph and its replays are timed:
  the GPU time alone, without the host time of the Python calls and kernel launches (what
  a training step captured in CUDA graphs pays). Peak memory is still measured eagerly.
- peak_mem_gib: see PEAK_MEM_NOTE.
- rel_err: ||y - y_ref|| / ||y_ref|| (Frobenius) of the forward output, y_ref computed in
  float64 from the same bf16 inputs: a sanity check, not a benchmark.
- gpu: the SM clock, power draw and clock event reasons that nvidia-smi reported every
  0.5 s while the shape was timed (the H200 runs these GEMMs at its power limit, which
  lowers its clocks; see docs/benchmarks.md).
- x_bf16 / x_torchao: speed-ups, baseline time / method time (> 1: faster than baseline).

Methods: bf16 (torch._grouped_mm), ep_fp8 (ep_fp8.ops.scaled_grouped_mm backend="cuda"),
ep_fp8_auto (backend="auto"), torchao (its float8 rowwise grouped mm, when importable),
fp8_gemm_only (torch._scaled_grouped_mm on operands quantized beforehand, forward only:
the ceiling that quantization overhead is measured against).

The records, ratios, geometric means and the table printer (grouped_mm_records.py) are pure
functions that run on CPU; the GPU's clock and power come from gpu_monitor.py; the
measurement here needs CUDA. Shapes given with --shape replace the default list
(a shape given twice runs once).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from gpu_monitor import GpuMonitor
from grouped_mm_records import (DEFAULT_SHAPES, GROUP_MODES, add_ratios, fmt, format_table, geomeans, group_sizes,
                                parse_shape, percent, round_order, summarize_rounds)

from ep_fp8.paths import output_path_problem

QUICK_SHAPES = [(8192, 16, 1408, 2048), (4096, 32, 2048, 768)]
METHODS = ("bf16", "ep_fp8", "ep_fp8_auto", "torchao", "fp8_gemm_only")
TORCHAO_MODULES = (
    "torchao.prototype.moe_training.scaled_grouped_mm",
    "torchao.prototype.moe_training.fp8_grouped_mm",
    "torchao.prototype.moe_training",
)
TORCHAO_NAMES = ("_to_fp8_rowwise_then_scaled_grouped_mm", "_scaled_grouped_mm")  # newer first
PEAK_MEM_NOTE = (
    "peak_mem_gib = torch.cuda.max_memory_allocated() during one forward+backward minus "
    "torch.cuda.memory_allocated() just before it, with x.grad and w.grad None: the inputs "
    "(x, w, offs, grad_out) and the reference output are excluded; the output, saved tensors, float8 copies, scales, "
    "workspaces and both gradients are included. None for forward-only methods."
)
GIB = 2**30


def find_torchao_fn():
    """-> (fn, where) for torchao's float8 rowwise grouped mm, or (None, why not).
    Looks for the newer `_to_fp8_rowwise_then_scaled_grouped_mm`, then the older
    `_scaled_grouped_mm`, in the moe_training modules that have held them."""
    try:
        importlib.import_module("torchao")
    except ImportError as e:
        return None, f"torchao is not importable ({e})"
    for name in TORCHAO_NAMES:
        for module_name in TORCHAO_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            fn = getattr(module, name, None)
            if callable(fn):
                return fn, f"{module_name}.{name}"
    return None, f"torchao has none of {TORCHAO_NAMES} in {TORCHAO_MODULES}"


def torchao_kwargs(fn) -> dict:
    """Keyword arguments for `fn(x, w_t, offs=offs, **kwargs)`: bf16 output, and no token
    padding where the function offers it (our groups are multiples of 16 already)."""
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "out_dtype" in params:
        kwargs["out_dtype"] = torch.bfloat16
    if "pad_token_groups_for_grouped_mm" in params:
        kwargs["pad_token_groups_for_grouped_mm"] = False
    return kwargs


def reference_output(x: torch.Tensor, w_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (M, K), w_t (G, K, N), offs (G,) cumulative ends -> (M, N) float32, each group's
    product computed in float64 (rows past offs[-1] stay zero)."""
    ref = torch.zeros(x.shape[0], w_t.shape[-1], dtype=torch.float32, device=x.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            ref[start:end] = (x[start:end].double() @ w_t[g].double()).float()
        start = end
    return ref


def relative_error(y: torch.Tensor, ref: torch.Tensor, rows_per_chunk: int = 8192) -> float:
    """||y - ref||_F / ||ref||_F in float64, in row chunks to bound the temporary memory."""
    num = den = 0.0
    for i in range(0, y.shape[0], rows_per_chunk):
        r = ref[i:i + rows_per_chunk].double()
        num += float((y[i:i + rows_per_chunk].double() - r).square().sum())
        den += float(r.square().sum())
    return math.sqrt(num / den) if den > 0 else float("nan")


# ----------------------------------------------------------------------------------------
# Measurement: CUDA only.


class Unavailable(Exception):
    """A method that cannot run here (library absent): recorded as skipped, not an error."""


def build_forward(method: str, x, w, offs, torchao_fn, torchao_note: str):
    """-> (forward: () -> y (M, N) bf16, has_backward, note). Raises Unavailable."""
    G, N, K = w.shape
    if method == "bf16":
        return lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs), True, ""
    if method == "torchao":
        if torchao_fn is None:
            raise Unavailable(torchao_note)
        kw = torchao_kwargs(torchao_fn)
        return lambda: torchao_fn(x, w.transpose(-2, -1), offs=offs, **kw), True, ""
    try:
        from ep_fp8.ops import quantize_rows, resolve_backend, scaled_grouped_mm
    except ImportError as e:
        raise Unavailable(f"ep_fp8.ops is not importable ({e})") from None
    if method in ("ep_fp8", "ep_fp8_auto"):
        backend = "cuda" if method == "ep_fp8" else "auto"
        # G too, as the op passes it: from MAX_CUDA_GROUPS groups auto picks another backend.
        note = "" if backend == "cuda" else f"auto picked {resolve_backend('auto', x.device, K, N, x.shape[0], G)}"
        return (lambda: scaled_grouped_mm(x, w.transpose(-2, -1), offs, backend=backend),
                True, note)
    # fp8_gemm_only: quantized once here, outside the timing. w's rows (G*N, K) are its
    # output columns, so row scaling of w is the per-(expert, column) scaling of w_t.
    x_fp8, x_scale = quantize_rows(x.detach())                   # (M, K), (M,)
    w_fp8, w_scale = quantize_rows(w.detach().reshape(G * N, K))  # (G*N, K), (G*N,)
    w_t_fp8 = w_fp8.view(G, N, K).transpose(-2, -1)              # (G, K, N) column-major
    x_inv, w_inv = x_scale.reciprocal(), w_scale.reciprocal().view(G, N)
    return (lambda: torch._scaled_grouped_mm(x_fp8, w_t_fp8, x_inv, w_inv, offs=offs,
                                             out_dtype=torch.bfloat16, use_fast_accum=True),
            False, "forward only, operands pre-quantized")


def capture(fn):
    """fn captured in a CUDA graph after a warm-up on a side stream -> the graph's replay:
    the same GPU work with no host time per call (what CUDA graphs give a training step)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def prepare(method, shape, groups, sizes, inputs, ref, torchao, cuda_graph: bool = False) -> dict:
    """One method ready to time: {"rec": its record (error, peak memory, note), "fwd" and
    "step" (the calls to time: forward, forward+backward), "graphed"}; the record's status
    is "skipped" or "error" where it cannot run. With cuda_graph both calls are replays of
    CUDA graphs captured here."""
    x, w, offs, grad_out = inputs
    rec = {"shape": list(shape), "groups": groups, "group_sizes": sizes, "method": method,
           "status": "ok", "note": "", "fwd_ms_rounds": [], "fwd_bwd_ms_rounds": []}
    state = {"rec": rec, "fwd": None, "step": None, "graphed": cuda_graph}
    try:
        forward, has_backward, rec["note"] = build_forward(method, x, w, offs, *torchao)
        y = forward()  # first call: compiles and autotunes kernels
        rec["rel_err"] = relative_error(y.detach(), ref)
        if has_backward:
            y.backward(grad_out)
        del y
        x.grad = w.grad = None
        torch.cuda.synchronize()
        if has_backward:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            forward().backward(grad_out)
            torch.cuda.synchronize()
            rec["peak_mem_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
        x.grad = w.grad = None

        def step():
            forward().backward(grad_out)

        def step_from_no_grads():  # captured once: the replays rewrite the same grad buffers
            x.grad = w.grad = None
            step()

        if cuda_graph:
            state.update(fwd=capture(forward), step=capture(step_from_no_grads) if has_backward else None)
        else:
            state.update(fwd=forward, step=step if has_backward else None)
    except Unavailable as e:
        rec.update(status="skipped", note=str(e))
    except Exception as e:  # noqa: BLE001 - one failing method must not end the run
        rec.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    finally:
        x.grad = w.grad = None
    return state


def time_once(state: dict, inputs, warmup: float, rep: float) -> None:
    """One round of timing for a prepared method: appends the do_bench medians of the
    forward and of forward+backward to its record's *_rounds lists."""
    from triton.testing import do_bench

    rec = state["rec"]
    if rec["status"] != "ok":
        return
    x, w = inputs[:2]
    grads = [] if state["graphed"] else [x, w]  # a graph replay keeps its own gradient buffers
    try:
        rec["fwd_ms_rounds"].append(do_bench(state["fwd"], warmup=warmup, rep=rep, return_mode="median"))
        if state["step"] is not None:
            rec["fwd_bwd_ms_rounds"].append(do_bench(state["step"], warmup=warmup, rep=rep, grad_to_none=grads,
                                                     return_mode="median"))
    except Exception as e:  # noqa: BLE001
        rec.update(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    finally:
        if not state["graphed"]:
            x.grad = w.grad = None


def make_inputs(shape, sizes, seed: int):
    """Fresh random CUDA inputs: x (M, K) bf16 (requires grad), w (G, N, K) bf16 scaled by
    1/sqrt(K) (requires grad), offs (G,) int32, grad_out (M, N) bf16."""
    M, G, K, N = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    opts = dict(device="cuda", dtype=torch.bfloat16, generator=gen)
    x = torch.randn(M, K, **opts).requires_grad_()
    w = torch.randn(G, N, K, **opts).mul_(K**-0.5).requires_grad_()
    grad_out = torch.randn(M, N, **opts)
    offs = torch.tensor(sizes, device="cuda").cumsum(0).to(torch.int32)
    return x, w, offs, grad_out


def environment(args) -> dict:
    """The JSON header: GPU, driver (from nvidia-smi when present), versions, date, settings."""
    import triton

    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        driver = None
    try:
        torchao_version = importlib.import_module("torchao").__version__
    except ImportError:
        torchao_version = None
    return {"gpu": torch.cuda.get_device_name(), "driver": driver, "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__,
            "torchao": torchao_version,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "warmup_ms": args.warmup, "rep_ms": args.rep, "seed": args.seed,
            "rounds": args.rounds, "cuda_graph": args.cuda_graph,
            "timing": "median over rounds (methods interleaved) of triton.testing.do_bench medians, ms",
            "peak_mem": PEAK_MEM_NOTE,
            "ratios": "x_bf16 / x_torchao = baseline time / method time (> 1: faster)"}


def parse_args(argv=None) -> argparse.Namespace:
    """Parses and validates every option (shapes, group sizes, methods) before any work."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", default=[], metavar="M,G,K,N",
                   help="a shape to run (repeatable); replaces the default list")
    p.add_argument("--groups", choices=(*GROUP_MODES, "both"), default="both")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--out", default="outputs/bench_grouped_mm.json", help="JSON results")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2 small shapes, warmup 5 ms, rep 20 ms")
    p.add_argument("--warmup", type=float, default=None, help="do_bench warm-up, ms (25)")
    p.add_argument("--rep", type=float, default=None, help="do_bench repetition, ms (100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cuda-graph", action="store_true",
                   help="time replays of CUDA graphs of each call: GPU time without host overhead")
    p.add_argument("--rounds", type=int, default=None,
                   help="timing rounds per shape, the methods interleaved in each (5; --quick: 1)")
    args = p.parse_args(argv)
    try:
        shapes = []
        for text in args.shape:
            shape = parse_shape(text)
            if shape in shapes:  # records are keyed by shape: a second run would skew the ratios
                print(f"note: --shape {','.join(map(str, shape))} was given twice; running it once",
                      file=sys.stderr)
            else:
                shapes.append(shape)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        args.methods = list(dict.fromkeys(methods))   # each once: records are keyed by method too
        if len(args.methods) < len(methods):
            print(f"note: --methods names {', '.join(m for m in args.methods if methods.count(m) > 1)} "
                  f"more than once; timing each once", file=sys.stderr)
        unknown = [m for m in args.methods if m not in METHODS]
        if unknown or not args.methods:
            raise ValueError(f"--methods: unknown {unknown}, choose from {','.join(METHODS)}")
        args.shapes = shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
        args.group_modes = GROUP_MODES if args.groups == "both" else (args.groups,)
        for M, G, _, _ in args.shapes:
            for mode in args.group_modes:
                group_sizes(M, G, mode, args.seed)
    except ValueError as e:
        p.error(str(e))
    args.warmup = args.warmup if args.warmup is not None else (5.0 if args.quick else 25.0)
    args.rep = args.rep if args.rep is not None else (20.0 if args.quick else 100.0)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if not (args.warmup > 0 and args.rep > 0):
        p.error(f"--warmup and --rep must be > 0 ms, got {args.warmup} and {args.rep}")
    if problem := output_path_problem(args.out):
        p.error(f"--out {args.out!r} {problem}")
    return args


def bench_shape(args, shape, mode: str, torchao, monitor: GpuMonitor) -> list[dict]:
    """All methods on one (shape, groups mode): prepared, then timed in interleaved rounds.
    Each record gets "gpu": the clock and power samples taken while this shape was timed."""
    sizes = group_sizes(shape[0], shape[1], mode, args.seed)
    inputs = make_inputs(shape, sizes, args.seed)
    ref = reference_output(inputs[0].detach(), inputs[1].detach().transpose(-2, -1), inputs[2])
    states = {m: prepare(m, shape, mode, sizes, inputs, ref, torchao, args.cuda_graph) for m in args.methods}
    monitor.take()  # drop the samples of the set-up
    for r in range(args.rounds):
        for method in round_order(args.methods, r):
            time_once(states[method], inputs, args.warmup, args.rep)
    gpu = monitor.take()
    records = []
    for method in args.methods:
        rec = summarize_rounds(states[method]["rec"], shape)
        rec["gpu"] = gpu
        records.append(rec)
        print(f"{shape} {mode:7s} {method:13s} {rec['status']:7s} "
              f"fwd {fmt(rec.get('fwd_ms'), '.3f')} ms, fwd+bwd {fmt(rec.get('fwd_bwd_ms'), '.3f')} ms "
              f"(spread {percent(rec.get('fwd_bwd_spread'))}) {rec['note']}", flush=True)
    if gpu:
        print(f"  GPU while timed: SM clock median {gpu['sm_mhz_median']:.0f} MHz (rated "
              f"{gpu['sm_mhz_max_rated']:.0f}), power {gpu['power_w_median']:.0f} W of "
              f"{gpu['power_limit_w']:.0f}, power-capped in {100 * gpu['power_capped']:.0f}% of samples")
    del inputs, ref, states
    torch.cuda.empty_cache()
    return records


def _write_json(path: Path, header: dict, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"header": header, "records": records,
                                "geomeans": geomeans(records)}, indent=1) + "\n")


def main(argv=None) -> int:
    """Runs the benchmark and returns 0; returns 2 with a message on stderr when CUDA is
    absent (nothing run, nothing written). Bad options exit through argparse (status 2)."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_grouped_mm.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "nothing was run and no file was written", file=sys.stderr)
        return 2
    header = environment(args)
    torchao = find_torchao_fn()
    if "torchao" in args.methods:
        print(f"torchao: {torchao[1]}" + ("" if torchao[0] else " -> method skipped"))
    out, records = Path(args.out), []
    out.parent.mkdir(parents=True, exist_ok=True)
    monitor = GpuMonitor(out.with_name(out.stem + "_gpu_samples.csv"))
    try:
        for shape in args.shapes:
            for mode in args.group_modes:
                records += bench_shape(args, shape, mode, torchao, monitor)
                _write_json(out, header, add_ratios(records))  # partial results survive a crash
    finally:
        monitor.close()
    header["gpu_during_run"] = monitor.take_all()
    records = add_ratios(records)
    _write_json(out, header, records)
    print(f"\n{header['gpu']}, driver {header['driver']}, torch {header['torch']}, "
          f"triton {header['triton']}, torchao {header['torchao']}, {header['date']}\n")
    print(format_table(records, geomeans(records)))
    gpu = header["gpu_during_run"]
    if gpu:
        print(f"\nGPU over the run ({gpu['n']} samples): SM clock median {gpu['sm_mhz_median']:.0f} MHz, "
              f"min {gpu['sm_mhz_min']:.0f} (rated {gpu['sm_mhz_max_rated']:.0f}); power median "
              f"{gpu['power_w_median']:.0f} W of {gpu['power_limit_w']:.0f}; power-capped in "
              f"{100 * gpu['power_capped']:.0f}% of samples")
    print(f"\n{PEAK_MEM_NOTE}\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
