#!/usr/bin/env python3
"""Where the time of ep_fp8's float8 grouped matmul goes, on a CUDA GPU.

    python scripts/profile_grouped_mm.py [--shape M,G,K,N ...] [--backend cuda]

For each shape (uniform groups), first the host time per call (forward alone and
forward+backward, without waiting for the GPU; with --cprofile, where it goes), each
quantization kernel pair alone with the bytes it moves per second, and the float8 GEMMs
alone with and without fast accumulation; then the GPU kernels of one forward+backward
(torch.profiler, summed per kernel name) and of raw bf16 torch._grouped_mm's, and from
them the ratio the float8 path would reach with its quantization at copy speed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

DEFAULT = [(16384, 8, 5120, 16384), (8192, 16, 1408, 2048)]
# A large device-to-device torch copy on the H200, bytes read + written per second: the
# speed a memory-bound quantization pass can reach at best.
COPY_TB_S = 4.29
# ep_fp8 kernels that are not quantization (2-4 us per call): counted as 'other'.
NOT_QUANT = ("_zero_rows_past_end_kernel",)


def kernel_category(name: str) -> str:
    """'gemm' for the CUTLASS GEMMs (float8 and bf16), 'quant' for ep_fp8's Triton
    quantization kernels (named _..._kernel), 'other' for the rest (fills, the GEMMs'
    argument setup, zeroing the rows past offs[-1])."""
    low = name.lower()
    if "gemm" in low and "prepare" not in low:
        return "gemm"
    if name.startswith("_") and name.endswith("_kernel") and name not in NOT_QUANT:
        return "quant"
    return "other"


def quant_bytes(M: int, G: int, K: int, N: int) -> int:
    """Bytes the float8 forward+backward's quantization kernels move for bf16 x (M, K),
    w (G, N, K) and grad_out (M, N): the weight read twice and written twice in float8
    (forward rows, backward columns); x and grad_out each read twice (amax pass, cast pass)
    and written twice (row copy, token-group copy)."""
    return 6 * G * K * N + 6 * M * K + 6 * M * N


def bound_summary(fp8_rounds: list[dict], bf16_rounds: list[dict], nbytes: int) -> str:
    """The kernel-time ratio bf16 / float8; the same with float8's quantization kernels
    replaced by nbytes at COPY_TB_S (what faster quantization kernels could reach at most
    with the same memory traffic); and with no quantization at all. Each round's float8
    and bf16 kernel times (per-category dicts, us) were taken one right after the other:
    each ratio is the median over rounds of that round's ratio, with the range over rounds.
    Kernel times are medians over rounds per category."""
    at_copy = nbytes / (COPY_TB_S * 1e12) * 1e6
    med = statistics.median
    f8 = [sum(r.values()) for r in fp8_rounds]
    b16 = [sum(r.values()) for r in bf16_rounds]
    ratio = [b / f for b, f in zip(b16, f8)]
    bound = [b / (f - r.get("quant", 0.0) + at_copy) for b, f, r in zip(b16, f8, fp8_rounds)]
    free = [b / (f - r.get("quant", 0.0)) for b, f, r in zip(b16, f8, fp8_rounds)]
    cat = {c: med([r.get(c, 0.0) for r in fp8_rounds]) for c in ("gemm", "quant", "other")}
    span = lambda v: f"{med(v):.2f}x ({min(v):.2f}-{max(v):.2f})"  # noqa: E731
    return (f"  kernel time per forward+backward, medians of {len(f8)} rounds: float8 {med(f8):.0f} us (GEMMs "
            f"{cat['gemm']:.0f}, quantization {cat['quant']:.0f}, other {cat['other']:.0f}), bf16 {med(b16):.0f} us\n"
            f"  bf16 / float8 per round: {span(ratio)}\n"
            f"  with quantization at copy speed ({nbytes / 1e9:.2f} GB in {at_copy:.0f} us): {span(bound)}\n"
            f"  with no quantization at all: {span(free)}")


def _inputs(M, G, K, N):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    w = (torch.randn(G, N, K, device="cuda", dtype=torch.bfloat16, generator=gen) * K**-0.5).requires_grad_()
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, generator=gen)
    offs = torch.full((G,), M // G, device="cuda", dtype=torch.int32).cumsum(0).to(torch.int32)
    return x, w, g, offs


def kernel_table(step, n_iter=5, show=True):
    """GPU kernel time of one step by kernel category (us), from n_iter steps under
    torch.profiler; with show, the per-kernel table is printed too."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n_iter):
            step()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            t, c = rows.get(e.name, (0.0, 0))
            rows[e.name] = (t + e.device_time, c + 1)  # device_time: us
    total = sum(t for t, _ in rows.values()) / n_iter
    if show:
        print(f"  GPU kernel time per step: {total:.1f} us")
    by_category = {}
    for name, (t, c) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        if show:
            print(f"    {t / n_iter:9.1f} us  x{c // n_iter:<3d} {name[:110]}")
        cat = kernel_category(name)
        by_category[cat] = by_category.get(cat, 0.0) + t / n_iter
    return by_category


def host_time(fn, n=50):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def gemm_times(x, w, offs):
    from triton.testing import do_bench

    from ep_fp8.ops import quant_kernels as QK

    G, N, K = w.shape
    xq, _, xd = QK.quantize_rows_triton(x.detach())
    wq, _, wd = QK.quantize_rows_triton(w.detach().reshape(G * N, K))
    wq, wd = wq.view(G, N, K).transpose(-2, -1), wd.view(G, N)
    M = x.shape[0]
    xT, xTd, poffs = QK.quantize_cols_grouped_triton(x.detach(), offs)
    # grad_w's operand from a random grad_out: on zeros the GEMM runs about 19% faster.
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    gT, gTd, _ = QK.quantize_cols_grouped_triton(g, offs)
    del g
    outs = {}
    for fast in (False, True):
        outs[fast] = (torch._scaled_grouped_mm(xq, wq, xd, wd, offs=offs, out_dtype=torch.bfloat16,
                                               use_fast_accum=fast).float(),
                      torch._scaled_grouped_mm(xT, xT.t(), xTd.reshape(-1), xTd.reshape(-1), offs=poffs,
                                               out_dtype=torch.bfloat16, use_fast_accum=fast).float())
    for i, name in enumerate(("2Dx3D", "2Dx2D")):
        a, b = outs[True][i], outs[False][i]
        print(f"  fast_accum changes the {name} output by {float((a - b).norm() / b.norm()):.2e} relative")
    for fast in (False, True):
        t = do_bench(lambda: torch._scaled_grouped_mm(xq, wq, xd, wd, offs=offs, out_dtype=torch.bfloat16,
                                                      use_fast_accum=fast), return_mode="median")
        t2 = do_bench(lambda: torch._scaled_grouped_mm(gT, xT.t(), gTd.reshape(-1), xTd.reshape(-1), offs=poffs,
                                                       out_dtype=torch.bfloat16, use_fast_accum=fast),
                      return_mode="median")
        print(f"  fp8 GEMM fast_accum={fast}: 2Dx3D {t * 1e3:.1f} us, 2Dx2D (grad_w) {t2 * 1e3:.1f} us")
    tb = do_bench(lambda: torch._grouped_mm(x.detach(), w.detach().transpose(-2, -1), offs=offs),
                  return_mode="median")
    print(f"  bf16 GEMM 2Dx3D {tb * 1e3:.1f} us")


def quant_times(x, w, g, offs):
    """Each quantization kernel pair alone: median GPU time (replays of a CUDA graph: a
    launch's host time can exceed a small pair's GPU time, which plain do_bench would then
    measure) and the bytes it must move (read the input once per pass, write each float8
    copy once) over that time."""
    from triton.testing import do_bench_cudagraph

    from ep_fp8.ops import quant_kernels as QK

    w_t = w.detach().transpose(-2, -1)
    amax = QK.quantize_weight_fwd_triton(w_t)[2]
    cases = [("weight fwd (rows + column amax)", lambda: QK.quantize_weight_fwd_triton(w_t), 3 * w.numel()),
             ("weight bwd cast", lambda: QK.quantize_weight_bwd_triton(w_t, amax), 3 * w.numel())]
    for name, a in (("x", x.detach()), ("grad_out", g)):
        cases += [(f"{name} rows", lambda a=a: QK.quantize_rows_triton(a), 3 * a.numel()),
                  (f"{name} token-group cols", lambda a=a: QK.quantize_cols_grouped_triton(a, offs), 5 * a.numel()),
                  (f"{name} rows + cols", lambda a=a: QK.quantize_rows_cols_grouped_triton(a, offs), 6 * a.numel())]
    for name, fn, nbytes in cases:
        t = do_bench_cudagraph(fn, return_mode="median") * 1e-3
        print(f"  {name:34s} {t * 1e6:8.1f} us  {nbytes / t / 1e12:5.2f} TB/s of {nbytes / 1e9:.2f} GB")


def host_profile(step, n=100, top=18):
    """cProfile of n forward+backward calls: where the host time goes."""
    import cProfile
    import pstats

    step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def _each_shape(shapes, backend, what):
    """For each (M, G, K, N): prints its heading and yields (shape, the backend that runs,
    its inputs (x, w, grad_out, offs), _steps' three calls). Its own references are dropped
    and the cache emptied before the next shape is made, but what the caller's loop
    variables still hold of the previous shape is freed only when they are rebound, so two
    shapes' tensors can briefly coexist."""
    from ep_fp8.ops import resolve_backend, scaled_grouped_mm

    for M, G, K, N in shapes:
        inputs = _inputs(M, G, K, N)
        chosen = resolve_backend(backend, inputs[0].device, K, N, M, G)   # as the op decides
        print(f"shape {M},{G},{K},{N} backend {backend} (runs {chosen}): {what}")
        yield (M, G, K, N), chosen, inputs, _steps(scaled_grouped_mm, *inputs, backend)
        del inputs
        torch.cuda.empty_cache()


def _steps(scaled_grouped_mm, x, w, g, offs, backend):
    """(the op's forward+backward, raw bf16 torch._grouped_mm's, the op's forward)."""
    def fwd():
        return scaled_grouped_mm(x, w.transpose(-2, -1), offs, backend=backend)

    def step():
        fwd().backward(g)
        x.grad = w.grad = None

    def raw_step():
        torch._grouped_mm(x, w.transpose(-2, -1), offs=offs).backward(g)
        x.grad = w.grad = None

    return step, raw_step, fwd


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        M, G, K, N = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be four integers M,G,K,N, got {text!r}") from None
    if min(M, G, K, N) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return M, G, K, N


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", default=[], type=_shape, help="M,G,K,N (repeatable)")
    p.add_argument("--backend", default="cuda", choices=("cuda", "auto", "bf16"),
                   help="ep_fp8's backend (auto and bf16: to see what the bf16 path adds to raw torch._grouped_mm)")
    p.add_argument("--rounds", type=_positive_int, default=5, help="rounds of float8 and bf16 kernel profiles")
    p.add_argument("--cprofile", action="store_true", help="also profile the host time of forward+backward")
    args = p.parse_args(argv)
    shapes = args.shape or DEFAULT
    for M, G, K, N in shapes:
        if K % 16 or N % 16:  # the script times the float8 GEMMs alone whatever the backend
            p.error(f"--shape needs K and N to be multiples of 16 (torch._scaled_grouped_mm), "
                    f"got {M},{G},{K},{N}")
    if not torch.cuda.is_available():
        print("profile_grouped_mm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    # Host times and the kernels alone first, for every shape: once torch.profiler has
    # run, launches took longer on the host in the same process (docs/perf_notes.md, v8).
    for (M, G, K, N), chosen, (x, w, g, offs), (step, raw_step, fwd) in _each_shape(
            shapes, args.backend, "host time and kernels alone"):
        print(f"  host us per call: fwd {host_time(fwd):.1f}, fwd+bwd {host_time(step):.1f}")
        print(f"  host us per call of raw torch._grouped_mm fwd+bwd: {host_time(raw_step):.1f}")
        if args.cprofile:
            host_profile(step)
        if chosen == "cuda":
            quant_times(x, w, g, offs)
        gemm_times(x, w, offs)
    for (M, G, K, N), chosen, _, (step, raw_step, _) in _each_shape(
            shapes, args.backend, "GPU kernels of forward+backward"):
        # The GPU's clock moves with its power draw (docs/benchmarks.md): the op and raw
        # bf16 are profiled one right after the other, in several rounds, in alternating order.
        rounds = {"op": [], "raw": []}
        for r in range(args.rounds):
            for who in ("op", "raw") if r % 2 == 0 else ("raw", "op"):
                if r == 0:
                    print(f"  ep_fp8 ({chosen}):" if who == "op" else "  raw bf16 torch._grouped_mm:")
                rounds[who].append(kernel_table(step if who == "op" else raw_step, show=r == 0))
        if chosen == "cuda":
            print(bound_summary(rounds["op"], rounds["raw"], quant_bytes(M, G, K, N)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
