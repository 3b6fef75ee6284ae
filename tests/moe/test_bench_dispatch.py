"""scripts/bench_dispatch.py: table, JSON and the local measurement on CPU (the timings
themselves are not checked; the expert-parallel part runs in test_all_to_all.py)."""

import json

import pytest

from tests.moe.bench_script import load_bench_dispatch


@pytest.fixture(scope="module")
def bench():
    return load_bench_dispatch()


def test_record_ratio_is_time_over_baseline(bench):
    r = bench.record("local", "-", "fwd", 3.0, "index_select+index_add", 2.0, payload_bytes=10)
    assert r["ratio"] == 1.5 and r["payload_bytes"] == 10


def test_table_has_a_row_per_record(bench):
    records = [bench.record("all_to_all", p, ph, 1.2, "all_to_all_single", 1.0, payload_bytes=2e6)
               for p in ("bf16", "float8") for ph in ("fwd", "fwd_bwd")]
    lines = bench.format_table(records).splitlines()
    assert len(lines) == 2 + len(records)
    assert "1.20" in lines[2] and "float8" in lines[-1]


def test_single_process_run_writes_local_records(bench, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--tokens", "16", "--dim", "32", "--warmup", "0", "--iters", "1",
                       "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["env"]["world_size"] == 1 and data["config"]["tokens"] == 16
    assert [(r["path"], r["phase"]) for r in data["records"]] == [("local", "fwd"), ("local", "fwd_bwd")]
    assert "index_select+index_add" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "9", "--experts", "8"], "exceeds --experts"),
    (["--payloads", "bf16,int4"], "unknown payloads"),
    (["--iters", "0"], "--iters must be >= 1, got 0"),
    (["--dim", "0"], "--dim must be >= 1, got 0"),
    (["--tokens", "-5"], "--tokens must be >= 1, got -5"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--out", __file__ + "/dispatch.json"], f"{__file__!r} is a file, not a folder"),
])
def test_bad_options_exit_with_a_message(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
