"""Config and metrics behaviours that a user sees but the other tests leave open.

Covers: the range checks at their exact boundaries (and non-finite values); bools and
ints kept apart from floats and ints; list lengths of fixed-size keys; override parsing (values holding '=' or
'.', bare words for text keys, quoted numbers); the source named in errors; the TOML
written for a run reading back; the checks across keys (world size, dp_replicate, ep,
synthetic vocabulary, seq_len); `main`'s exit codes and `--check`; and the numbers in
the metrics records and the end-of-run summary (tokens/s per rank, MFU, memory, load
imbalance, best losses, the peak table).
"""

import dataclasses
import json
import os
import types

import pytest
import torch

from ep_fp8.train import metrics
from ep_fp8.train.config import ConfigError, load_config, read_config, to_toml
from ep_fp8.train.main import INTERRUPTED, USAGE, main, parse_cli
from ep_fp8.train.metrics import MetricsLogger, format_line
from tests.train.test_config import ROOT


# --- types and overrides ---------------------------------------------------------------


def _error(overrides, path=None, **kw):
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides, **kw)
    return str(err.value)


@pytest.mark.parametrize("override, message", [
    ("--training.steps=true", "[training] steps must be int, got True (bool)"),
    ("--training.steps=2.0", "[training] steps must be int, got 2.0 (float)"),
    ("--job.seed=false", "[job] seed must be int, got False (bool)"),
    ("--float8.enabled=1", "[float8] enabled must be bool, got 1 (int)"),
    ("--float8.enabled=True", "lowercase: true"),
    ("--float8.enabled=TRUE", "lowercase: true"),
    ("--float8.backend=cudaa", "[float8] backend must be 'auto' | 'cuda' | 'emulated' | 'bf16', "
                               "got 'cudaa'"),
    ("--optimizer.betas=[0.9, 0.95, 0.99]", "[optimizer] betas must be a list of 2 values"),
    ("--optimizer.betas=[0.9]", "[optimizer] betas must be a list of 2 values"),
    ("--optimizer.betas=0.9", "[optimizer] betas must be list of float, got 0.9 (float)"),
    ("--data.blend=a.txt", "write a TOML list"),
    ("--data.blend_weights=[1, \"x\"]", "[data] blend_weights[1] must be float, got 'x' (str)"),
])
def test_each_value_of_the_wrong_type_is_an_error_naming_key_and_type(override, message):
    msg = _error([override])
    assert f"command line {override}" in msg and message in msg, msg


def test_a_number_or_bool_where_text_is_wanted_in_the_file_is_an_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[job]\nname = 3\n")
    msg = _error([], str(path))
    assert f"{path}: [job] name must be str, got 3 (int)" in msg, msg


def test_ints_are_taken_as_floats_and_lists_as_tuples_where_the_field_says_so(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[training]\nmax_norm = 2\n[optimizer]\nbetas = [0.8, 0.9]\n"
                    "[data]\nseed = 5\n")
    cfg = load_config(str(path))
    assert cfg.training.max_norm == 2.0 and type(cfg.training.max_norm) is float
    assert cfg.optimizer.betas == (0.8, 0.9) and type(cfg.optimizer.betas) is tuple
    assert cfg.data.seed == 5
    assert "max_norm = 2.0" in to_toml(cfg)


@pytest.mark.parametrize("override, section, key, value", [
    ("--job.name=a=b", "job", "name", "a=b"),          # only the first '=' splits
    ("--job.name=3", "job", "name", "3"),              # a number is a name where text is wanted
    ("--job.name=true", "job", "name", "true"),
    ("--job.name=v1.2", "job", "name", "v1.2"),
    ("--data.tokenizer=1e3", "data", "tokenizer", "1e3"),
    ('--job.name="quoted"', "job", "name", "quoted"),
    ("--training.steps=7", "training", "steps", 7),
    ("--optimizer.lr=1e-3", "optimizer", "lr", 1e-3),
    ("--optimizer.betas=[0.5, 0.6]", "optimizer", "betas", (0.5, 0.6)),
    ("--activation_checkpoint.mode=full", "activation_checkpoint", "mode", "full"),
])
def test_override_values_are_read_as_toml_or_as_a_bare_word(override, section, key, value):
    cfg = read_config(None, [override])
    assert getattr(getattr(cfg, section), key) == value


def test_an_override_with_a_dot_in_its_key_names_the_key_as_unknown():
    msg = _error(["--training.steps.x=1"])
    assert "unknown key 'steps.x' in [training]" in msg, msg


def test_an_unknown_model_key_lists_name_among_the_known_ones():
    msg = _error(["--model.depth=2"])
    assert "(known: name, vocab_size" in msg, msg
    assert load_config(None, ["--model.name=debug"]).model.name == "debug"


def test_errors_after_overrides_name_the_file_and_the_command_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[training]\nsteps = 3\n")
    msg = _error(["--training.batch_size=0"], str(path))
    assert msg.startswith(f"{path} + command line: [training] batch_size must be"), msg
    assert load_config(str(path)).source == str(path)
    assert load_config(None).source == "<defaults>"


def test_the_written_toml_keeps_the_model_preset_and_its_overrides(tmp_path):
    cfg = read_config(None, ["--model.name=moe_1b", "--model.n_layers=2"])
    path = tmp_path / "back.toml"
    path.write_text(to_toml(cfg))
    back = read_config(str(path))
    assert back.model.name == "moe_1b" and back.model.overrides == {"n_layers": 2}
    assert dataclasses.replace(back, source=cfg.source) == cfg


def test_a_job_name_with_control_characters_is_written_as_toml_that_reads_back(tmp_path):
    cfg = read_config(None, ['--job.name="a\\u007fb\\u0001c\\td"'])
    assert cfg.job.name == "a\x7fb\x01c\td"
    path = tmp_path / "back.toml"
    path.write_text(to_toml(cfg))
    assert read_config(str(path)).job.name == cfg.job.name


# --- metrics ---------------------------------------------------------------------------


def _logger(tmp_path, monkeypatch, **kw):
    clock = [0.0]
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    args = dict(rank=0, world=4, steps=4, log_every=2, tokens_per_step=1000,
                flops_per_token=1e9, peak=1e13, device=torch.device("cpu"), tensorboard=False,
                printer=lambda s: None)
    args.update(kw)
    return MetricsLogger(str(tmp_path), **args), clock


def test_the_log_line_shows_mfu_as_a_percentage_and_memory_in_gib():
    r = {"step": 5, "loss": 2.5, "grad_norm": 0.25, "lr": 1e-3, "tokens_per_s": 2000.0,
         "tokens_per_s_per_gpu": 1000.0, "mfu": 0.4236, "peak_mem_gib": 12.345,
         "load_imbalance": 1.5}
    line = format_line(r, 100)
    assert "mfu 42.4%" in line and "mem 12.35 GiB" in line, line


def test_records_and_summary_give_per_rank_throughput_mfu_and_imbalance(tmp_path, monkeypatch):
    m, clock = _logger(tmp_path, monkeypatch)
    lines = []
    m.print = lines.append
    m.start("r", {}, resumed_step=0)
    # Window 1: steps 1-2 in 4 s; window 2: steps 3-4 in 1 s.
    for step, t, loss, imb in ((1, 2.0, 3.0, 1.0), (2, 4.0, 2.0, 2.0),
                               (3, 4.5, 1.0, 3.0), (4, 5.0, 1.5, 5.0)):
        clock[0] = t
        m.step(step, loss=loss, grad_norm=1.0, lr=1e-3, load_imbalance=imb)
    first, second = m.records
    assert first["tokens_per_s"] == pytest.approx(500.0)          # 2 steps x 1000 / 4 s
    assert first["tokens_per_s_per_gpu"] == pytest.approx(125.0)  # / world 4
    assert first["mfu"] == pytest.approx(1e9 * 125.0 / 1e13)
    assert first["load_imbalance"] == pytest.approx(1.5) and second["load_imbalance"] == 4.0
    assert second["tokens_per_s"] == pytest.approx(2000.0) and second["time_s"] == 5.0
    assert "tok/s 500 (125/rank)" in lines[0], lines[0]
    # A peak from [metrics] peak_flops gives MFU on the CPU too; memory is not measured there.
    assert "mfu " in lines[0] and "mem " not in lines[0], lines[0]
    text = m.summary()
    # Steady throughput: the second window only (2000 tok/s, 500 per rank; MFU 5%).
    assert "throughput  2,000 tok/s  (500 per rank)  mfu 5.0% of 10 TFLOP/s bf16" in text, text
    assert "loss        first logged 2.0000  last 1.5000  best 1.5000" in text, text
    assert f"metrics     {tmp_path / 'metrics.jsonl'}" in text
    records = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert records[1]["mfu"] == pytest.approx(first["mfu"])


def test_the_summary_names_the_best_validation_loss_and_the_gap_to_the_entropy(
        tmp_path, monkeypatch):
    printed = []
    m, clock = _logger(tmp_path, monkeypatch, peak=0.0, steps=2, log_every=1,
                       printer=printed.append)
    m.start("r", {}, resumed_step=0)
    for step in (1, 2):
        clock[0] = float(step)
        m.step(step, loss=2.0, grad_norm=1.0, lr=1e-3, load_imbalance=1.0)
        m.validation(step, {1: 1.5, 2: 1.75}[step])
    assert printed[-1] == "step 2/2  val_loss 1.7500"
    text = m.summary(entropy=1.25)
    assert "validation  val_loss at step 2 1.7500  best 1.5000" in text, text
    assert "last loss is +0.7500 above it" in text, text
    assert "mfu n/a" in text


def test_a_resumed_summary_counts_the_steps_of_this_session(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 1.0}) + "\n")
    m, clock = _logger(tmp_path, monkeypatch, steps=14, log_every=2)
    m.start("r", {}, resumed_step=10)
    for step in range(11, 15):
        clock[0] = float(step - 10)
        m.step(step, loss=1.0, grad_norm=1.0, lr=1e-3, load_imbalance=1.0)
    assert "summary: 14/14 steps (4 in 4.0 s, resumed from step 10)" in m.summary()
    records = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert records[0] == {"step": 10, "loss": 1.0}
    assert records[1]["run"]["resumed_from_step"] == 10


def test_a_logger_without_jsonl_writes_no_file(tmp_path, monkeypatch):
    m, clock = _logger(tmp_path, monkeypatch, jsonl=False)
    m.start("r", {}, resumed_step=0)
    clock[0] = 1.0
    m.step(2, loss=1.0, grad_norm=1.0, lr=1e-3, load_imbalance=1.0)
    assert "metrics     " not in m.summary()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_validation_loss_goes_to_tensorboard(tmp_path, monkeypatch, tensorboard):
    m, clock = _logger(tmp_path, monkeypatch, tensorboard=True)
    m.start("r", {}, resumed_step=0)
    m.validation(2, 1.5)
    m.summary()
    assert ("val/loss", 1.5, 2) in tensorboard


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA A100-SXM4-80GB", 0.0)])
def test_the_peak_comes_from_the_device_name_or_the_configured_value(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.peak_flops(torch.device("cuda", 0)) == peak
    assert metrics.peak_flops(torch.device("cuda", 0), configured=2e14) == 2e14
    assert metrics.peak_flops(torch.device("cpu"), configured=2e14) == 2e14


def test_peak_memory_is_in_gib(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    assert metrics.peak_memory_gib(torch.device("cuda", 0)) == 3.0
    assert metrics.peak_memory_gib(torch.device("cpu")) == 0.0


# --- ranges and checks across keys -------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("--training.max_norm=inf", "[training] max_norm must be finite and >= 0, got inf"),
    ("--metrics.peak_flops=nan", "[metrics] peak_flops must be finite and >= 0, got nan"),
    ("--optimizer.lr=inf", "[optimizer] lr must be finite and > 0, got inf"),
    ("--lr_schedule.min_lr_ratio=1.5", "[lr_schedule] min_lr_ratio must be in [0, 1], got 1.5"),
    ("--lr_schedule.min_lr_ratio=-0.1", "[lr_schedule] min_lr_ratio must be in [0, 1], got -0.1"),
    ("--optimizer.betas=[0.9, 1.0]", "[optimizer] betas must be in [0, 1), got [0.9, 1.0]"),
    ("--optimizer.betas=[-0.1, 0.9]", "[optimizer] betas must be in [0, 1), got [-0.1, 0.9]"),
    ('--checkpoint.folder=""', "[checkpoint] folder must not be empty"),
    ("--data.synthetic_vocab=1", "[data] synthetic_vocab must be in [2, model vocab_size = 512]"),
    ("--data.synthetic_vocab=513", "[data] synthetic_vocab must be in [2, model vocab_size = 512]"),
    ("--data.synthetic_branching=0", "[data] synthetic_branching must be in [1, synthetic_vocab"),
    ("--data.synthetic_branching=257", "[data] synthetic_branching must be in [1, synthetic_vocab"),
    ("--training.seq_len=513", "[training] seq_len = 513 exceeds the model's max_seq_len = 512"),
    ("--validation.batches=0", "[validation] batches must be finite and > 0, got 0"),
])
def test_values_just_out_of_range_are_errors(override, message):
    msg = _error(["--model.vocab_size=512", "--model.max_seq_len=512", override])
    assert message in msg, msg


@pytest.mark.parametrize("overrides", [
    ["--lr_schedule.min_lr_ratio=1.0"],
    ["--lr_schedule.min_lr_ratio=0.0"],
    ["--optimizer.betas=[0.0, 0.999]"],
    ["--data.synthetic_vocab=2", "--data.synthetic_branching=2"],
    ["--data.synthetic_vocab=512", "--data.synthetic_branching=512"],
    ["--training.seq_len=512"],
    ["--training.max_norm=0", "--optimizer.weight_decay=0", "--router.bias_update_rate=0",
     "--lr_schedule.warmup_steps=0", "--checkpoint.keep_last=0", "--parallel.ep=0"],
])
def test_values_at_the_edge_of_their_range_are_accepted(overrides):
    load_config(None, ["--model.vocab_size=512", "--model.max_seq_len=512"] + overrides,
                world_size=1)


def test_dp_replicate_must_divide_the_world_size():
    msg = _error(["--parallel.dp_replicate=3"], world_size=4)
    assert "[parallel] dp_replicate = 3 must divide the world size 4" in msg, msg
    assert load_config(None, ["--parallel.dp_replicate=3"]).parallel.dp_replicate == 3


def test_more_blend_weights_than_blend_entries_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 50)
    msg = _error(["--data.source=text", f'--data.blend=["{tmp_path / "a.txt"}"]',
                  "--data.blend_weights=[1, 2]", "--model.vocab_size=257"])
    assert "[data] blend_weights needs one weight per [data] blend entry: got 2 weight(s) for 1" in msg


def test_data_path_and_blend_together_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 50)
    a = str(tmp_path / "a.txt")
    msg = _error(["--data.source=text", f"--data.path={a}", f'--data.blend=["{a}"]',
                  "--data.blend_weights=[1]", "--model.vocab_size=257"])
    assert f"[data] path = {a!r} and [data] blend = [{a!r}] are both set" in msg, msg


def test_without_run_folder_checks_an_unwritable_output_dir_passes(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    args = ([f"--job.output_dir={blocker}"],)
    assert "cannot be made" in _error(*args)
    load_config(None, *args, run_folder=False)


def test_without_jsonl_a_folder_named_metrics_jsonl_is_no_error(tmp_path):
    (tmp_path / "run" / "metrics.jsonl").mkdir(parents=True)
    base = [f"--job.output_dir={tmp_path}", "--job.name=run"]
    assert "metrics.jsonl" in _error(base)
    load_config(None, base + ["--metrics.jsonl=false"])


# --- the command line ----------------------------------------------------------------------


def test_a_bare_flag_before_another_override_is_an_error_not_its_value():
    with pytest.raises(ConfigError, match=r"'--float8.enabled' has no value"):
        parse_cli(["--config", "c.toml", "--float8.enabled", "--training.steps=3"])
    with pytest.raises(ConfigError, match=r"'--config=' names no file"):
        parse_cli(["--config=", "--training.steps=3"])
    assert parse_cli(["--training.steps", "3", "--config", "c.toml"]) == (
        "c.toml", ["--training.steps=3"])


def test_check_reads_the_config_for_world_size_ranks_and_writes_nothing(tmp_path, monkeypatch,
                                                                        capsys):
    import torch.distributed as dist

    out = tmp_path / "out"
    path = tmp_path / "c.toml"
    path.write_text(f'[job]\noutput_dir = "{out}"\n[parallel]\ndp_replicate = 2\n')
    from ep_fp8.train import main as main_module

    def no_group(device_type):
        raise AssertionError("--check started a process group")

    monkeypatch.setattr(main_module, "init_distributed", no_group)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--check", "--config", str(path)]) == 0
    assert main(["--config", str(path), "--check"]) == 0
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["--config", str(path), "--check"]) == 2
    assert "dp_replicate = 2 must divide the world size 3" in capsys.readouterr().err
    assert not out.exists() and not dist.is_initialized()


def test_a_missing_config_file_or_help_answer_without_starting(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.toml"), "--check"]) == 2
    assert "config error:" in capsys.readouterr().err
    for flag in ("-h", "--help"):
        assert main([flag]) == 0
        assert USAGE in capsys.readouterr().out


@pytest.mark.parametrize("outcome, code", [
    ({"stopped": ""}, 0), ({"stopped": "stopped by SIGTERM after step 2"}, 0),
    ({"stopped": "stopped by SIGINT after step 2"}, 130),
    ("config", 2), ("nan", 1), ("interrupt", 130),
])
def test_main_exit_codes_follow_how_training_ended(tmp_path, monkeypatch, capsys, outcome, code):
    from ep_fp8.train import loop
    from ep_fp8.train import main as main_module

    def train(cfg):
        if outcome == "config":
            raise ConfigError("bad data")
        if outcome == "nan":
            raise loop.NonFiniteLossError("loss is nan")
        if outcome == "interrupt":
            raise KeyboardInterrupt
        return outcome

    monkeypatch.setattr(loop, "train", train)
    monkeypatch.setattr(loop, "say", lambda msg, stream=None: print(msg, file=stream))
    monkeypatch.setattr(main_module, "init_distributed", lambda device_type: None)
    monkeypatch.setattr(main_module.dist, "destroy_process_group", lambda: None)
    assert INTERRUPTED == 130
    assert main(["--config", os.path.join(ROOT, "train_configs", "debug_model.toml"),
                 f"--job.output_dir={tmp_path}", "--training.device=cpu"]) == code
    err = capsys.readouterr().err
    if outcome in ("config", "nan"):
        assert {"config": "config error: bad data", "nan": "error: loss is nan"}[outcome] in err


def test_a_token_file_needs_seq_len_plus_one_tokens(tmp_path):
    from ep_fp8.train.token_file import write_token_file

    (tmp_path / "a.txt").write_text("x" * 40)
    out = str(tmp_path / "a.tokens")
    tokens = write_token_file(str(tmp_path / "a.txt"), "text", "bytes", out,
                              progress=lambda line: None)["tokens"]
    base = ["--data.source=tokens", f"--data.path={out}", "--model.vocab_size=257",
            f"--job.output_dir={tmp_path / 'out'}"]
    load_config(None, base + [f"--training.seq_len={tokens - 1}"])
    msg = _error(base + [f"--training.seq_len={tokens}"])
    assert f"holds {tokens} tokens, fewer than [training] seq_len + 1 = {tokens + 1}" in msg, msg
