"""The CPU-testable parts of scripts/profile_grouped_mm.py: kernel categories, the bytes
the quantization moves, and the bound it prints."""
import random
import re
from statistics import median

import pytest

# Kernel names as torch.profiler reported them on the H200 (torch 2.11; the CUTLASS GEMMs
# mangled, cut short here).
CUTLASS_FP8 = "_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalINS1_17GroupProblemShapeIN4cute5tupleIJiiiEEEEENS1_10"
CUTLASS_BF16 = ("_ZN7cutlass13device_kernelIN2at4cuda6detail25enable_3x_kernel_for_sm9xINS_4gemm6kernel13GemmUniversal"
                "INS5_17Gr")
PREPARE = "void at::cuda::detail::prepare_grouped_gemm_data<cutlass::float_e4m3_t, ...>(...)"
FILL = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, ...>(...)"


def test_kernel_categories(profile_mm):
    cat = profile_mm.kernel_category
    assert cat(CUTLASS_FP8) == cat(CUTLASS_BF16) == "gemm"
    assert cat(PREPARE) == "other"  # the GEMM's argument setup, not a GEMM
    assert cat(FILL) == "other"
    for name in ("_weight_fwd_kernel", "_weight_bwd_cast_kernel", "_cols_amax_kernel", "_cols_cast_kernel",
                 "_quant_rows_kernel"):
        assert cat(name) == "quant"
    assert cat("_zero_rows_past_end_kernel") == "other"  # ep_fp8's, but not quantization


def test_quant_bytes_counts_each_pass(profile_mm):
    M, G, K, N = 16384, 8, 5120, 16384
    # weight: read bf16 twice (2 + 2 bytes), written in float8 twice (1 + 1); x and
    # grad_out: read twice (amax pass, cast pass), two float8 copies each.
    want = 6 * G * K * N + 6 * M * K + 6 * M * N
    assert profile_mm.quant_bytes(M, G, K, N) == want == 6_140_461_056


def test_bound_summary_medians_and_bound(profile_mm):
    rng = random.Random(0)
    fp8, bf16 = [], []
    for _ in range(5):
        fp8.append({"gemm": rng.uniform(5000, 6000), "quant": rng.uniform(1500, 2000), "other": 8.0})
        bf16.append({"gemm": rng.uniform(10000, 12000), "other": 5.0})
    nbytes = 4_290_000_000  # 1000 us at COPY_TB_S
    assert profile_mm.COPY_TB_S == 4.29
    text = profile_mm.bound_summary(fp8, bf16, nbytes)
    ratios = sorted(sum(b.values()) / sum(f.values()) for f, b in zip(fp8, bf16))
    bounds = sorted(sum(b.values()) / (f["gemm"] + f["other"] + 1000.0) for f, b in zip(fp8, bf16))
    free = sorted(sum(b.values()) / (f["gemm"] + f["other"]) for f, b in zip(fp8, bf16))
    for label, want in (("bf16 / float8 per round", ratios), (r"4\.29 GB in 1000 us\)", bounds),
                        ("with no quantization at all", free)):
        m = re.search(label + r": (\d\.\d\d)x \((\d\.\d\d)-(\d\.\d\d)\)", text)
        assert m, label
        assert [float(v) for v in m.groups()] == pytest.approx([want[2], want[0], want[4]], abs=0.005)
    m = re.search(r"float8 (\d+) us \(GEMMs (\d+), quantization (\d+), other (\d+)\), bf16 (\d+) us", text)
    assert m
    assert [int(v) for v in m.groups()] == pytest.approx(
        [median(sum(f.values()) for f in fp8), median(f["gemm"] for f in fp8), median(f["quant"] for f in fp8), 8,
         median(sum(b.values()) for b in bf16)], abs=1)


@pytest.mark.parametrize("args, message", [
    (["--shape", "1,2,3"], "must be four integers M,G,K,N, got '1,2,3'"),
    (["--shape", "8192,8,0,2048"], "sizes must be positive"),
    (["--shape", "8192,8,100,2048"], "--shape needs K and N to be multiples of 16"),
    # The float8 GEMMs are timed alone with any backend.
    (["--shape", "1024,8,4088,2048", "--backend", "bf16"], "--shape needs K and N to be multiples of 16"),
])
def test_bad_shapes_are_usage_errors_before_anything_runs(profile_mm, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        profile_mm.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
