"""scripts/bench_generate.py without a measurement: the rate it reports (a fake clock and a
fake generate), the settings it records, and the options it refuses before any work."""
import json
import types

import pytest
import torch

from tests.scripts.conftest import load_script


@pytest.fixture
def bench():
    return load_script("bench_generate")


def fake_clock(durations):
    """perf_counter for start/stop pairs that last `durations` seconds, in turn."""
    ticks, now = [], 0.0
    for d in durations:
        ticks += [now, now + d]
        now += d + 1.0
    return types.SimpleNamespace(perf_counter=iter(ticks).__next__)


def test_the_rate_is_the_median_of_the_calls_in_tokens_per_second(bench, monkeypatch):
    monkeypatch.setattr(bench, "generate_samples", lambda *a, **k: [[7, 8, 9, 10]])
    monkeypatch.setattr(bench, "time", fake_clock([0.5, 2.0, 1.0]))
    rate, tokens = bench.time_mode(torch.nn.Linear(1, 1), [1, 2], 4, False, repeats=3)
    assert tokens == [7, 8, 9, 10] and rate == pytest.approx(4.0)   # of 8, 2 and 4 tokens/s


def test_the_rate_of_a_batch_counts_every_samples_tokens(bench, monkeypatch):
    asked = []

    def fake(model, prompt, new_tokens, samples, **kwargs):
        asked.append(samples)
        return [[7, 8, 9], [7, 8, 9], [7, 8]]    # the third ended early
    monkeypatch.setattr(bench, "generate_samples", fake)
    monkeypatch.setattr(bench, "time", fake_clock([2.0]))
    rate, tokens = bench.time_mode(torch.nn.Linear(1, 1), [1, 2], 3, False, repeats=1, samples=3)
    assert asked == [3, 3] and tokens == [7, 8, 9] and rate == pytest.approx(4.0)   # 8 tokens in 2 s


def test_calls_that_draw_other_tokens_are_an_error(bench, monkeypatch):
    draws = iter([[[1, 2]], [[1, 2]], [[1, 3]]])
    monkeypatch.setattr(bench, "generate_samples", lambda *a, **k: next(draws))
    monkeypatch.setattr(bench, "time", fake_clock([1.0, 1.0]))
    with pytest.raises(RuntimeError, match="drew different tokens"):
        bench.time_mode(torch.nn.Linear(1, 1), [1, 2], 2, False, repeats=2)


@pytest.fixture
def measured(bench, monkeypatch):
    """main() with time_mode faked: the (model dtype, prompt length, new tokens, repeats)
    of each call."""
    calls = []

    def time_mode(model, prompt, new_tokens, cuda_graph, repeats, samples):
        calls.append((next(model.parameters()).dtype, len(prompt), new_tokens, repeats, samples))
        return 12.5, [1] * new_tokens

    monkeypatch.setattr(bench, "time_mode", time_mode)
    return calls


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_record_holds_the_settings_measured(bench, measured, tmp_path, dtype):
    out = tmp_path / "b.json"
    # 250 + 6 fills the debug model's max_seq_len (256) exactly: allowed.
    assert bench.main(["--model", "debug", "--device", "cpu", "--dtype", dtype, "--prompt-len",
                       "250", "--new-tokens", "6", "--repeats", "2", "--samples", "4",
                       "--out", str(out)]) == 0
    assert measured == [(getattr(torch, dtype), 250, 6, 2, 4)]
    record = json.loads(out.read_text())
    assert (record["dtype"], record["prompt_len"], record["new_tokens"], record["repeats"],
            record["samples"]) == (dtype, 250, 6, 2, 4)
    assert record["results"] == {"eager": {"tokens_per_s": 12.5}}


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "must be >= 1"),
    (["--samples", "0"], "--repeats and --samples must be >= 1"),
    (["--out", __file__ + "/b.json"], f"{__file__!r} is a file, not a folder"),
])
def test_options_that_cannot_work_are_refused_before_measuring(bench, measured, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        bench.main(["--model", "debug", "--device", "cpu", "--new-tokens", "2"] + argv)
    assert info.value.code == 2 and message in capsys.readouterr().err and measured == []


@pytest.mark.parametrize("device, message", [
    ("foo", "--device 'foo' is not a device: give cpu, cuda, cuda:N or auto"),
    ("cuda", "--device cuda: this machine has no CUDA device"),
])
def test_a_device_this_machine_lacks_is_a_message(bench, measured, capsys, monkeypatch,
                                                   device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        bench.main(["--model", "debug", "--device", device, "--new-tokens", "2", "--prompt-len", "4"])
    assert info.value.code == 2 and message in capsys.readouterr().err and measured == []
