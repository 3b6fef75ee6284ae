#!/usr/bin/env python3
"""Compare training runs from their metrics JSONL: loss curves, relative difference, table.

    python scripts/compare_runs.py RUN_A.jsonl RUN_B.jsonl [...] --labels a,b \\
        --out docs/img/name.png --table docs/name_table.md [--smooth N]

The PNG has two panels: every run's loss against the step (and its held-out val_loss,
dashed with markers, where the run logged [validation] records), and each run's loss
relative to the first run's (loss_i / loss_0 - 1, in %, on the steps both logged).
--smooth N draws a trailing moving average over N logged points in both panels (1: raw
values; val_loss is never smoothed).

The markdown table (printed, and written to --table when given) has, per run: the last
step; the final loss, the mean loss over the last 10% of the logged steps (at least one;
when every run ends at the same step, of the steps that every run logged, so that runs
logged at other intervals are compared on the same steps), and its difference from the
first run's in %; and tokens/s, tokens/s per GPU, MFU (logged
as a fraction, shown in %; a logged 0 means no known peak and shows n/a) and peak memory
as the median over the logged steps after the first 10% (warm-up; at least after the
first, whose window holds compilation, when two or more were logged). When any run
logged validation, two more columns: the val_loss at the last step that every run with
validation was evaluated at (named in the table's note; else each run's last), and its
difference from the first run's in %.

Metrics files are the training loop's: one JSON object per line, a header
{"run": {"name": ..., ...}} first, then {"step": int, "loss": float, ...} and
{"step": int, "val_loss": float}. Other objects are ignored; a step logged twice (a
resumed run) keeps its last record; an unfinished last line (a run killed while writing it) is left out with a warning. Labels
default to the header's run name, else the file name. Bad input (a missing or unreadable
file, a line that is not a JSON object, a wrong type, no loss records) stops the script
with a message naming the file and line, before anything is written.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ep_fp8.paths import output_path_problem

NUMERIC_KEYS = ("loss", "grad_norm", "lr", "tokens_per_s", "tokens_per_s_per_gpu", "mfu",
                "peak_mem_gib", "load_imbalance", "time_s")
WARMUP_FRACTION = 0.1  # the first 10% of logged steps are warm-up for throughput and memory
FINAL_FRACTION = 0.1   # the final loss is the mean over the last 10% of logged steps


@dataclass
class Run:
    label: str
    path: Path
    header: dict         # the header's "run" object; {} when the file has none
    records: list[dict]  # loss records, sorted by step, one per step
    val_records: list[dict] = field(default_factory=list)  # {"step", "val_loss"}, likewise


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path) -> tuple[dict, list[dict], list[dict]]:
    """-> (header "run" object or {}, loss records sorted by step, one per step, validation
    records likewise).
    ValueError naming the file (and line): missing file, a line that is not a JSON object,
    a non-integer step or a non-numeric metric, or no loss records at all."""
    path = Path(path)
    if path.is_dir():
        inside = path / "metrics.jsonl"
        hint = f" (the run's metrics are {inside})" if inside.is_file() else ""
        raise ValueError(f"{path}: is a folder, not a metrics file{hint}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return _read_records(path)
    except OSError as e:   # permissions, an I/O error
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None


def _read_records(path: Path) -> tuple[dict, list[dict], list[dict]]:
    header, by_step, val_by_step = {}, {}, {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if not raw.endswith(b"\n"):   # the last line, cut short by a crash
                    print(f"compare_runs.py: warning: {path}:{lineno}: an unfinished last "
                          f"line is left out", file=sys.stderr)
                    break
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, "
                                 f"got {type(obj).__name__}")
            if "run" in obj:
                if not isinstance(obj["run"], dict):
                    raise ValueError(f"{path}:{lineno}: 'run' must be an object")
                header = header or obj["run"]  # a resumed run may append a second header
                continue
            if "loss" not in obj and "val_loss" not in obj:
                continue
            step = obj.get("step")
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError(f"{path}:{lineno}: 'step' must be an integer, got {step!r}")
            if "val_loss" in obj:
                if not _is_number(obj["val_loss"]):
                    raise ValueError(f"{path}:{lineno}: 'val_loss' must be a number, "
                                     f"got {obj['val_loss']!r}")
                val_by_step[step] = obj
                continue
            if not _is_number(obj["loss"]):
                raise ValueError(f"{path}:{lineno}: 'loss' must be a number, got {obj['loss']!r}")
            for key in NUMERIC_KEYS:
                if obj.get(key) is not None and not _is_number(obj[key]):
                    raise ValueError(f"{path}:{lineno}: {key!r} must be a number, "
                                     f"got {obj[key]!r}")
            by_step[step] = obj
    if not by_step:
        raise ValueError(f"{path}: no loss records (lines with 'step' and 'loss')")
    return header, [by_step[s] for s in sorted(by_step)], [val_by_step[s] for s in sorted(val_by_step)]


def moving_average(values: list[float], n: int) -> list[float]:
    """Trailing mean over the last n values (fewer at the start); same length as values.
    A non-finite value (a NaN loss) is NaN itself and left out of its neighbours' means."""
    if n < 1:
        raise ValueError(f"smoothing window must be >= 1, got {n}")
    out = []
    for i, v in enumerate(values):
        window = [w for w in values[max(0, i - n + 1):i + 1] if math.isfinite(w)]
        out.append(statistics.fmean(window) if math.isfinite(v) and window else math.nan)
    return out


def relative_difference(ref: list[dict], other: list[dict]) -> tuple[list[int], list[float]]:
    """On the steps both runs logged: (steps, other_loss / ref_loss - 1)."""
    ref_loss = {r["step"]: r["loss"] for r in ref}
    pairs = [(r["step"], r["loss"] / ref_loss[r["step"]] - 1.0 if ref_loss[r["step"]]
              else math.nan) for r in other if r["step"] in ref_loss]
    return [s for s, _ in pairs], [d for _, d in pairs]


def final_loss(records: list[dict], steps: set[int] | None = None) -> float:
    """Mean loss over the last FINAL_FRACTION of the records (at least one record); of
    those whose step is in `steps` when given."""
    if steps is not None:
        records = [r for r in records if r["step"] in steps]
    k = max(1, math.ceil(FINAL_FRACTION * len(records)))
    return statistics.fmean(r["loss"] for r in records[-k:])


def common_steps(runs: list[Run]) -> set[int] | None:
    """The steps every run logged, when all runs end at the same step and share one;
    else None (each run's final loss then comes from its own records)."""
    if len({run.records[-1]["step"] for run in runs}) > 1:
        return None
    shared = set.intersection(*({r["step"] for r in run.records} for run in runs))
    return shared or None


def steady_median(records: list[dict], key: str) -> float | None:
    """Median of `key` over the records after the first WARMUP_FRACTION of them, and at
    least after the first (whose window holds compilation and warm-up) when there are two
    or more; None when no such record has the key."""
    skip = max(1, math.ceil(WARMUP_FRACTION * len(records))) if len(records) > 1 else 0
    values = [r[key] for r in records[skip:] if r.get(key) is not None]
    return statistics.median(values) if values else None


def final_val_loss(runs: list[Run]) -> tuple[list[float | None], int | None]:
    """(each run's val_loss at the last step that every run with validation records was
    evaluated at, that step), or when they share none (each run's last val_loss, None);
    None in place of the value of a run without validation records."""
    evaluated = [run for run in runs if run.val_records]
    shared = set.intersection(*({r["step"] for r in run.val_records} for run in evaluated))
    step = max(shared) if shared else None
    return [None if not run.val_records else run.val_records[-1]["val_loss"] if step is None
            else next(r["val_loss"] for r in run.val_records if r["step"] == step)
            for run in runs], step


def summarize(runs: list[Run]) -> list[dict]:
    """One dict per run: label, last_step, final_loss, final_loss_vs_first_pct (None for the
    first run, and when the first run's final loss is 0), tokens_per_s,
    tokens_per_s_per_gpu, mfu, peak_mem_gib; with validation records in any run, also
    val_loss and val_step (final_val_loss) and val_loss_vs_first_pct."""
    steps = common_steps(runs)
    first = final_loss(runs[0].records, steps)
    out = []
    for i, run in enumerate(runs):
        loss = final_loss(run.records, steps)
        row = {"label": run.label, "last_step": run.records[-1]["step"], "final_loss": loss,
               "final_loss_vs_first_pct": None if i == 0 or first == 0 else 100.0 * (loss / first - 1.0)}
        for key in ("tokens_per_s", "tokens_per_s_per_gpu", "mfu", "peak_mem_gib"):
            row[key] = steady_median(run.records, key)
        out.append(row)
    if any(run.val_records for run in runs):
        val, step = final_val_loss(runs)
        for i, (row, loss) in enumerate(zip(out, val)):
            row["val_loss"], row["val_step"] = loss, step
            row["val_loss_vs_first_pct"] = (None if i == 0 or loss is None or not val[0]
                                            else 100.0 * (loss / val[0] - 1.0))
    return out


def format_markdown(summary: list[dict]) -> str:
    """A markdown table of summarize()'s rows, with a line saying how values are taken."""
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    def rel(i, pct):
        return "ref" if i == 0 else "n/a" if pct is None or not math.isfinite(pct) else f"{pct:+.2f}%"

    first = summary[0]["label"].replace("|", "\\|")
    val = "val_loss" in summary[0]
    lines = [f"| run | last step | final loss | final loss vs {first} | "
             + (f"val loss | val loss vs {first} | " if val else "")
             + "tokens/s | tokens/s/GPU | MFU (%) | peak mem (GiB) |",
             "|---|---:|---:|---:|" + ("---:|---:|" if val else "") + "---:|---:|---:|---:|"]
    for i, row in enumerate(summary):
        cells = [row["label"].replace("|", "\\|"), str(row["last_step"]),
                 fmt(row["final_loss"], ".4f"), rel(i, row["final_loss_vs_first_pct"])]
        if val:
            cells += [fmt(row["val_loss"], ".4f"), rel(i, row["val_loss_vs_first_pct"])]
        cells += [fmt(row["tokens_per_s"], ",.0f"), fmt(row["tokens_per_s_per_gpu"], ",.0f"),
                  fmt(100.0 * row["mfu"] if row["mfu"] else None, ".2f"),
                  fmt(row["peak_mem_gib"], ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    note = ("Final loss: mean over the last 10% of logged steps (of the steps every run "
            "logged, when they end at the same step). tokens/s, MFU and peak "
            "memory: median over the logged steps after the first 10%.")
    if val:
        step = summary[0]["val_step"]
        note += (f" Val loss: on held-out data, at step {step}, the last that every run with "
                 f"validation was evaluated at." if step is not None else
                 " Val loss: on held-out data, each run's last (the runs share no evaluated step).")
    if any(not math.isfinite(row["final_loss"]) for row in summary):
        note += (" A final loss that is not finite (a run that diverged) is compared with "
                 "none (n/a).")
    if any(row["mfu"] == 0 for row in summary):
        note += " MFU n/a: the run knew no peak FLOP/s for its device (it logs 0)."
    if any(row["mfu"] is None for row in summary):
        note += " MFU n/a: not in the metrics file."
    if len({row["last_step"] for row in summary}) > 1:
        note += (" The runs end at different steps, so their final losses are not taken at the "
                 "same point of training.")
    lines.append(note)
    return "\n".join(lines) + "\n"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("compare_runs.py draws with matplotlib, which is not installed: "
                          "pip install matplotlib (or pip install -e '.[plot]')") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _image_formats() -> set[str]:
    """The file suffixes (without the dot) savefig can write: it picks the format from it."""
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    return set(FigureCanvasBase.get_supported_filetypes())


def plot(runs: list[Run], out: Path, smooth: int = 1) -> None:
    """Writes the two-panel PNG (loss; relative difference to runs[0] in %) to `out`."""
    plt = _pyplot()
    fig, (ax_loss, ax_rel) = plt.subplots(2, 1, sharex=True, figsize=(9, 7),
                                          gridspec_kw={"height_ratios": [2, 1]})
    # Legend entries by hand: matplotlib leaves out a line whose label begins with "_".
    legends: dict = {ax_loss: ([], []), ax_rel: ([], [])}

    def line(ax, *args, label, **kwargs):
        handles, labels = legends[ax]
        handles.append(ax.plot(*args, label=label, **kwargs)[0])
        labels.append(label)

    for i, run in enumerate(runs):
        steps = [r["step"] for r in run.records]
        line(ax_loss, steps, moving_average([r["loss"] for r in run.records], smooth),
             color=f"C{i}", label=run.label, linewidth=1.2)
        if run.val_records:
            line(ax_loss, [r["step"] for r in run.val_records],
                 [r["val_loss"] for r in run.val_records], color=f"C{i}",
                 linestyle="--", marker="o", markersize=3, linewidth=1.0,
                 label=f"{run.label} (val)")
        if i > 0:
            rel_steps, rel = relative_difference(runs[0].records, run.records)
            line(ax_rel, rel_steps, moving_average([100.0 * d for d in rel], smooth),
                 color=f"C{i}", label=f"{run.label} vs {runs[0].label}", linewidth=1.2)
    ax_rel.axhline(0.0, color="C0", linewidth=0.8)
    smoothing = f" (moving average over {smooth} logged steps)" if smooth > 1 else ""
    held_out = "; dashed: held-out val_loss" if any(run.val_records for run in runs) else ""
    ax_loss.set_title("Training loss" + smoothing + held_out)
    ax_loss.set_ylabel("loss")
    ax_rel.set_ylabel(f"loss / loss[{runs[0].label}] - 1 (%)")
    ax_rel.set_xlabel("step")
    for ax in (ax_loss, ax_rel):
        ax.grid(True, alpha=0.3)
        ax.legend(*legends[ax])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def load_runs(paths: list[str], labels: str | None) -> list[Run]:
    """Reads every file; labels from --labels (comma-separated, one per file), else the
    header's run name, else the file name. ValueError on bad files or a label count."""
    if len(paths) < 2:
        raise ValueError(f"need at least two metrics files to compare, got {len(paths)}")
    label_list = labels.split(",") if labels is not None else None
    if label_list is not None and len(label_list) != len(paths):
        raise ValueError(f"--labels has {len(label_list)} labels for {len(paths)} files")
    runs = []
    for i, path in enumerate(paths):
        header, records, val_records = read_metrics(path)
        label = label_list[i] if label_list else str(header.get("name") or Path(path).stem)
        runs.append(Run(label, Path(path), header, records, val_records))
    return runs


def main(argv=None) -> int:
    """CLI entry; returns 0, or 2 with a message on stderr for bad input (nothing written)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("metrics", nargs="+", help="metrics JSONL files; the first is the reference")
    p.add_argument("--labels", help="comma-separated labels, one per file")
    p.add_argument("--out", required=True,
                   help="image to write (.png, or another format by its suffix: .svg, .pdf, ...)")
    p.add_argument("--table", help="markdown file to write the table to")
    p.add_argument("--smooth", type=int, default=1, help="moving average window (points)")
    args = p.parse_args(argv)
    try:
        if args.smooth < 1:
            raise ValueError(f"--smooth must be >= 1, got {args.smooth}")
        formats = _image_formats()
        if Path(args.out).suffix.lower().lstrip(".") not in formats:
            raise ValueError(f"--out must end in an image format matplotlib writes "
                             f"({', '.join('.' + f for f in sorted(formats))}), got {args.out!r}")
        for flag, path in (("--out", args.out), ("--table", args.table)):
            if path and (problem := output_path_problem(path)):
                raise ValueError(f"{flag} {path!r} {problem}")
        if args.table:
            taken = {Path(m).resolve(): f"metrics file {m!r}" for m in args.metrics}
            taken[Path(args.out).resolve()] = f"--out {args.out!r}"
            if Path(args.table).resolve() in taken:
                raise ValueError(f"--table {args.table!r} is the same file as the "
                                 f"{taken[Path(args.table).resolve()]}: it would be overwritten")
        runs = load_runs(args.metrics, args.labels)
        table = format_markdown(summarize(runs))
        plot(runs, Path(args.out), args.smooth)
    except OSError as e:  # savefig could not write (inputs were read by then)
        print(f"compare_runs.py: error: cannot write {args.out!r}: {e.strerror or e}", file=sys.stderr)
        return 2
    except (ValueError, ImportError) as e:
        print(f"compare_runs.py: error: {e}", file=sys.stderr)
        return 2
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table)
    print(table, end="")
    print(f"wrote {args.out}" + (f" and {args.table}" if args.table else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
