"""scripts/grouped_mm_records.py: shape checks, ratios of a zero time, the table's columns
and alignment, and the geometric means of a partial run."""
import pytest

from .test_bench_table import SMALL_SHAPE, fake_records, find


def test_parse_shape_checks_n_as_well_as_k(bench_records):
    with pytest.raises(ValueError, match="K and N must be multiples of 16, got K=64, N=100"):
        bench_records.parse_shape("4096,8,64,100")


def test_a_zero_time_gives_no_ratio(bench_records):
    base = {"shape": [16, 1, 16, 16], "groups": "uniform", "fwd_bwd_ms": None}
    out = bench_records.add_ratios([dict(base, method="bf16", fwd_ms=1.0),
                                    dict(base, method="ep_fp8", fwd_ms=0.0)])
    assert out[1]["fwd_x_bf16"] is None and out[0]["fwd_x_bf16"] == 1.0


def test_table_shows_forward_and_backward_tflops_in_their_columns(bench, bench_records):
    rec = bench_records.summarize_rounds(
        {"shape": list(SMALL_SHAPE), "groups": "uniform", "method": "bf16", "status": "ok",
         "note": "", "fwd_ms_rounds": [0.5], "fwd_bwd_ms_rounds": [2.0, 2.2]}, SMALL_SHAPE)
    (row,) = bench_records.format_table(bench_records.add_ratios([rec])).splitlines()[2:]
    cells = row.split()
    assert cells[4] == f"{rec['fwd_tflops']:.0f}" and cells[8] == f"{rec['fwd_bwd_tflops']:.0f}"
    assert cells[4] != cells[8]


def test_notes_are_left_aligned_under_their_header_and_clipped_to_72(bench_records):
    long_note = "x" * 100
    base = {"shape": list(SMALL_SHAPE), "groups": "uniform", "status": "skipped"}
    records = [dict(base, method="a", note="short"), dict(base, method="b", note=long_note),
               dict(base, method="c", note="")]
    lines = bench_records.format_table(records).splitlines()
    col = lines[0].index("note")
    assert lines[2][col:] == "short"
    assert lines[3][col:] == "x" * 69 + "..."


def test_geomeans_count_the_large_shapes_that_were_run(bench, bench_records):
    records = bench_records.add_ratios(fake_records(bench, bench.DEFAULT_SHAPES[:2], seed=4))
    summaries = bench_records.geomeans(records)
    assert summaries and {s["n_shapes"] for s in summaries} == {2}
    s = find(summaries and [dict(x, shape=SMALL_SHAPE) for x in summaries], SMALL_SHAPE,
             "uniform", "ep_fp8")
    assert s["fwd_x_bf16"] == pytest.approx(
        (find(records, bench.DEFAULT_SHAPES[0], "uniform", "ep_fp8")["fwd_x_bf16"]
         * find(records, bench.DEFAULT_SHAPES[1], "uniform", "ep_fp8")["fwd_x_bf16"]) ** 0.5)


def test_a_shape_whose_run_failed_is_not_counted_in_its_geomean(bench, bench_records):
    """ep_fp8 failed on the fourth large shape: its geomeans cover three shapes, and the
    count says three; bf16 ran all four."""
    raw = fake_records(bench, bench.DEFAULT_SHAPES[:4], seed=5)
    failed = bench.DEFAULT_SHAPES[3]
    for r in raw:
        if tuple(r["shape"]) == tuple(failed) and r["method"] == "ep_fp8":
            r.update(status="error", fwd_ms=None, fwd_bwd_ms=None)
    summaries = bench_records.geomeans(bench_records.add_ratios(raw))
    s = next(x for x in summaries if x["groups"] == "uniform" and x["method"] == "ep_fp8")
    assert s["n_shapes"] == s["n_fwd_bwd_x_bf16"] == 3
    assert next(x for x in summaries if x["method"] == "bf16")["n_shapes"] == 4
    row = next(line for line in bench_records.format_table(bench_records.add_ratios(raw), summaries)
               .splitlines() if line.startswith("uniform") and " ep_fp8 " in f" {line} "
               and len(line.split()) <= 8)
    assert row.split()[2] == "3"
