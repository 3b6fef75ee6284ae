"""scripts/compare_runs.py: what the plot draws, the table's layout, and the errors of the
command line (messages, not tracebacks, and nothing written)."""
import json
import math
import sys

import numpy as np
import pytest

from .test_compare_runs import parse_table, write_metrics

pytest.importorskip("matplotlib")


@pytest.fixture
def drawn(monkeypatch):
    """The figures plot() draws: plt.close is held back until the test ends."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    yield figures
    for fig in figures:
        close(fig)


def curves(ax):
    """{label: (xdata, ydata)} of an axes' labelled lines (not the zero line)."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines() if not line.get_label().startswith("_")}


def two_runs(tmp_path, loss_a, loss_b, val_a=None):
    steps = list(range(1, len(loss_a) + 1))
    write_metrics(tmp_path / "a.jsonl", "a", steps, loss_a, seed=1)
    write_metrics(tmp_path / "b.jsonl", "b", steps, loss_b, seed=2)
    if val_a:
        with open(tmp_path / "a.jsonl", "a") as f:
            f.writelines(json.dumps({"step": s, "val_loss": v}) + "\n" for s, v in val_a.items())
    return [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]


def test_the_plot_draws_the_other_runs_against_the_first_in_percent_smoothed(
        compare_runs, tmp_path, drawn):
    rel = [0.01, 0.03, -0.02, 0.05, 0.0, 0.02, 0.04, -0.01]
    loss_a = [3.0 - 0.1 * i for i in range(8)]
    loss_b = [a * (1 + d) for a, d in zip(loss_a, rel)]
    val_a = {2: 3.0, 4: 1.0, 6: 2.0}
    files = two_runs(tmp_path, loss_a, loss_b, val_a)

    assert compare_runs.main(files + ["--out", str(tmp_path / "p.png"), "--smooth", "3"]) == 0

    (fig,) = drawn
    ax_loss, ax_rel = fig.axes
    (label, (steps, pct)), = curves(ax_rel).items()   # the first run is not drawn against itself
    assert label == "b vs a" and steps == list(range(1, 9))
    expected = [100 * np.mean(rel[max(0, i - 2):i + 1]) for i in range(8)]  # trailing, 3 points
    assert pct == pytest.approx(expected, abs=1e-9)
    assert ax_rel.get_ylabel() == "loss / loss[a] - 1 (%)"
    loss_curves = curves(ax_loss)
    assert loss_curves["a (val)"] == (list(val_a), list(val_a.values()))   # never smoothed
    assert loss_curves["b"][1] == pytest.approx(
        [np.mean(loss_b[max(0, i - 2):i + 1]) for i in range(8)], abs=1e-12)
    title = ax_loss.get_title()
    assert "moving average over 3 logged steps" in title and "dashed: held-out val_loss" in title


def test_a_reference_loss_of_zero_at_a_step_is_a_gap_in_the_relative_curve(
        compare_runs, tmp_path, drawn):
    files = two_runs(tmp_path, [2.0, 0.0, 1.0], [2.2, 0.1, 1.1])
    assert compare_runs.main(files + ["--out", str(tmp_path / "p.png")]) == 0
    _, pct = curves(drawn[0].axes[1])["b vs a"]
    assert pct[0] == pytest.approx(10.0) and math.isnan(pct[1]) and pct[2] == pytest.approx(10.0)


def test_a_first_val_loss_of_zero_gives_no_relative_difference(compare_runs, tmp_path):
    files = two_runs(tmp_path, [2.0, 1.5], [2.1, 1.6], val_a={2: 0.0})
    with open(files[1], "a") as f:
        f.write(json.dumps({"step": 2, "val_loss": 0.5}) + "\n")
    summary = compare_runs.summarize(compare_runs.load_runs(files, None))
    assert [row["val_loss"] for row in summary] == [0.0, 0.5]
    assert summary[1]["val_loss_vs_first_pct"] is None
    assert parse_table(compare_runs.format_markdown(summary))[1][4:6] == ["0.5000", "n/a"]


@pytest.mark.parametrize("diverged", ["a", "b"])
def test_a_final_loss_that_is_not_finite_has_no_relative_difference(compare_runs, tmp_path, capsys,
                                                                    diverged):
    finite = [3.0, 2.5, 2.2, 2.1, 2.0]
    nan = [3.0, 2.5, 2.2, float("nan"), float("nan")]
    paths = two_runs(tmp_path, nan if diverged == "a" else finite, finite if diverged == "a" else nan)
    assert compare_runs.main([*paths, "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    rows = parse_table(out)
    assert rows[0 if diverged == "a" else 1][2] == "nan"
    assert rows[1][3] == "n/a" and "nan%" not in out
    assert "not finite" in out


@pytest.mark.parametrize("with_val", [False, True])
def test_every_table_line_has_as_many_cells_as_the_header(compare_runs, tmp_path, capsys, with_val):
    files = two_runs(tmp_path, [2.0, 1.5], [2.06, 1.53], val_a={2: 1.7} if with_val else None)
    assert compare_runs.main(files + ["--out", str(tmp_path / "p.png")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("|")]
    assert len(lines) == 4 and len({ln.count("|") for ln in lines}) == 1, lines
    assert lines[0].count("|") == (11 if with_val else 9)
    assert parse_table("\n".join(lines))[1][3] == "+2.00%"   # signed, in %


def test_a_metric_logged_as_null_counts_as_not_logged(compare_runs, tmp_path):
    files = two_runs(tmp_path, [2.0, 1.5, 1.2], [2.1, 1.6, 1.3])
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps(dict(json.loads(ln), peak_mem_gib=None)) + "\n"
                            if '"loss"' in ln else ln + "\n" for ln in path.read_text().splitlines()))
    summary = compare_runs.summarize(compare_runs.load_runs(files, None))
    assert summary[1]["peak_mem_gib"] is None and summary[0]["peak_mem_gib"] is not None
    assert parse_table(compare_runs.format_markdown(summary))[1][7] == "n/a"


def _write(path, *objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))


@pytest.mark.parametrize("case", ["bool loss", "run not an object"])
def test_bad_values_are_named_by_file_and_line(compare_runs, tmp_path, capsys, case):
    good = tmp_path / "good.jsonl"
    write_metrics(good, "good", [1, 2], [2.0, 1.5], seed=0)
    bad = tmp_path / "bad.jsonl"
    if case == "bool loss":
        _write(bad, {"run": {"name": "x"}}, {"step": 1, "loss": 2.0}, {"step": 2, "loss": True})
        message = "bad.jsonl:3: 'loss' must be a number, got True"
    else:
        _write(bad, {"run": "x"}, {"step": 1, "loss": 2.0})
        message = "bad.jsonl:1: 'run' must be an object"
    out, table = tmp_path / "p.png", tmp_path / "t.md"
    assert compare_runs.main([str(good), str(bad), "--out", str(out), "--table", str(table)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not table.exists()


@pytest.mark.parametrize("extra, message", [
    (["--smooth", "0"], "--smooth must be >= 1, got 0"),
    (["--labels", ""], "--labels has 1 labels for 2 files"),
    (["--only-one"], "need at least two metrics files to compare, got 1"),
])
def test_bad_options_are_messages_and_write_nothing(compare_runs, tmp_path, capsys, extra, message):
    files = two_runs(tmp_path, [2.0, 1.5], [2.1, 1.6])
    if extra == ["--only-one"]:
        files, extra = files[:1], []
    out, table = tmp_path / "p.png", tmp_path / "t.md"
    assert compare_runs.main(files + extra + ["--out", str(out), "--table", str(table)]) == 2
    assert f"compare_runs.py: error: {message}" in capsys.readouterr().err
    assert not out.exists() and not table.exists()


def test_an_image_that_cannot_be_saved_is_a_message_and_no_table(compare_runs, tmp_path, capsys,
                                                                 monkeypatch):
    from matplotlib.figure import Figure

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Figure, "savefig", refuse)
    files = two_runs(tmp_path, [2.0, 1.5], [2.1, 1.6])
    out, table = tmp_path / "p.png", tmp_path / "t.md"
    assert compare_runs.main(files + ["--out", str(out), "--table", str(table)]) == 2
    assert f"error: cannot write {str(out)!r}: Permission denied" in capsys.readouterr().err
    assert not table.exists()


def test_without_matplotlib_the_message_says_how_to_install_it(compare_runs, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    files = two_runs(tmp_path, [2.0, 1.5], [2.1, 1.6])
    assert compare_runs.main(files + ["--out", str(tmp_path / "p.png")]) == 2
    assert "matplotlib, which is not installed: pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_labels_beginning_with_an_underscore_still_reach_the_legends(compare_runs, tmp_path, drawn):
    files = two_runs(tmp_path, [3.0, 2.0, 1.0], [3.1, 2.1, 1.1])
    assert compare_runs.main(files + ["--labels", "_base,_fp8", "--out", str(tmp_path / "p.png")]) == 0
    ax_loss, ax_rel = drawn[0].axes
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == ["_base", "_fp8"]
    assert [t.get_text() for t in ax_rel.get_legend().get_texts()] == ["_fp8 vs _base"]


def test_mfu_missing_from_the_files_is_not_blamed_on_an_unknown_peak(compare_runs, tmp_path):
    steps = [1, 2]
    for name in ("a", "b"):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.write(json.dumps({"run": {"name": name}}) + "\n")
            f.writelines(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in steps)
    runs = compare_runs.load_runs([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], None)
    table = compare_runs.format_markdown(compare_runs.summarize(runs))
    assert "MFU n/a: not in the metrics file." in table and "knew no peak" not in table
