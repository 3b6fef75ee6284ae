"""The records of scripts/bench_grouped_mm.py, without a GPU: shapes and group sizes,
speed-up ratios, geometric means over the large shapes, and the text table.

A record is one (shape, groups mode, method): {"shape", "groups", "group_sizes", "method",
"status", "note", "fwd_ms_rounds", "fwd_bwd_ms_rounds"} from the measurement, to which
summarize_rounds adds the medians, TFLOP/s and spread, and add_ratios the speed-ups.
"""
from __future__ import annotations

import math
import statistics

import torch

DEFAULT_SHAPES = [  # (M, G, K, N); the first four are the "large" ones of the geomean
    (16384, 8, 5120, 16384), (16384, 8, 8192, 5120), (32768, 8, 7168, 4096),
    (32768, 8, 2048, 7168), (8192, 16, 2048, 2816), (8192, 16, 1408, 2048),
    (4096, 32, 2048, 768), (65536, 4, 4096, 14336),
]
LARGE_SHAPES = DEFAULT_SHAPES[:4]
GROUP_MODES = ("uniform", "uneven")
RATIO_KEYS = ("fwd_x_bf16", "fwd_bwd_x_bf16", "fwd_x_torchao", "fwd_bwd_x_torchao")


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
    records whose shape is in `shapes` and that have it, `n_<key>` how many those are, and
    n_shapes how many have any ratio (a shape whose run failed or was skipped has none and
    is not counted). A ratio is None where no record has it. Records must already carry
    add_ratios' keys."""
    shapes = {tuple(s) for s in shapes}
    keys = []  # (groups, method) in first-seen order
    for r in records:
        if tuple(r["shape"]) in shapes and (r["groups"], r["method"]) not in keys:
            keys.append((r["groups"], r["method"]))
    out = []
    for groups, method in keys:
        rows = [r for r in records if tuple(r["shape"]) in shapes
                and r["groups"] == groups and r["method"] == method]
        entry = {"groups": groups, "method": method}
        for key in RATIO_KEYS:
            vals = [r[key] for r in rows if r.get(key) is not None]
            entry[key] = math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None
            entry[f"n_{key}"] = len(vals)
        entry["n_shapes"] = sum(any(r.get(k) is not None for k in RATIO_KEYS) for r in rows)
        out.append(entry)
    return out


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def percent(fraction) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def render(header: list[str], rows: list[list[str]], n_left: int) -> str:
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
            fmt(r.get("fwd_ms"), ".3f"), fmt(r.get("fwd_tflops"), ".0f"),
            fmt(r.get("fwd_x_bf16"), ".2f"), fmt(r.get("fwd_bwd_ms"), ".3f"),
            percent(r.get("fwd_bwd_spread")),
            fmt(r.get("fwd_bwd_tflops"), ".0f"), fmt(r.get("fwd_bwd_x_bf16"), ".2f"),
            fmt(r.get("fwd_bwd_x_torchao"), ".2f"), fmt(r.get("peak_mem_gib"), ".2f"),
            fmt(r.get("rel_err"), ".2e"), clip(r.get("note", ""), 72),
        ])
    text = render(header, rows, 3)
    if summaries:
        sum_header = ["groups", "method", "shapes", "fwd x bf16", "f+b x bf16",
                      "fwd x torchao", "f+b x torchao"]
        sum_rows = [[s["groups"], s["method"], str(s["n_shapes"])]
                    + [fmt(s[k], ".3f") for k in RATIO_KEYS] for s in summaries]
        text += ("\n\nGeometric means over those of the large shapes that have each ratio ('shapes': "
                 "how many ran) of "
                 + "; ".join(",".join(map(str, s)) for s in LARGE_SHAPES) + "\n"
                 + render(sum_header + [""], [r + [""] for r in sum_rows], 2))
    return text


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
