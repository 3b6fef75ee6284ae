"""scripts/bench_generate.py on the CPU: the eager mode only (no CUDA graph there), its
record, and its argument checks. Not a measurement."""
import json

import pytest

from tests.scripts.conftest import load_script


def test_a_cpu_run_records_the_eager_mode_and_its_settings(tmp_path, capsys):
    bench = load_script("bench_generate")
    out = tmp_path / "sub" / "bench.json"
    assert bench.main(["--model", "debug", "--dtype", "float32", "--device", "cpu",
                       "--prompt-len", "4", "--new-tokens", "3", "--repeats", "1",
                       "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["results"]) == {"eager"} and record["results"]["eager"]["tokens_per_s"] > 0
    assert (record["model"], record["dtype"], record["prompt_len"], record["new_tokens"]) == \
        ("debug", "float32", 4, 3)
    assert record["tokens_agree"] is True and record["first_step_logits"] is None
    assert record["graph_skipped"] is None
    assert record["device"] == "cpu" and "eager:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--prompt-len", "250", "--new-tokens", "7"], "must fit the model's max_seq_len (256)"),
    (["--new-tokens", "0"], "must be >= 1"),
])
def test_settings_that_cannot_be_measured_are_refused(argv, message, capsys):
    bench = load_script("bench_generate")
    with pytest.raises(SystemExit) as info:
        bench.main(["--model", "debug", "--device", "cpu"] + argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_a_model_whose_steps_cannot_be_captured_gets_no_graph_mode():
    """A float32 MoE model on a GPU: generate() decodes it with eager steps whatever
    cuda_graph says, so a `graph` mode would time eager steps under the graph's name (and
    the first step's capture would fail). graph_problem reads no GPU for float32."""
    import torch

    from ep_fp8.model import PRESETS, Transformer

    bench = load_script("bench_generate")
    model = Transformer(PRESETS["debug"])             # float32, with MoE layers
    modes, skipped = bench.decoding_modes(model, torch.device("cuda"))
    assert modes == {"eager": False}
    assert skipped.startswith("no graph mode: the experts' grouped matmul in torch.float32")
    assert bench.decoding_modes(model, torch.device("cpu")) == ({"eager": False}, "")
