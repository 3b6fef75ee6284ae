#!/usr/bin/env python3
"""Where the time of ep_fp8's float8 grouped matmul goes, on a CUDA GPU.

    python scripts/profile_grouped_mm.py [--shape M,G,K,N ...] [--backend cuda]

For each shape (uniform groups): the GPU kernels of one forward+backward (torch.profiler,
summed per kernel name), the host time per call (forward alone and forward+backward,
without waiting for the GPU; with --cprofile, where it goes), each quantization kernel
pair alone with the bytes it moves per second, and the float8 GEMMs alone with and
without fast accumulation.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

DEFAULT = ["16384,8,5120,16384", "8192,16,1408,2048"]


def _inputs(M, G, K, N):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    w = (torch.randn(G, N, K, device="cuda", dtype=torch.bfloat16, generator=gen) * K**-0.5).requires_grad_()
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16, generator=gen)
    offs = torch.full((G,), M // G, device="cuda", dtype=torch.int32).cumsum(0).to(torch.int32)
    return x, w, g, offs


def kernel_table(step, n_iter=5):
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
    print(f"  GPU kernel time per step: {total:.1f} us")
    for name, (t, c) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        print(f"    {t / n_iter:9.1f} us  x{c // n_iter:<3d} {name[:110]}")


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
    from ep_fp8.ops.quant_ref import padded_length

    G, N, K = w.shape
    xq, _, xd = QK.quantize_rows_triton(x.detach())
    wq, _, wd = QK.quantize_rows_triton(w.detach().reshape(G * N, K))
    wq, wd = wq.view(G, N, K).transpose(-2, -1), wd.view(G, N)
    M = x.shape[0]
    xT, xTd, poffs = QK.quantize_cols_grouped_triton(x.detach(), offs)
    gT = torch.zeros(N, padded_length(M, G), device="cuda").to(torch.float8_e4m3fn)
    gTd = torch.ones(G, N, device="cuda")
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
    """Each quantization kernel pair alone: median time and the bytes it must move (read
    the input once per pass, write each float8 copy once) over that time."""
    from triton.testing import do_bench

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
        t = do_bench(fn, return_mode="median") * 1e-3
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", action="append", default=[])
    p.add_argument("--backend", default="cuda")
    p.add_argument("--cprofile", action="store_true", help="also profile the host time of forward+backward")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_grouped_mm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from ep_fp8.ops import scaled_grouped_mm

    for s in args.shape or DEFAULT:
        M, G, K, N = map(int, s.split(","))
        x, w, g, offs = _inputs(M, G, K, N)
        print(f"shape {s} backend {args.backend}")

        def fwd():
            return scaled_grouped_mm(x, w.transpose(-2, -1), offs, backend=args.backend)

        def step():
            fwd().backward(g)
            x.grad = w.grad = None

        kernel_table(step)
        print(f"  host us per call: fwd {host_time(fwd):.1f}, fwd+bwd {host_time(step):.1f}")

        def raw_step():
            torch._grouped_mm(x, w.transpose(-2, -1), offs=offs).backward(g)
            x.grad = w.grad = None

        print(f"  host us per call of raw torch._grouped_mm fwd+bwd: {host_time(raw_step):.1f}")
        if args.cprofile:
            host_profile(step)
        if args.backend == "cuda":
            quant_times(x, w, g, offs)
        gemm_times(x, w, offs)
        del x, w, g
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
