"""scripts/compare_runs.py on metrics files written here, in the training loop's format."""
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest

from .conftest import SCRIPTS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, name, steps, losses, seed, header=True):
    """A metrics JSONL file with random throughput/MFU/memory; returns its loss records."""
    rng = random.Random(seed)
    records = [{"step": s, "loss": loss, "grad_norm": rng.uniform(0.5, 2), "lr": 3e-4,
                "tokens_per_s": rng.uniform(9e4, 1.1e5), "tokens_per_s_per_gpu": rng.uniform(1e4, 2e4),
                "mfu": rng.uniform(0.3, 0.5), "peak_mem_gib": rng.uniform(40, 60),
                "load_imbalance": rng.uniform(1, 2), "time_s": 0.1 * s}
               for s, loss in zip(steps, losses)]
    lines = [{"run": {"name": name, "config": {"lr": 3e-4}, "world_size": 8,
                      "device": "cuda", "torch": "2.11.0", "date": "2026-11-24"}}] if header else []
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines + records))
    return records


def parse_table(text):
    """Markdown table rows -> list of cell lists (header and separator dropped)."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[2:]]


def test_main_writes_png_and_table_with_independently_computed_numbers(compare_runs, tmp_path):
    rng = random.Random(0)
    steps = list(range(5, 205, 5))  # 40 logged steps
    loss_a = [4.0 * math.exp(-s / 80) + 2.0 + rng.gauss(0, 0.02) for s in steps]
    loss_b = [v * (1.02 + rng.gauss(0, 0.003)) for v in loss_a]
    rec_a = write_metrics(tmp_path / "a.jsonl", "bf16", steps, loss_a, seed=1)
    rec_b = write_metrics(tmp_path / "b.jsonl", "fp8", steps, loss_b, seed=2)
    out, table = tmp_path / "img" / "cmp.png", tmp_path / "docs" / "cmp.md"

    rc = compare_runs.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                            "--out", str(out), "--table", str(table), "--smooth", "3"])

    assert rc == 0
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    image = __import__("matplotlib.image").image.imread(str(out))
    assert image.shape[0] > 100 and image.shape[1] > 100
    rows = parse_table(table.read_text())
    assert [r[0] for r in rows] == ["bf16", "fp8"]
    # Independent definitions: final = mean of the last 4 (10% of 40) losses; throughput,
    # MFU and memory = median over records 4.. (after the first 10%).
    final = [np.mean(loss_a[-4:]), np.mean(loss_b[-4:])]
    for row, recs, fin in zip(rows, (rec_a, rec_b), final):
        assert row[1] == "200"
        assert abs(float(row[2]) - fin) <= 5e-5  # printed with 4 decimals
        for col, key, tol in ((4, "tokens_per_s", 0.5), (5, "tokens_per_s_per_gpu", 0.5),
                              (7, "peak_mem_gib", 0.005)):
            expected = np.median([r[key] for r in recs[4:]])
            assert abs(float(row[col].replace(",", "")) - expected) <= tol, key
        mfu_pct = 100 * np.median([r["mfu"] for r in recs[4:]])
        assert abs(float(row[6]) - mfu_pct) <= 0.005  # a fraction in the file, % in the table
    assert rows[0][3] == "ref"
    assert float(rows[1][3].rstrip("%")) == pytest.approx(100 * (final[1] / final[0] - 1), abs=0.005)


def test_mfu_logged_as_zero_shows_as_not_available(compare_runs, tmp_path, capsys):
    for name in ("a", "b"):
        path = tmp_path / f"{name}.jsonl"
        write_metrics(path, name, [1, 2], [2.0, 1.9], seed=0)
        path.write_text(path.read_text().replace('"mfu": 0.', '"mfu": 0.0, "x": 0.'))
    assert compare_runs.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                              "--out", str(tmp_path / "c.png")]) == 0
    assert [r[6] for r in parse_table(capsys.readouterr().out)] == ["n/a", "n/a"]


def test_labels_default_to_header_name_then_file_name(compare_runs, tmp_path, capsys):
    write_metrics(tmp_path / "first.jsonl", "bf16-baseline", [1, 2, 3], [3.0, 2.5, 2.2], seed=0)
    write_metrics(tmp_path / "second.jsonl", "x", [1, 2, 3], [3.1, 2.6, 2.3], seed=1, header=False)
    rc = compare_runs.main([str(tmp_path / "first.jsonl"), str(tmp_path / "second.jsonl"),
                            "--out", str(tmp_path / "c.png")])
    assert rc == 0
    assert [r[0] for r in parse_table(capsys.readouterr().out)] == ["bf16-baseline", "second"]


def test_labels_option_overrides_and_must_match_file_count(compare_runs, tmp_path, capsys):
    for name in ("a", "b"):
        write_metrics(tmp_path / f"{name}.jsonl", name, [1, 2], [2.0, 1.9], seed=0)
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert compare_runs.main(files + ["--labels", "x,y", "--out", str(tmp_path / "c.png")]) == 0
    assert [r[0] for r in parse_table(capsys.readouterr().out)] == ["x", "y"]
    assert compare_runs.main(files + ["--labels", "x", "--out", str(tmp_path / "d.png")]) == 2
    assert "--labels has 1 labels for 2 files" in capsys.readouterr().err
    assert not (tmp_path / "d.png").exists()


def test_resumed_run_keeps_first_header_and_last_record_per_step(compare_runs, tmp_path):
    lines = [{"run": {"name": "first"}}, {"step": 1, "loss": 3.0}, {"step": 3, "loss": 2.0},
             {"run": {"name": "resumed"}}, {"step": 2, "loss": 2.5}, {"step": 2, "loss": 2.4},
             {"step": 4, "eval": 1.0}]  # last: no loss, ignored
    path = tmp_path / "resumed.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
    header, records, _ = compare_runs.read_metrics(path)
    assert header == {"name": "first"}
    assert [(r["step"], r["loss"]) for r in records] == [(1, 3.0), (2, 2.4), (3, 2.0)]


def test_relative_difference_only_on_common_steps(compare_runs):
    ref = [{"step": s, "loss": 2.0 + 0.1 * s} for s in range(0, 11)]
    other = [{"step": s, "loss": 2.2 + 0.1 * s} for s in range(0, 13, 2)]
    steps, rel = compare_runs.relative_difference(ref, other)
    assert steps == [0, 2, 4, 6, 8, 10]
    assert rel == pytest.approx([(2.2 + 0.1 * s) / (2.0 + 0.1 * s) - 1 for s in steps], rel=1e-12)


def test_moving_average_is_a_trailing_mean(compare_runs):
    values = list(np.random.default_rng(0).normal(size=20))
    got = compare_runs.moving_average(values, 4)
    expected = [np.mean(values[max(0, i - 3):i + 1]) for i in range(20)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert compare_runs.moving_average(values, 1) == pytest.approx(values)
    # A NaN loss is a gap in the curve, not the end of it.
    values[5] = math.nan
    got = compare_runs.moving_average(values, 4)
    assert math.isnan(got[5]) and all(math.isfinite(v) for i, v in enumerate(got) if i != 5)
    assert got[7] == pytest.approx(np.mean([values[4], values[6], values[7]]), abs=1e-12)


def test_final_and_steady_statistics_round_fractions_as_documented(compare_runs):
    records = [{"step": i, "loss": float(i), "mfu": float(100 - i)} for i in range(25)]
    assert compare_runs.final_loss(records) == pytest.approx(np.mean([22, 23, 24]))  # ceil(2.5)
    assert compare_runs.steady_median(records, "mfu") == pytest.approx(np.median(range(76, 98)))  # ceil(2.5) skipped
    assert compare_runs.steady_median(records, "tokens_per_s") is None
    assert compare_runs.final_loss(records[:3]) == 2.0  # at least one record


def _bad_files(tmp_path):
    good = tmp_path / "good.jsonl"
    write_metrics(good, "good", [1, 2, 3], [3.0, 2.0, 1.5], seed=0)
    text = good.read_text().splitlines()
    bad_json = tmp_path / "bad_json.jsonl"
    bad_json.write_text("\n".join(text[:2] + ['{"step": 3, "loss": 1.'] + text[3:]) + "\n")
    no_loss = tmp_path / "no_loss.jsonl"
    no_loss.write_text(text[0] + "\n")
    bad_step = tmp_path / "bad_step.jsonl"
    bad_step.write_text(text[0] + '\n{"step": "2", "loss": 1.0}\n')
    not_object = tmp_path / "list.jsonl"
    not_object.write_text("[1, 2]\n")
    null_loss = tmp_path / "null_loss.jsonl"
    null_loss.write_text(text[0] + '\n{"step": 2, "loss": null}\n')
    return good, {
        "missing": (tmp_path / "missing.jsonl", "missing.jsonl: no such file"),
        "not json": (bad_json, "bad_json.jsonl:3: not valid JSON"),
        "no loss": (no_loss, "no_loss.jsonl: no loss records"),
        "bad step": (bad_step, "bad_step.jsonl:2: 'step' must be an integer"),
        "not object": (not_object, "list.jsonl:1: expected a JSON object"),
        "null loss": (null_loss, "null_loss.jsonl:2: 'loss' must be a number, got None"),
    }


@pytest.mark.parametrize("case", ["missing", "not json", "no loss", "bad step", "not object", "null loss"])
def test_bad_input_names_file_and_line_and_writes_nothing(compare_runs, tmp_path, capsys, case):
    good, cases = _bad_files(tmp_path)
    bad, message = cases[case]
    out, table = tmp_path / "out.png", tmp_path / "table.md"
    rc = compare_runs.main([str(good), str(bad), "--out", str(out), "--table", str(table)])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not table.exists()


@pytest.mark.parametrize("out, table, message", [
    ("plot", None, "--out must end in an image format matplotlib writes ("),
    ("plot.txt", None, "--out must end in an image format matplotlib writes"),
    ("plot.png", ".", "it is a folder, not a file"),
    ("a.jsonl/plot.png", None, "a.jsonl' is a file, not a folder"),
    ("plot.png", "b.jsonl/table.md", "b.jsonl' is a file, not a folder"),
    ("plot.png", "b.jsonl", "--table '{tmp}/b.jsonl' is the same file as the metrics file"),
    ("plot.svg", "plot.svg", "--table '{tmp}/plot.svg' is the same file as the --out"),
])
def test_bad_output_paths_are_errors_before_anything_is_written(compare_runs, tmp_path, capsys,
                                                                out, table, message):
    for name in ("a", "b"):
        write_metrics(tmp_path / f"{name}.jsonl", name, [1, 2], [2.0, 1.5], seed=0)
    args = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(tmp_path / out)]
    if table:
        args += ["--table", str(tmp_path / table)]
    before = (tmp_path / "b.jsonl").read_text()
    assert compare_runs.main(args) == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]
    assert (tmp_path / "b.jsonl").read_text() == before


def test_labels_with_a_bar_and_runs_of_different_lengths_are_told_apart(compare_runs, tmp_path, capsys):
    write_metrics(tmp_path / "a.jsonl", "a", [1, 2, 3], [2.0, 1.5, 1.2], seed=0)
    write_metrics(tmp_path / "b.jsonl", "b", [1, 2], [2.0, 1.6], seed=1)
    assert compare_runs.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--labels", "x|y,z",
                              "--out", str(tmp_path / "p.png")]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("| run"))
    assert header.count(" | ") == 7 and "x\\|y" in header  # eight columns, the bar escaped
    assert "The runs end at different steps" in text


def test_a_metrics_file_that_is_not_utf8_or_is_a_folder_is_named(compare_runs, tmp_path, capsys):
    write_metrics(tmp_path / "a.jsonl", "a", [1, 2], [2.0, 1.5], seed=0)
    (tmp_path / "b.jsonl").write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.\xff}\n')
    (tmp_path / "c").mkdir()
    for bad, message in (("b.jsonl", "b.jsonl:2: not UTF-8 (byte 22 of the line)"), ("c", "c: is a folder")):
        assert compare_runs.main([str(tmp_path / "a.jsonl"), str(tmp_path / bad), "--out", str(tmp_path / "p.png")]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "run").mkdir()   # a run's folder
    write_metrics(tmp_path / "run" / "metrics.jsonl", "run", [1, 2], [2.0, 1.5], seed=0)
    assert compare_runs.main([str(tmp_path / "a.jsonl"), str(tmp_path / "run"), "--out", str(tmp_path / "p.png")]) == 2
    assert f"run: is a folder, not a metrics file (the run's metrics are {tmp_path / 'run' / 'metrics.jsonl'})" in capsys.readouterr().err


def test_throughput_skips_the_first_record_of_a_short_run(compare_runs):
    # 5 records (10% of them rounds to none): the first window, with compilation, still goes.
    records = [{"step": 10 * i, "loss": 1.0, "tokens_per_s": v}
               for i, v in enumerate([14_000, 150_000, 160_000, 155_000, 170_000], 1)]
    assert compare_runs.steady_median(records, "tokens_per_s") == 157_500
    assert compare_runs.steady_median(records[:1], "tokens_per_s") == 14_000   # nothing else


def test_a_reference_final_loss_of_zero_gives_no_relative_difference(compare_runs, tmp_path):
    write_metrics(tmp_path / "a.jsonl", "a", [1, 2], [1.0, 0.0], seed=0)
    write_metrics(tmp_path / "b.jsonl", "b", [1, 2], [1.0, 0.5], seed=1)
    rows = compare_runs.summarize(compare_runs.load_runs([str(tmp_path / "a.jsonl"),
                                                          str(tmp_path / "b.jsonl")], None))
    assert rows[1]["final_loss_vs_first_pct"] is None
    assert parse_table(compare_runs.format_markdown(rows))[1][3] == "n/a"


def test_cli_exits_with_message_for_a_missing_file(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPTS / "compare_runs.py"),
                           str(tmp_path / "nope.jsonl"), str(tmp_path / "nope2.jsonl"),
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{tmp_path / 'nope.jsonl'}: no such file" in proc.stderr


def test_table_explains_missing_mfu_only_when_a_run_lacks_it(compare_runs):
    row = {"label": "a", "last_step": 10, "final_loss": 1.0, "final_loss_vs_first_pct": None,
           "tokens_per_s": 1.0, "tokens_per_s_per_gpu": 1.0, "mfu": 0.4, "peak_mem_gib": 1.0}
    assert "MFU n/a" not in compare_runs.format_markdown([row, dict(row, label="b")])
    assert "MFU n/a" in compare_runs.format_markdown([row, dict(row, label="b", mfu=0.0)])


def test_out_may_be_another_image_format_by_its_suffix(compare_runs, tmp_path):
    for name in ("a", "b"):
        write_metrics(tmp_path / f"{name}.jsonl", name, [1, 2], [2.0, 1.5], seed=0)
    out = tmp_path / "cmp.svg"
    assert compare_runs.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(out)]) == 0
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()


def test_runs_logged_at_other_intervals_get_their_final_loss_on_the_same_steps(compare_runs, tmp_path):
    rng = random.Random(1)
    every_step = [3.0 - 0.05 * s + rng.uniform(-0.1, 0.1) for s in range(1, 41)]
    sparse, dense = tmp_path / "every10.jsonl", tmp_path / "every1.jsonl"
    write_metrics(sparse, "every10", [10, 20, 30, 40], every_step[9::10], seed=0)
    write_metrics(dense, "every1", list(range(1, 41)), every_step, seed=1)
    runs = compare_runs.load_runs([str(sparse), str(dense)], None)
    assert compare_runs.common_steps(runs) == {10, 20, 30, 40}
    rows = compare_runs.summarize(runs)
    # The last 10% of the 4 shared steps: step 40 alone, in both runs.
    assert rows[0]["final_loss"] == rows[1]["final_loss"] == every_step[39]
    assert rows[1]["final_loss_vs_first_pct"] == 0.0
    # Runs that end at different steps keep each run's own last 10%.
    write_metrics(dense, "every1", list(range(1, 39)), every_step[:38], seed=1)
    runs = compare_runs.load_runs([str(sparse), str(dense)], None)
    assert compare_runs.common_steps(runs) is None
    assert compare_runs.summarize(runs)[1]["final_loss"] == pytest.approx(np.mean(every_step[34:38]))


def test_an_unfinished_last_line_is_left_out_with_a_warning(compare_runs, tmp_path, capsys):
    path = tmp_path / "torn.jsonl"
    write_metrics(path, "torn", [1, 2, 3], [3.0, 2.0, 1.5], seed=0)
    path.write_text(path.read_text() + '{"step": 4, "loss": 1.')   # killed while writing
    header, records, _ = compare_runs.read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3] and header["name"] == "torn"
    assert f"warning: {path}:5: an unfinished last line is left out" in capsys.readouterr().err
    path.write_text(path.read_text() + "\n")           # a finished line: still an error
    with pytest.raises(ValueError, match=r"torn.jsonl:5: not valid JSON"):
        compare_runs.read_metrics(path)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/mem"), reason="needs Linux /proc")
def test_an_input_that_cannot_be_read_is_named_as_the_input(compare_runs, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    write_metrics(good, "good", [1, 2], [3.0, 2.0], seed=0)
    rc = compare_runs.main([str(good), "/proc/self/mem", "--out", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "error: /proc/self/mem: cannot be read (" in err and "cannot write" not in err, err
    assert not (tmp_path / "out.png").exists()


def test_validation_records_give_val_columns_at_the_last_step_every_run_validated(
        compare_runs, tmp_path):
    rng = random.Random(5)
    steps = list(range(10, 110, 10))
    for name, seed in (("a", 1), ("b", 2)):
        write_metrics(tmp_path / f"{name}.jsonl", name, steps,
                      [3.0 + rng.random() for _ in steps], seed=seed)
    # a validated at 50 and 100; b also at 80, and its step-100 value was logged twice
    # (a resumed run: the last record counts)
    val = {"a": {50: rng.uniform(2, 3), 100: rng.uniform(2, 3)},
           "b": {50: rng.uniform(2, 3), 80: rng.uniform(2, 3), 100: rng.uniform(2, 3)}}
    for name, by_step in val.items():
        with open(tmp_path / f"{name}.jsonl", "a") as f:
            if name == "b":
                f.write(json.dumps({"step": 100, "val_loss": 9.0}) + "\n")
            for step, v in sorted(by_step.items()):
                f.write(json.dumps({"step": step, "val_loss": v}) + "\n")
    out, table = tmp_path / "cmp.png", tmp_path / "cmp.md"

    rc = compare_runs.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                            "--out", str(out), "--table", str(table)])

    assert rc == 0
    header = next(line for line in table.read_text().splitlines() if line.startswith("| run"))
    assert "| val loss | val loss vs a |" in header
    rows = parse_table(table.read_text())
    assert abs(float(rows[0][4]) - val["a"][100]) <= 5e-5 and rows[0][5] == "ref"
    assert abs(float(rows[1][4]) - val["b"][100]) <= 5e-5
    want_pct = 100 * (val["b"][100] / val["a"][100] - 1)
    assert abs(float(rows[1][5].rstrip("%")) - want_pct) <= 5e-3
    _, records, val_records = compare_runs.read_metrics(tmp_path / "b.jsonl")
    assert [r["step"] for r in val_records] == [50, 80, 100] and len(records) == len(steps)


def test_a_run_without_validation_does_not_change_where_the_others_are_compared(
        compare_runs, tmp_path):
    val = {"a": {50: 2.5, 100: 2.0}, "b": None, "c": {50: 2.6, 80: 2.3}}
    for seed, (name, by_step) in enumerate(val.items()):
        write_metrics(tmp_path / f"{name}.jsonl", name, [50, 80, 100], [3.0, 2.9, 2.8], seed=seed)
        with open(tmp_path / f"{name}.jsonl", "a") as f:
            for step, v in sorted((by_step or {}).items()):
                f.write(json.dumps({"step": step, "val_loss": v}) + "\n")
    runs = compare_runs.load_runs([str(tmp_path / f"{n}.jsonl") for n in val], None)

    summary = compare_runs.summarize(runs)

    # a and c were both evaluated at step 50 (b at no step): compared there.
    assert [row["val_loss"] for row in summary] == [2.5, None, 2.6]
    assert summary[2]["val_loss_vs_first_pct"] == pytest.approx(100 * (2.6 / 2.5 - 1))
    assert summary[1]["val_loss_vs_first_pct"] is None
    table = compare_runs.format_markdown(summary)
    assert "at step 50, the last that every run with validation was evaluated at" in table
    assert parse_table(table)[1][4:6] == ["n/a", "n/a"]


def test_without_validation_records_the_table_has_no_val_columns(compare_runs, tmp_path):
    for name, seed in (("a", 1), ("b", 2)):
        write_metrics(tmp_path / f"{name}.jsonl", name, [1, 2], [3.0, 2.5], seed=seed)
    summary = compare_runs.summarize(compare_runs.load_runs(
        [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], None))
    assert "val_loss" not in summary[0]
    assert "val loss" not in compare_runs.format_markdown(summary)


def test_a_non_numeric_val_loss_is_an_error_naming_the_line(compare_runs, tmp_path):
    path = tmp_path / "a.jsonl"
    write_metrics(path, "a", [1, 2], [3.0, 2.5], seed=1)
    with open(path, "a") as f:
        f.write(json.dumps({"step": 2, "val_loss": "low"}) + "\n")
    with pytest.raises(ValueError, match=r"a\.jsonl:4: 'val_loss' must be a number"):
        compare_runs.read_metrics(path)
