import pytest
import torch

from tests._paths import ROOT
from tests.scripts.conftest import load_script


@pytest.fixture(scope="module")
def prof():
    return load_script("profile_train_step")


@pytest.mark.parametrize("name, category", [
    ("_quant_rows_kernel", "float8 quantization"),
    ("_weight_bwd_cast_kernel", "float8 quantization"),
    ("_cols_amax_kernel", "float8 quantization"),
    ("_scatter_rows_kernel", "dispatch"),
    ("ncclDevKernel_SendRecv", "dispatch"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "other collectives (FSDP2)"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", "other collectives (FSDP2)"),
    ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<GroupProblemShape>>", "expert GEMMs"),
    ("_zero_rows_past_end_kernel", "expert GEMMs"),  # the op's output rows past the last group, bf16 too
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT", "dense GEMMs"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", "attention"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, SiluFunctor>", "other"),
])
def test_kernel_names_fall_in_their_category(prof, name, category):
    assert prof.categorize(name) == category


def test_summary_divides_by_steps_and_shares_sum_to_one(prof):
    events = [("_quant_rows_kernel", 300.0), ("nvjet_gemm", 900.0), ("_quant_rows_kernel", 300.0),
              ("elementwise_kernel", 600.0)]
    rows = {r["category"]: r for r in prof.summarize(events, steps=3)}
    assert rows["float8 quantization"]["ms_per_step"] == pytest.approx(0.2)
    assert rows["dense GEMMs"]["ms_per_step"] == pytest.approx(0.3)
    assert rows["other"]["ms_per_step"] == pytest.approx(0.2)
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
    assert rows["float8 quantization"]["top_kernels"][0] == {"name": "_quant_rows_kernel", "ms_per_step": pytest.approx(0.2)}
    assert "total GPU kernel time" in prof.format_rows(list(rows.values()))


@pytest.mark.parametrize("flag", ["--out", "--trace"])
def test_an_output_path_that_cannot_be_written_stops_before_the_config_is_read(prof, capsys, flag):
    with pytest.raises(SystemExit) as e:
        prof.main([flag, __file__ + "/profile.json", "--config", "/nonexistent.toml"])
    assert e.value.code == 2 and f"{__file__!r} is a file, not a folder" in capsys.readouterr().err


def test_an_earlier_runs_checkpoints_do_not_stop_the_profiler(prof, capsys, tmp_path):
    # It writes nothing in the run's folder, so the training run's folder checks do not
    # apply: past the config, this CPU machine stops it for want of a GPU.
    from ep_fp8.train.checkpoint import MARKER

    (tmp_path / "debug_model" / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "debug_model" / "checkpoints" / "step-2" / MARKER).write_text("{}")
    config = str(ROOT / "train_configs" / "debug_model.toml")
    code = prof.main(["--config", config, f"--job.output_dir={tmp_path}", "--checkpoint.enabled=false",
                      "--training.device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "needs a CUDA device" in err and "config error" not in err, err


def test_busy_time_is_the_union_of_overlapping_kernels_and_gaps_name_their_neighbours(prof):
    # Two streams: b overlaps a and c runs inside b; then a 30 us gap before d, a 5 us gap
    # (under the 20 us floor) before e, and e ends after f, which starts inside it.
    kernels = [(0.0, 10.0, "a"), (5.0, 40.0, "b"), (12.0, 20.0, "c"), (70.0, 80.0, "d"),
               (85.0, 100.0, "e"), (90.0, 95.0, "f")]
    busy, gaps = prof.busy_and_gaps(kernels)
    assert busy == pytest.approx(40.0 + 10.0 + 15.0)
    assert gaps == [(pytest.approx(30.0), "b", "d")]
    # The kernel before a gap is the one that ended last, not the one that started last.
    busy, gaps = prof.busy_and_gaps(kernels + [(200.0, 210.0, "g")])
    assert gaps[-1] == (pytest.approx(100.0), "e", "g")
    table = prof.format_gaps([(30.0, "b", "d"), (50.0, "b", "d"), (100.0, "e", "g")], steps=2)
    lines = table.splitlines()
    assert "e -> g" in lines[1] and "0.05" in lines[1]      # 100 us over 2 steps
    assert "b -> d" in lines[2] and "0.04" in lines[2] and " 1 " in lines[2]   # 2 gaps over 2 steps


def test_host_must_not_be_negative(prof, capsys):
    with pytest.raises(SystemExit) as e:
        prof.main(["--host", "-1", "--config", "/nonexistent.toml"])
    assert e.value.code == 2 and "--host" in capsys.readouterr().err


def test_timed_host_reads_times_each_read_and_restores_tolist(prof):
    original = torch.Tensor.tolist
    waits = []
    with prof.timed_host_reads(waits):
        assert torch.arange(3).tolist() == [0, 1, 2]
        assert torch.ones(2).tolist() == [1.0, 1.0]
    assert len(waits) == 2 and all(w >= 0 for w in waits)
    assert torch.Tensor.tolist is original
    with pytest.raises(RuntimeError):
        with prof.timed_host_reads(waits):
            raise RuntimeError("a failing step")
    assert torch.Tensor.tolist is original


def test_kernel_events_keep_gpu_work_and_leave_out_gpu_side_annotations(prof):
    from types import SimpleNamespace

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(name="nvjet_gemm", device_type=cuda),
              SimpleNamespace(name="Memcpy DtoD (Device -> Device)", device_type=cuda),
              SimpleNamespace(name="aten::mm", device_type=cpu),
              SimpleNamespace(name="Optimizer.step#AdamW.step", device_type=cuda),
              SimpleNamespace(name="ProfilerStep", device_type=cuda, is_user_annotation=True)]
    kept = prof.kernel_events(SimpleNamespace(events=lambda: events))
    assert [e.name for e in kept] == ["nvjet_gemm", "Memcpy DtoD (Device -> Device)"]


def test_the_host_wait_line_says_which_side_bounds_the_step(prof):
    gpu_bound = prof.host_wait_line([10.0, 20.0, 30.0, 40.0], wall_ms=150.0)
    assert "waited 25.0 ms (median; 10.0 to 40.0)" in gpu_bound
    assert "the GPU was still behind the host when each step ended" in gpu_bound
    host_bound = prof.host_wait_line([0.001, 0.002, 0.001], wall_ms=150.0)
    assert "the host (launching kernels, drawing data) bounds the step" in host_bound
    assert "still behind" not in host_bound
