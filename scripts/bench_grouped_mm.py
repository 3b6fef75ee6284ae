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

The record logic, ratios, geometric means and the table printer are pure functions that
run on CPU; the measurement needs CUDA. Shapes given with --shape replace the default list
(a shape given twice runs once).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from ep_fp8.paths import output_path_problem

DEFAULT_SHAPES = [  # (M, G, K, N); the first four are the "large" ones of the geomean
    (16384, 8, 5120, 16384), (16384, 8, 8192, 5120), (32768, 8, 7168, 4096),
    (32768, 8, 2048, 7168), (8192, 16, 2048, 2816), (8192, 16, 1408, 2048),
    (4096, 32, 2048, 768), (65536, 4, 4096, 14336),
]
LARGE_SHAPES = DEFAULT_SHAPES[:4]
QUICK_SHAPES = [(8192, 16, 1408, 2048), (4096, 32, 2048, 768)]
METHODS = ("bf16", "ep_fp8", "ep_fp8_auto", "torchao", "fp8_gemm_only")
GROUP_MODES = ("uniform", "uneven")
RATIO_KEYS = ("fwd_x_bf16", "fwd_bwd_x_bf16", "fwd_x_torchao", "fwd_bwd_x_torchao")
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


# ----------------------------------------------------------------------------------------
# Pure parts: no GPU needed.


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """'M,G,K,N' -> (M, G, K, N). ValueError names the problem: not four positive ints,
    or K or N not a multiple of 16 (float8 operands need 16-byte aligned rows). The rows
    M are checked against G by group_sizes."""
    parts = text.split(",")
    try:
        M, G, K, N = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"shape must be four integers M,G,K,N, got {text!r}") from None
    if min(M, G, K, N) <= 0:
        raise ValueError(f"shape sizes must be positive, got {text!r}")
    if K % 16 or N % 16:
        raise ValueError(f"K and N must be multiples of 16, got K={K}, N={N} in {text!r}")
    return M, G, K, N


def group_sizes(M: int, G: int, mode: str, seed: int = 0) -> list[int]:
    """Rows per group, summing to M. uniform: M/G each (ValueError unless a multiple of 16).
    uneven: multiples of 16, none empty, from a seeded stratified draw (one point in each
    of G equal slices of [0, 1), in random order) mapped onto weights in [1, 3], so the
    largest group is about 3x the smallest, never more, and the rest lie between.
    ValueError for an unknown mode, M not a multiple of 16, or M < 16*G (every other M
    can be split within 3x: G sizes that differ by at most 16 rows are)."""
    if mode not in GROUP_MODES:
        raise ValueError(f"groups mode must be one of {GROUP_MODES}, got {mode!r}")
    if M % 16 or M < 16 * G:
        raise ValueError(f"M must be a multiple of 16 and at least 16*G, got M={M}, G={G}")
    if mode == "uniform":
        if M % (16 * G):
            raise ValueError(f"uniform groups need M/G a multiple of 16, got M={M}, G={G}")
        return [M // G] * G
    if G == 1:
        return [M]
    gen = torch.Generator().manual_seed(seed)
    jitter = torch.rand(G, generator=gen, dtype=torch.float64)
    t = (torch.arange(G, dtype=torch.float64) + jitter) / G
    t = (t - t.min()) / (t.max() - t.min())
    weights = (1.0 + 2.0 * t)[torch.randperm(G, generator=gen)]
    units_total = M // 16  # sizes are counted in blocks of 16 rows
    ideal = weights / weights.sum() * units_total
    units = ideal.floor().clamp(min=1).long()
    # Hand the blocks lost to flooring to the groups that lost the most; take surplus
    # (only from the clamp to 1) from the largest groups.
    while int(units.sum()) < units_total:
        units[int(torch.argmax(ideal - units))] += 1
    while int(units.sum()) > units_total:
        units[int(torch.argmax(units))] -= 1
    # Rounding to blocks can stretch the spread past 3x (ideal 1.5 and 4.5 blocks can give 1
    # and 5): move blocks from the largest group to the smallest until it is within 3x.
    # Each move narrows the spread; sizes within one block of each other satisfy it.
    while int(units.max()) > 3 * int(units.min()):
        units[int(torch.argmax(units))] -= 1
        units[int(torch.argmin(units))] += 1
    return [16 * int(u) for u in units]


def flops(M: int, K: int, N: int, phase: str) -> int:
    """Matmul FLOPs: 2*M*K*N for phase 'fwd', 6*M*K*N for 'fwd_bwd' (dx and dw)."""
    return {"fwd": 2, "fwd_bwd": 6}[phase] * M * K * N


def add_ratios(records: list[dict]) -> list[dict]:
    """Copies of `records` with fwd[_bwd]_x_bf16 and fwd[_bwd]_x_torchao: the baseline's
    time over the record's time on the same (shape, groups); None where either is missing."""
    times = {(tuple(r["shape"]), r["groups"], r["method"]): r for r in records}
    out = []
    for r in records:
        r = dict(r)
        for base in ("bf16", "torchao"):
            b = times.get((tuple(r["shape"]), r["groups"], base), {})
            for phase in ("fwd", "fwd_bwd"):
                t, t_base = r.get(f"{phase}_ms"), b.get(f"{phase}_ms")
                ok = t is not None and t_base is not None and t > 0
                r[f"{phase}_x_{base}"] = t_base / t if ok else None
        out.append(r)
    return out


def geomeans(records: list[dict], shapes=LARGE_SHAPES) -> list[dict]:
    """Per (groups, method): the geometric mean of each ratio in RATIO_KEYS over the
    records whose shape is in `shapes`, and n_shapes, how many such records there are.
    A ratio is None where no record has it. Records must already carry add_ratios' keys."""
    shapes = {tuple(s) for s in shapes}
    keys = []  # (groups, method) in first-seen order
    for r in records:
        if tuple(r["shape"]) in shapes and (r["groups"], r["method"]) not in keys:
            keys.append((r["groups"], r["method"]))
    out = []
    for groups, method in keys:
        rows = [r for r in records if tuple(r["shape"]) in shapes
                and r["groups"] == groups and r["method"] == method]
        entry = {"groups": groups, "method": method, "n_shapes": len(rows)}
        for key in RATIO_KEYS:
            vals = [r[key] for r in rows if r.get(key) is not None]
            entry[key] = math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None
        out.append(entry)
    return out


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(fraction) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


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
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {"n": len(rows), "sm_mhz_median": median([r[0] for r in rows]),
            "sm_mhz_min": min(r[0] for r in rows), "sm_mhz_max_rated": rows[0][1],
            "power_w_median": median([r[2] for r in rows]), "power_limit_w": rows[0][3],
            "power_capped": sum(1 for r in rows if r[4] & POWER_CAP_BITS) / len(rows)}


def _render(header: list[str], rows: list[list[str]], n_left: int) -> str:
    """Fixed-width columns: the first n_left and the last are text (left-aligned)."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    align = lambda i, c, w: c.ljust(w) if i < n_left or i == len(widths) - 1 else c.rjust(w)
    line = lambda cells: "  ".join(align(i, c, w) for i, (c, w) in
                                   enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_table(records: list[dict], summaries: list[dict] | None = None) -> str:
    """A fixed-width text table of the records (after add_ratios), then the geometric
    means (from geomeans) when there are any. Missing values print as '-'."""
    header = ["M,G,K,N", "groups", "method", "fwd ms", "fwd TF/s", "fwd x bf16",
              "f+b ms", "f+b spread", "f+b TF/s", "f+b x bf16", "f+b x torchao", "peak GiB",
              "rel err", "note"]
    rows = []
    for r in records:
        rows.append([
            ",".join(map(str, r["shape"])), r["groups"], r["method"],
            _fmt(r.get("fwd_ms"), ".3f"), _fmt(r.get("fwd_tflops"), ".0f"),
            _fmt(r.get("fwd_x_bf16"), ".2f"), _fmt(r.get("fwd_bwd_ms"), ".3f"),
            _percent(r.get("fwd_bwd_spread")),
            _fmt(r.get("fwd_bwd_tflops"), ".0f"), _fmt(r.get("fwd_bwd_x_bf16"), ".2f"),
            _fmt(r.get("fwd_bwd_x_torchao"), ".2f"), _fmt(r.get("peak_mem_gib"), ".2f"),
            _fmt(r.get("rel_err"), ".2e"), _clip(r.get("note", ""), 72),
        ])
    text = _render(header, rows, 3)
    if summaries:
        sum_header = ["groups", "method", "shapes", "fwd x bf16", "f+b x bf16",
                      "fwd x torchao", "f+b x torchao"]
        sum_rows = [[s["groups"], s["method"], str(s["n_shapes"])]
                    + [_fmt(s[k], ".3f") for k in RATIO_KEYS] for s in summaries]
        text += ("\n\nGeometric means over those of the large shapes that were run ('shapes': how many) of "
                 + "; ".join(",".join(map(str, s)) for s in LARGE_SHAPES) + "\n"
                 + _render(sum_header + [""], [r + [""] for r in sum_rows], 2))
    return text


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


def round_order(methods: list[str], r: int) -> list[str]:
    """The order of the methods in round r: rotated by r // 2 and reversed in odd rounds,
    so that no method is always timed first, nor always right after the same other one."""
    k = (r // 2) % len(methods) if methods else 0
    order = list(methods[k:]) + list(methods[:k])
    return order[::-1] if r % 2 else order


def summarize_rounds(rec: dict, shape) -> dict:
    """The record's fwd_ms / fwd_bwd_ms (median over rounds), TFLOP/s and fwd_bwd_spread
    ((max - min) / median of the rounds' forward+backward times; None with one round).
    A record whose status is not "ok" (a round failed) gets no times."""
    M, _, K, N = shape
    if rec.get("status", "ok") != "ok":
        return rec
    for phase in ("fwd", "fwd_bwd"):
        times = rec.get(f"{phase}_ms_rounds") or []
        if not times:
            continue
        median = statistics.median(times)
        rec[f"{phase}_ms"] = median
        rec[f"{phase}_tflops"] = flops(M, K, N, phase) / median / 1e9
        if phase == "fwd_bwd":
            rec["fwd_bwd_spread"] = (max(times) - min(times)) / median if len(times) > 1 else None
    return rec


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
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
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
              f"fwd {_fmt(rec.get('fwd_ms'), '.3f')} ms, fwd+bwd {_fmt(rec.get('fwd_bwd_ms'), '.3f')} ms "
              f"(spread {_percent(rec.get('fwd_bwd_spread'))}) {rec['note']}", flush=True)
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
