"""The CPU-testable parts of scripts/bench_grouped_mm.py, grouped_mm_records.py and
gpu_monitor.py (records, ratios, table, inputs, GPU samples), and one GPU smoke run that
skips without CUDA."""
import json
import math
import random
import re
import shutil
import sys
import types

import numpy as np
import pytest
import torch

SMALL_SHAPE = (8192, 16, 2048, 2816)


def fake_records(bench, shapes, seed=0):
    """Records as measure() returns them, with random times; fp8_gemm_only forward only."""
    rng = random.Random(seed)
    records = []
    for shape in shapes:
        for groups in bench.GROUP_MODES:
            for method in bench.METHODS:
                fwd_only = method == "fp8_gemm_only"
                records.append({
                    "shape": list(shape), "groups": groups, "method": method,
                    "status": "ok", "note": "", "fwd_ms": rng.uniform(0.2, 2.0),
                    "fwd_bwd_ms": None if fwd_only else rng.uniform(0.6, 6.0),
                    "fwd_bwd_spread": None if fwd_only else rng.uniform(0.0, 0.2),
                    "peak_mem_gib": None if fwd_only else rng.uniform(1, 9),
                    "rel_err": rng.uniform(0.01, 0.05)})
    return records


def find(records, shape, groups, method):
    (r,) = [r for r in records if tuple(r["shape"]) == tuple(shape)
            and r["groups"] == groups and r["method"] == method]
    return r


@pytest.mark.parametrize("text, expected", [("16384,8,5120,16384", (16384, 8, 5120, 16384)),
                                            (" 4096, 32,2048,768", (4096, 32, 2048, 768))])
def test_parse_shape_reads_four_ints(bench, text, expected):
    assert bench.parse_shape(text) == expected


@pytest.mark.parametrize("text, message", [
    ("1,2,3", "four integers"), ("a,b,c,d", "four integers"), ("0,8,64,64", "positive"),
    ("4096,8,100,64", "K and N must be multiples of 16")])
def test_parse_shape_rejects_bad_shapes_with_a_reason(bench, text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        bench.parse_shape(text)


def test_group_sizes_reject_bad_modes_and_too_few_rows(bench):
    assert bench.group_sizes(16384, 8, "uniform") == [2048] * 8
    with pytest.raises(ValueError, match="M/G a multiple of 16"):
        bench.group_sizes(16 * 24, 16, "uniform")
    with pytest.raises(ValueError, match="groups mode"):
        bench.group_sizes(16384, 8, "random")
    for mode in bench.GROUP_MODES:
        with pytest.raises(ValueError, match=re.escape("M must be a multiple of 16 and at least 16*G")):
            bench.group_sizes(4100, 8, mode)
        with pytest.raises(ValueError, match=re.escape("at least 16*G, got M=64, G=8")):
            bench.group_sizes(64, 8, mode)


@pytest.mark.parametrize("M, G", [(16384, 8), (8192, 16), (4096, 32), (65536, 4),
                                  (16 * 24, 16), (48, 1)])
def test_uneven_groups_are_nonempty_multiples_of_16_summing_to_M(bench, M, G):
    for seed in range(4):
        sizes = bench.group_sizes(M, G, "uneven", seed)
        assert len(sizes) == G and sum(sizes) == M
        assert all(s > 0 and s % 16 == 0 for s in sizes)
        if M >= 64 * G:  # room for a spread: the largest group is 2-3x the smallest
            assert 2.0 <= max(sizes) / min(sizes) <= 3.0


def test_uneven_groups_stay_within_3x_after_rounding_to_16_rows(bench):
    # Rounding to 16-row blocks once stretched these to 4x and 5x.
    sizes = bench.group_sizes(10240, 128, "uneven", 9)
    assert max(sizes) <= 3 * min(sizes)
    assert bench.group_sizes(96, 2, "uneven", 0) == [64, 32]
    for G in (2, 3, 5, 8, 16, 32, 128):
        for blocks in sorted({G, G + 1, 2 * G - 1, 2 * G, 3 * G + 1, 4 * G, 7 * G + 3, 64 * G}):
            for seed in range(3):
                M = 16 * blocks
                sizes = bench.group_sizes(M, G, "uneven", seed)
                assert len(sizes) == G and sum(sizes) == M and all(s > 0 and s % 16 == 0 for s in sizes)
                assert max(sizes) <= 3 * min(sizes), (M, G, seed, sizes)


def test_uneven_groups_are_reproducible_per_seed(bench):
    a, b = bench.group_sizes(16384, 8, "uneven", 0), bench.group_sizes(16384, 8, "uneven", 0)
    assert a == b
    assert a != bench.group_sizes(16384, 8, "uneven", 1)
    assert a != sorted(a) or a != sorted(a, reverse=True)  # order is shuffled, not ramped


def test_flops_count_forward_and_forward_backward(bench_records):
    assert bench_records.flops(3, 5, 7, "fwd") == 2 * 105
    assert bench_records.flops(3, 5, 7, "fwd_bwd") == 6 * 105


def test_add_ratios_divides_the_baseline_time_by_the_method_time(bench):
    records = fake_records(bench, [SMALL_SHAPE])
    records = [r for r in records if not (r["groups"] == "uneven" and r["method"] == "torchao")]
    out = bench.add_ratios(records)
    for g in bench.GROUP_MODES:
        bf16 = find(records, SMALL_SHAPE, g, "bf16")
        ep = find(out, SMALL_SHAPE, g, "ep_fp8")
        assert ep["fwd_x_bf16"] == pytest.approx(bf16["fwd_ms"] / ep["fwd_ms"], rel=1e-12)
        assert ep["fwd_bwd_x_bf16"] == pytest.approx(bf16["fwd_bwd_ms"] / ep["fwd_bwd_ms"])
        assert find(out, SMALL_SHAPE, g, "fp8_gemm_only")["fwd_bwd_x_bf16"] is None
    uniform_ao = find(records, SMALL_SHAPE, "uniform", "torchao")
    ep = find(out, SMALL_SHAPE, "uniform", "ep_fp8")
    assert ep["fwd_bwd_x_torchao"] == pytest.approx(uniform_ao["fwd_bwd_ms"] / ep["fwd_bwd_ms"])
    assert find(out, SMALL_SHAPE, "uneven", "ep_fp8")["fwd_bwd_x_torchao"] is None
    assert "fwd_x_bf16" not in records[0]  # the input records are left unchanged


def test_geomeans_cover_only_the_four_large_shapes_per_groups_mode(bench):
    records = bench.add_ratios(fake_records(bench, bench.DEFAULT_SHAPES, seed=3))
    summaries = bench.geomeans(records)
    assert len(summaries) == len(bench.GROUP_MODES) * len(bench.METHODS)
    for s in summaries:
        rows = [find(records, shape, s["groups"], s["method"]) for shape in bench.DEFAULT_SHAPES[:4]]
        for key in ("fwd_x_bf16", "fwd_bwd_x_torchao"):
            values = [r[key] for r in rows if r[key] is not None]
            expected = float(np.exp(np.mean(np.log(values)))) if values else None
            assert s[key] == (pytest.approx(expected) if values else None), (s, key)
        assert s["n_shapes"] == 4
    assert bench.geomeans(bench.add_ratios(fake_records(bench, [SMALL_SHAPE]))) == []


def test_format_table_prints_each_record_its_ratios_and_the_geomeans(bench):
    records = fake_records(bench, bench.DEFAULT_SHAPES[:4] + [SMALL_SHAPE], seed=5)
    records.append({"shape": list(SMALL_SHAPE), "groups": "uniform", "method": "torchao_x",
                    "status": "skipped", "note": "torchao is not importable"})
    records = bench.add_ratios(records)
    summaries = bench.geomeans(records)
    lines = bench.format_table(records, summaries).splitlines()
    r = find(records, bench.DEFAULT_SHAPES[1], "uneven", "ep_fp8")
    (row,) = [ln for ln in lines if ln.startswith("16384,8,8192,5120") and " uneven " in ln
              and " ep_fp8 " in ln]
    cells = row.split()
    assert cells[3:13] == [f"{r['fwd_ms']:.3f}", "-", f"{r['fwd_x_bf16']:.2f}",
                           f"{r['fwd_bwd_ms']:.3f}", f"{100 * r['fwd_bwd_spread']:.1f}%", "-",
                           f"{r['fwd_bwd_x_bf16']:.2f}",
                           f"{r['fwd_bwd_x_torchao']:.2f}", f"{r['peak_mem_gib']:.2f}",
                           f"{r['rel_err']:.2e}"]
    (skipped,) = [ln for ln in lines if " torchao_x " in ln]
    assert skipped.rstrip().endswith("torchao is not importable") and skipped.count(" - ") >= 8
    s = [x for x in summaries if x["groups"] == "uniform" and x["method"] == "torchao"][0]
    (geo,) = [ln for ln in lines if ln.split()[:2] == ["uniform", "torchao"] and len(ln.split()) == 7]
    assert geo.split()[2:] == ["4", f"{s['fwd_x_bf16']:.3f}", f"{s['fwd_bwd_x_bf16']:.3f}",
                               "1.000", "1.000"]


def _fake_package(monkeypatch, modules):
    """Installs fake torchao modules: {dotted name: {attr: value}}."""
    for name, attrs in modules.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(__name__=name, **attrs))


def test_find_torchao_fn_takes_the_older_name_in_the_older_module(bench, monkeypatch):
    def old(A, B_t, offs=None, out_dtype=torch.bfloat16): ...
    _fake_package(monkeypatch, {"torchao": {}, "torchao.prototype": {},
                                "torchao.prototype.moe_training": {},
                                "torchao.prototype.moe_training.scaled_grouped_mm":
                                    {"_scaled_grouped_mm": old}})
    fn, where = bench.find_torchao_fn()
    assert fn is old and where.endswith("scaled_grouped_mm._scaled_grouped_mm")


def test_find_torchao_fn_prefers_the_newer_name(bench, monkeypatch):
    def old(A, B_t, offs=None): ...
    def new(A, B_t, offs, out_dtype=None, pad_token_groups_for_grouped_mm=True): ...
    _fake_package(monkeypatch, {"torchao": {}, "torchao.prototype": {},
                                "torchao.prototype.moe_training":
                                    {"_to_fp8_rowwise_then_scaled_grouped_mm": new,
                                     "_scaled_grouped_mm": old}})
    monkeypatch.setitem(sys.modules, "torchao.prototype.moe_training.scaled_grouped_mm", None)
    fn, where = bench.find_torchao_fn()
    assert fn is new and where == "torchao.prototype.moe_training._to_fp8_rowwise_then_scaled_grouped_mm"
    assert bench.torchao_kwargs(new) == {"out_dtype": torch.bfloat16,
                                         "pad_token_groups_for_grouped_mm": False}
    assert bench.torchao_kwargs(old) == {}


def test_find_torchao_fn_reports_why_when_absent(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    fn, why = bench.find_torchao_fn()
    assert fn is None and "torchao is not importable" in why
    _fake_package(monkeypatch, {"torchao": {}, "torchao.prototype": {},
                                "torchao.prototype.moe_training": {}})
    fn, why = bench.find_torchao_fn()
    assert fn is None and "_to_fp8_rowwise_then_scaled_grouped_mm" in why


def test_reference_output_matches_grouped_mm_per_group(bench):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    w_t = torch.randn(3, 32, 16, generator=gen)
    offs = torch.tensor([16, 16, 48], dtype=torch.int32)  # an empty group; rows 48.. unused
    ref = bench.reference_output(x, w_t, offs)
    expected = torch._grouped_mm(x, w_t, offs=offs)  # float32 kernel: tolerance 1e-5
    assert ref.dtype == torch.float32
    torch.testing.assert_close(ref[:48], expected[:48], rtol=1e-5, atol=1e-5)
    assert torch.equal(ref[48:], torch.zeros(16, 16))


def test_relative_error_is_the_frobenius_ratio_across_chunks(bench):
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(50, 9, generator=gen)
    y = (ref + 0.03 * torch.randn(50, 9, generator=gen)).bfloat16()
    expected = float(torch.linalg.norm(y.double() - ref.double()) / torch.linalg.norm(ref.double()))
    assert bench.relative_error(y, ref, rows_per_chunk=7) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("argv, message", [(["--shape", "100,8,64,64"], "M must be"),
                                           (["--methods", "bf16,fp4"], "unknown ['fp4']"),
                                           (["--shape", "400,16,64,64", "--groups", "uniform"],
                                            "M/G a multiple of 16"),
                                           (["--rep", "-1"], "--warmup and --rep must be > 0 ms"),
                                           (["--warmup", "0"], "--warmup and --rep must be > 0 ms"),
                                           (["--out", __file__ + "/bench.json"],
                                            f"{__file__!r} is a file, not a folder")])
def test_bad_options_stop_before_any_work(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_round_order_varies_the_first_method_and_each_ones_predecessor(bench, n):
    methods = list(bench.METHODS)[:n]
    orders = [bench.round_order(methods, r) for r in range(5)]
    assert all(sorted(o) == sorted(methods) for o in orders)
    assert orders[0] == methods and len({o[0] for o in orders}) >= min(n, 3)
    for m in methods:  # the method timed just before m is not always the same
        assert len({o[o.index(m) - 1] if o.index(m) else None for o in orders}) > 1, m


def test_summarize_rounds_takes_the_median_round_and_the_spread(bench):
    rng = random.Random(3)
    fwd = [rng.uniform(1, 2) for _ in range(5)]
    fb = [rng.uniform(3, 6) for _ in range(4)]
    rec = bench.summarize_rounds({"fwd_ms_rounds": fwd, "fwd_bwd_ms_rounds": fb}, (4096, 8, 512, 1024))
    assert rec["fwd_ms"] == sorted(fwd)[2]  # odd count: the middle one
    median_fb = (sorted(fb)[1] + sorted(fb)[2]) / 2  # even count: the mean of the middle two
    assert rec["fwd_bwd_ms"] == pytest.approx(median_fb)
    assert rec["fwd_bwd_spread"] == pytest.approx((max(fb) - min(fb)) / median_fb)
    assert rec["fwd_bwd_tflops"] == pytest.approx(6 * 4096 * 512 * 1024 / median_fb / 1e9)
    one = bench.summarize_rounds({"fwd_ms_rounds": [1.5], "fwd_bwd_ms_rounds": [4.0]}, (16, 1, 16, 16))
    assert one["fwd_ms"] == 1.5 and one["fwd_bwd_spread"] is None
    skipped = bench.summarize_rounds({"status": "skipped", "fwd_ms_rounds": [], "fwd_bwd_ms_rounds": []},
                                     (16, 1, 16, 16))
    assert "fwd_ms" not in skipped and "fwd_bwd_spread" not in skipped
    failed = bench.summarize_rounds({"status": "error", "fwd_ms_rounds": [1.0, 1.1], "fwd_bwd_ms_rounds": [3.0]},
                                    (16, 1, 16, 16))  # a later round failed: no times from the others
    assert "fwd_ms" not in failed and "fwd_bwd_ms" not in failed


def test_summarize_gpu_samples_reads_nvidia_smi_lines(gpu_monitor):
    lines = ["1650 MHz, 1980 MHz, 693.29 W, 700.00 W, 0x0000000000000004",
             "1980 MHz, 1980 MHz, 120.50 W, 700.00 W, 0x0000000000000000",
             "garbage line", "[N/A], 1980 MHz, 1 W, 700 W, 0x0",
             "1440 MHz, 1980 MHz, 699.00 W, 700.00 W, 0x0000000000000084"]
    s = gpu_monitor.summarize_gpu_samples(lines)
    assert s["n"] == 3 and s["sm_mhz_median"] == 1650 and s["sm_mhz_min"] == 1440
    assert s["sm_mhz_max_rated"] == 1980 and s["power_limit_w"] == 700
    assert s["power_w_median"] == pytest.approx(693.29) and s["power_capped"] == pytest.approx(2 / 3)
    assert gpu_monitor.summarize_gpu_samples(["", "no samples"]) is None


def test_gpu_monitor_takes_whole_lines_only(gpu_monitor, tmp_path):
    monitor = gpu_monitor.GpuMonitor.__new__(gpu_monitor.GpuMonitor)  # no nvidia-smi here: feed its file by hand
    monitor.path, monitor.proc, monitor.seen = tmp_path / "s.csv", object(), 0
    line = "1650 MHz, 1980 MHz, 693.29 W, 700.00 W, 0x0000000000000004\n"
    monitor.path.write_text(line + line[:20])  # the second sample half written
    first = monitor.take()
    assert first["n"] == 1
    monitor.path.write_text(line + line + "1980 MHz, 1980 MHz, 120.00 W, 700.00 W, 0x0\n")
    second = monitor.take()  # the completed sample and the next, not the first again
    assert second["n"] == 2 and second["power_capped"] == 0.5
    assert monitor.take() is None  # nothing new


def test_nvidia_smi_id_follows_cuda_visible_devices(gpu_monitor):
    assert gpu_monitor.nvidia_smi_id(0, None) == "0" and gpu_monitor.nvidia_smi_id(1, "") == "1"
    assert gpu_monitor.nvidia_smi_id(0, "3,5") == "3" and gpu_monitor.nvidia_smi_id(1, "3, 5") == "5"
    assert gpu_monitor.nvidia_smi_id(0, "GPU-8f3a") == "GPU-8f3a"


def test_a_shape_given_twice_runs_once(bench, capsys):
    # add_ratios keys records by (shape, groups, method): a second run of a shape overwrote
    # the first's, and geomeans counted it twice.
    args = bench.parse_args(["--shape", "4096,32,2048,768", "--shape", "8192,16,1408,2048",
                             "--shape", " 4096, 32,2048,768"])
    assert args.shapes == [(4096, 32, 2048, 768), (8192, 16, 1408, 2048)]
    assert "--shape 4096,32,2048,768 was given twice" in capsys.readouterr().err


def test_a_method_given_twice_is_timed_once(bench, capsys):
    # Each (shape, groups, method) is one record: a second entry doubled its rounds and its
    # row, and geomeans counted it twice.
    args = bench.parse_args(["--methods", "bf16,ep_fp8, bf16", "--shape", "4096,32,2048,768"])
    assert args.methods == ["bf16", "ep_fp8"]
    assert "--methods names bf16 more than once; timing each once" in capsys.readouterr().err


def test_parse_args_defaults_and_quick(bench):
    args = bench.parse_args([])
    assert args.shapes == bench.DEFAULT_SHAPES and args.group_modes == ("uniform", "uneven")
    assert args.methods == list(bench.METHODS) and (args.warmup, args.rep) == (25.0, 100.0)
    quick = bench.parse_args(["--quick", "--groups", "uneven", "--methods", "bf16"])
    assert len(quick.shapes) == 2 and quick.group_modes == ("uneven",) and quick.rep < 100
    assert args.rounds == 5 and quick.rounds == 1
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_main_without_cuda_says_so_and_writes_nothing(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--out", str(out)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not out.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_gpu_run_in_cuda_graphs(bench, tmp_path, monkeypatch):
    out = tmp_path / "g.json"
    argv = ["--quick", "--cuda-graph", "--methods", "bf16,ep_fp8_auto", "--groups", "uneven",
            "--out", str(out), "--warmup", "1", "--rep", "5"]
    captured = []
    real_capture = bench.capture
    monkeypatch.setattr(bench, "capture", lambda fn: captured.append(fn) or real_capture(fn))
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["header"]["cuda_graph"] is True
    assert len(captured) == 2 * 2 * len(bench.QUICK_SHAPES)  # forward and forward+backward, 2 methods
    for r in result["records"]:
        assert r["status"] == "ok", r
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["rel_err"] < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_gpu_run_writes_sane_json(bench, tmp_path):
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--out", str(out), "--warmup", "1", "--rep", "5"]) == 0
    result = json.loads(out.read_text())
    assert result["header"]["gpu"] and result["header"]["torch"] == torch.__version__
    records = result["records"]
    assert len(records) == 2 * 2 * len(bench.METHODS)
    assert all("gpu" in r for r in records) and "gpu_during_run" in result["header"]
    if shutil.which("nvidia-smi"):  # sampled every 0.5 s over a run of several seconds
        assert result["header"]["gpu_during_run"]["n"] > 0
    for r in records:
        assert r["status"] in ("ok", "skipped"), r  # "error" means a method failed
        if r["status"] == "ok":
            assert r["fwd_ms"] > 0 and math.isfinite(r["rel_err"])
            # bf16 rounding of the output ~ 2^-9; e4m3 operands give a few percent.
            assert r["rel_err"] < (1e-2 if r["method"] == "bf16" else 8e-2), r
            if r["method"] != "fp8_gemm_only":
                assert r["fwd_bwd_ms"] > 0 and r["peak_mem_gib"] > 0
    assert all(r["status"] == "ok" for r in records if r["method"] in ("bf16", "fp8_gemm_only",
                                                                       "ep_fp8", "ep_fp8_auto"))
