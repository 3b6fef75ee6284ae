"""Metrics: the JSONL schema, log cadence, MFU, resume truncation and the summary."""

import json

import pytest
import torch

from ep_fp8.train.metrics import METRIC_KEYS, MetricsLogger, format_line, peak_flops


def make(tmp_path, **kw):
    args = dict(rank=0, world=2, steps=7, log_every=3, tokens_per_step=1000,
                flops_per_token=6e9, peak=1e15, device=torch.device("cpu"), tensorboard=False,
                printer=lambda s: None)
    args.update(kw)
    return MetricsLogger(str(tmp_path), **args)


def read(tmp_path):
    with open(tmp_path / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_jsonl_has_the_run_header_then_a_record_per_log_step_and_the_last(tmp_path):
    m = make(tmp_path)
    m.start("name", {"job": {"seed": 1}}, resumed_step=0)
    for step in range(1, 8):
        m.step(step, loss=10.0 - step, grad_norm=0.5, lr=1e-3, load_imbalance=1.0 + step)
    lines = read(tmp_path)
    run = lines[0]["run"]
    assert run["name"] == "name" and run["config"] == {"job": {"seed": 1}}
    assert run["world_size"] == 2 and run["device"] == "cpu" and run["torch"] == torch.__version__
    assert [r["step"] for r in lines[1:]] == [3, 6, 7]
    assert all(set(r) == set(METRIC_KEYS) for r in lines[1:])
    assert lines[1]["loss"] == 7.0
    assert lines[2]["load_imbalance"] == pytest.approx((5 + 6 + 7) / 3)   # mean over window
    r = lines[1]
    assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / 2)
    assert r["mfu"] == pytest.approx(6e9 * r["tokens_per_s_per_gpu"] / 1e15)
    assert r["peak_mem_gib"] == 0.0
    assert "loss 7.0000" in format_line(r, 7)


def test_a_step_the_run_stops_after_early_is_logged_and_ends_the_summary(tmp_path):
    m = make(tmp_path)   # log_every 3, 7 steps
    m.start("name", {}, resumed_step=0)
    for step in range(1, 5):
        m.step(step, loss=10.0 - step, grad_norm=0.5, lr=1e-3, load_imbalance=1.0, last=step == 4)
    assert [r["step"] for r in read(tmp_path)[1:]] == [3, 4]
    assert "summary: 4/7 steps" in m.summary(stopped="stopped by SIGTERM after step 4")


def test_a_resumed_run_drops_the_steps_it_will_redo_and_appends_a_header(tmp_path):
    m = make(tmp_path, log_every=1)
    m.start("a", {}, resumed_step=0)
    for step in range(1, 6):
        m.step(step, 1.0, 0.0, 0.0, 1.0)
    make(tmp_path, log_every=1).start("a", {}, resumed_step=3)
    lines = read(tmp_path)
    assert [r.get("step") for r in lines] == [None, 1, 2, 3, None]
    assert lines[-1]["run"]["resumed_from_step"] == 3
    make(tmp_path).start("a", {}, resumed_step=0)                 # a fresh run starts over
    assert len(read(tmp_path)) == 1


def test_a_resume_drops_a_torn_last_line(tmp_path):
    m = make(tmp_path, log_every=1)
    m.start("a", {}, resumed_step=0)
    for step in range(1, 4):
        m.step(step, 1.0, 0.0, 0.0, 1.0)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 5.46')   # a crash (or a full disk) in the middle of a write
    make(tmp_path, log_every=1).start("a", {}, resumed_step=3)
    assert [r.get("step") for r in read(tmp_path)] == [None, 1, 2, 3, None]


def test_other_ranks_write_nothing(tmp_path):
    m = make(tmp_path, rank=1)
    m.start("a", {}, resumed_step=0)
    m.step(3, 1.0, 0.0, 0.0, 1.0)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_mfu_is_zero_without_a_known_peak_and_the_summary_names_the_entropy_gap(tmp_path):
    assert peak_flops(torch.device("cpu")) == 0.0
    assert peak_flops(torch.device("cpu"), configured=5e14) == 5e14
    m = make(tmp_path, peak=0.0, log_every=1, steps=3)
    m.start("a", {}, resumed_step=0)
    for step, loss in ((1, 3.0), (2, 2.0), (3, 1.5)):
        assert m.step(step, loss, 0.1, 1e-3, 1.2)["mfu"] == 0.0
    text = m.summary(entropy=1.0, stopped="stopped by SIGTERM after step 3")
    assert "3/3 steps" in text and "stopped by SIGTERM" in text
    assert "first logged 3.0000  last 1.5000  best 1.5000" in text
    assert "+0.5000 above it" in text and "mfu n/a" in text


def test_the_log_line_leaves_out_what_is_not_measured():
    r = {"step": 5, "loss": 2.5, "grad_norm": 0.25, "lr": 1e-3, "tokens_per_s": 2000.0,
         "tokens_per_s_per_gpu": 1000.0, "mfu": 0.0, "peak_mem_gib": 0.0,
         "load_imbalance": 1.5}
    full = format_line(r, 100)
    assert full.startswith("step   5/100  loss 2.5000  grad_norm 0.250  lr 1.00e-03")
    assert "mfu 0.0%" in full and "mem 0.00 GiB" in full and full.endswith("imbalance 1.50")
    short = format_line(r, 100, mfu=False, memory=False)
    assert "mfu" not in short and "mem" not in short and "tok/s 2,000 (1,000/rank)" in short


def test_tensorboard_gets_every_metric_of_each_logged_step(tmp_path, tensorboard):
    written = tensorboard   # the fake SummaryWriter's record (tests/train/conftest.py)
    m = make(tmp_path, tensorboard=True, log_every=2, steps=4)
    m.start("a", {}, resumed_step=0)
    for step in range(1, 5):
        m.step(step, loss=float(step), grad_norm=0.5, lr=1e-3, load_imbalance=1.0)
    m.summary()
    assert written[0] == ("open", str(tmp_path / "tb"), 1)
    scalars = [w for w in written if w[0].startswith("train/")]
    assert {(tag, step) for tag, _, step in scalars} == {
        (f"train/{k}", s) for k in METRIC_KEYS[1:] for s in (2, 4)}
    assert ("train/loss", 4.0, 4) in scalars and written[-1] == ("close",)


def fake_clock(monkeypatch):
    """The logger's clock, set by the test: `clock[0]` is what perf_counter returns."""
    import types

    from ep_fp8.train import metrics

    clock = [0.0]
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    return clock


def test_tokens_per_s_counts_the_steps_and_the_time_of_each_window(tmp_path, monkeypatch):
    clock = fake_clock(monkeypatch)
    clock[0] = 100.0
    m = make(tmp_path, jsonl=False)   # log_every 3, 7 steps, 1000 tokens a step, world 2
    at = {1: 101.0, 2: 102.0, 3: 104.0, 4: 105.0, 5: 106.0, 6: 109.0, 7: 114.0}
    logged = []
    for step in range(1, 8):
        clock[0] = at[step]
        r = m.step(step, loss=1.0, grad_norm=0.5, lr=1e-3, load_imbalance=1.0)
        if r is not None:
            logged.append((r["step"], r["tokens_per_s"], r["tokens_per_s_per_gpu"], r["time_s"]))
    # Exact: integer ticks. Windows: steps 1-3 in 4 s, 4-6 in 5 s, 7 alone in 5 s.
    assert logged == [(3, 3 * 1000 / 4, 3 * 1000 / 4 / 2, 4.0),
                      (6, 3 * 1000 / 5, 3 * 1000 / 5 / 2, 9.0),
                      (7, 1 * 1000 / 5, 1 * 1000 / 5 / 2, 14.0)]


def test_the_summary_averages_leave_out_the_first_window_and_memory_is_the_peak(
        tmp_path, monkeypatch):
    from ep_fp8.train import metrics

    clock = fake_clock(monkeypatch)
    memory = iter([3.0, 5.0, 4.0])             # the peak is the middle record's
    monkeypatch.setattr(metrics, "peak_memory_gib", lambda device: next(memory))
    # 2000 tokens a step over 2 ranks; MFU = tokens/s per rank / 1000.
    m = make(tmp_path, jsonl=False, log_every=1, steps=3, tokens_per_step=2000,
             flops_per_token=6e9, peak=6e12)
    for step, t in ((1, 10.0), (2, 12.0), (3, 16.0)):   # 200, 1000, 500 tok/s
        clock[0] = t
        m.step(step, loss=4.0 - step, grad_norm=0.5, lr=1e-3, load_imbalance=1.5)
    assert [r["peak_mem_gib"] for r in m.records] == [3.0, 5.0, 4.0]
    text = m.summary()
    # Steps 2 and 3 only: 4000 tokens in 6 s = 667 tok/s, 333 per rank, MFU 33.3 % (the
    # mean of their rates would say 750; with step 1: 6000 tokens in 16 s = 375 tok/s).
    assert "summary: 3/3 steps in 16.0 s" in text
    assert "throughput  667 tok/s  (333 per rank)  mfu 33.3% of 6 TFLOP/s bf16" in text, text
    assert "memory      peak 5.00 GiB" in text, text
    assert "first logged 3.0000  last 1.0000  best 1.0000" in text


def test_time_in_paused_is_left_out_of_tokens_per_s_but_not_of_time_s(tmp_path, monkeypatch):
    clock = fake_clock(monkeypatch)
    m = make(tmp_path, jsonl=False, log_every=2, steps=4, tokens_per_step=1000)
    for step in range(1, 5):
        clock[0] += 1.0                        # a step takes 1 s
        m.step(step, loss=1.0, grad_norm=0.5, lr=1e-3, load_imbalance=1.0)
        if step in (1, 2):
            with m.paused():                   # a checkpoint save of 10 s after steps 1 and 2
                clock[0] += 10.0
    assert [r["tokens_per_s"] for r in m.records] == [1000.0, 1000.0]
    assert [r["time_s"] for r in m.records] == [12.0, 24.0]
    assert "throughput  1,000 tok/s" in m.summary()


def test_peak_flops_knows_the_h100_and_h200_forms_by_name(monkeypatch):
    from ep_fp8.train import metrics

    expected = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H200": 989e12,
                "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12, "NVIDIA H200 NVL": 835e12,
                "NVIDIA A100-SXM4-80GB": 0.0}
    for name, peak in expected.items():
        monkeypatch.setattr(metrics.torch.cuda, "get_device_name", lambda device, n=name: n)
        assert metrics.peak_flops(torch.device("cuda", 0)) == peak, name
        assert metrics.peak_flops(torch.device("cuda", 0), configured=1e15) == 1e15
    assert metrics.peak_flops(torch.device("cpu")) == 0.0


def test_a_summary_of_one_logged_window_averages_that_window(tmp_path, monkeypatch):
    clock = fake_clock(monkeypatch)
    m = make(tmp_path, jsonl=False, log_every=5, steps=5, tokens_per_step=2000,
             flops_per_token=6e9, peak=6e12)
    for step in range(1, 6):
        clock[0] = 2.0 * step
        m.step(step, loss=1.0, grad_norm=0.5, lr=1e-3, load_imbalance=1.0)
    # One window: 5 steps of 2000 tokens in 10 s.
    assert "throughput  1,000 tok/s  (500 per rank)  mfu 50.0%" in m.summary()


def test_a_resumed_run_times_from_its_start_and_says_how_many_steps_it_ran(tmp_path, monkeypatch):
    clock = fake_clock(monkeypatch)
    m = make(tmp_path, log_every=4, steps=10)
    m.start("run", {}, resumed_step=0)
    for step in range(1, 8):
        clock[0] = float(step)
        m.step(step, loss=1.0, grad_norm=0.5, lr=1e-3, load_imbalance=1.0)
    # Crashed after step 7; resumed from the step-5 checkpoint, setup taking 100 s.
    clock[0] = 100.0
    m = make(tmp_path, log_every=4, steps=10)
    clock[0] = 130.0
    m.start("run", {}, resumed_step=5)
    for step in range(6, 11):
        clock[0] = 130.0 + 2.0 * (step - 5)
        m.step(step, loss=1.0, grad_norm=0.5, lr=1e-3, load_imbalance=1.0)
    assert [r["time_s"] for r in m.records] == [6.0, 10.0]  # steps 8 and 10, from this start
    text = m.summary()
    assert "summary: 10/10 steps (5 in 10.0 s, resumed from step 5)" in text, text
    assert "first logged this session 1.0000" in text
