"""Corners of the training loop (ep_fp8.train.loop), its metrics, optimizer, config and
command line that the other tests leave open: the last step's checkpoint when steps is not
a multiple of the interval, resuming in the run's own folder, a stop with checkpoints off,
a non-finite gradient norm with a finite loss, the configured peak reaching MFU, the
largest imbalance over several MoE layers, the TensorBoard and summary lines of
validation, what other ranks leave alone, the defaults docs/config.md states, and main's
exit codes.

The train() runs here are one-rank gloo groups made in this process (as `main` makes
without torchrun) on a model of two layers of width 16: well under a second each.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal

import pytest
import torch
import torch.distributed as dist

from ep_fp8.train import loop
from ep_fp8.train import metrics as metrics_module
from ep_fp8.train.checkpoint import complete_checkpoints
from ep_fp8.train.config import (SECTIONS, Config, ConfigError, load_config, resolve_model_args,
                                 to_dict, to_toml, tomllib)
from ep_fp8.train.main import INTERRUPTED, free_port, init_distributed, main
from tests.train.test_config import ROOT, write
from tests.train.test_metrics import fake_clock, make, read
from tests.train.test_train_step import ARGS, _Batches

CPU = torch.device("cpu")
# The debug preset shrunk to 2 layers of width 16: float32 on the CPU, 2 x 16 tokens a step.
TINY = [
    "--training.device=cpu", "--training.dtype=float32", "--training.batch_size=2",
    "--training.seq_len=16", "--metrics.tensorboard=false", "--parallel.ep=1",
    "--float8.enabled=false", "--model.dim=16", "--model.n_layers=2", "--model.n_heads=2",
    "--model.n_kv_heads=1", "--model.dense_hidden_dim=32", "--model.expert_hidden_dim=16",
    "--lr_schedule.warmup_steps=1",
]


def _torchrun_env(monkeypatch, port=None):
    """The environment of a one-process group, as main sets it without torchrun (undone
    after the test)."""
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port or free_port()))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def one_rank(monkeypatch):
    """A one-process gloo group for train(), destroyed after the test."""
    _torchrun_env(monkeypatch)
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def _config(root, *overrides, name="run"):
    return load_config(None, TINY + [f"--job.output_dir={root}", f"--job.name={name}",
                                     *overrides], world_size=1)


def _train(root, *overrides, name="run"):
    return loop.train(_config(root, *overrides, name=name))


def _metrics_lines(root, name="run"):
    with open(os.path.join(root, name, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# --- train(): checkpoints, resume, stops ------------------------------------------------

def test_the_last_step_is_saved_when_steps_is_not_a_multiple_of_the_interval(tmp_path, one_rank):
    """[checkpoint] interval 2 over 3 steps saves step 2 and the final step 3."""
    out = _train(tmp_path, "--training.steps=3", "--checkpoint.enabled=true",
                 "--checkpoint.interval=2", "--checkpoint.keep_last=0")
    ckpts = str(tmp_path / "run" / "checkpoints")
    assert [step for step, _ in complete_checkpoints(ckpts)] == [2, 3]
    assert out["step"] == 3 and out["checkpoint"] == os.path.join(ckpts, "step-3")


def test_a_resume_in_the_runs_own_folder_continues_its_metrics_file(tmp_path, one_rank, capsys):
    """A resumed run truncates and appends to its metrics.jsonl (it does not move it aside
    as an earlier run's), marks the header with the step, and a run already at its last
    step says there is nothing to train."""
    common = ["--checkpoint.enabled=true", "--checkpoint.interval=2", "--metrics.log_every=1"]
    _train(tmp_path, "--training.steps=2", *common)
    out = _train(tmp_path, "--training.steps=4", *common)
    assert out["step"] == 4 and [r["step"] for r in out["records"]] == [3, 4]
    assert not (tmp_path / "run" / "earlier-runs").exists()
    lines = _metrics_lines(tmp_path)
    assert [line.get("step") for line in lines] == [None, 1, 2, None, 3, 4]
    assert "resumed_from_step" not in lines[0]["run"]
    assert lines[3]["run"]["resumed_from_step"] == 2
    capsys.readouterr()
    again = _train(tmp_path, "--training.steps=4", *common)
    assert again["step"] == 4 and again["records"] == []
    assert "nothing to train: the checkpoint is at step 4" in capsys.readouterr().out


def test_a_fresh_run_moves_an_earlier_runs_config_metrics_and_tensorboard_aside(tmp_path, one_rank):
    """All three of config.toml, metrics.jsonl and tb/ of an earlier run without
    checkpoints move to earlier-runs/<date>/."""
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "events").write_text("old events")
    (run / "config.toml").write_text("# old\n")
    (run / "metrics.jsonl").write_text('{"run": {"name": "old"}}\n')
    _train(tmp_path, "--training.steps=1")
    [kept] = (run / "earlier-runs").iterdir()
    assert sorted(os.listdir(kept)) == ["config.toml", "metrics.jsonl", "tb"]
    assert (kept / "tb" / "events").read_text() == "old events"
    assert not (run / "tb").exists()


def _signal_during(monkeypatch, owner, name, sig, at_call=1, after=False):
    """Wraps `owner`.`name` (a function or method) so that its call number `at_call` sends
    `sig` to this process (_StopFlag's handler takes it), before the call runs or, with
    `after`, once it has: a signal that arrives at that moment of the run."""
    real, calls = getattr(owner, name), []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call and not after:
            os.kill(os.getpid(), sig)
        result = real(*args, **kwargs)
        if len(calls) == at_call and after:
            os.kill(os.getpid(), sig)
        return result
    monkeypatch.setattr(owner, name, signalled)


def test_a_stop_by_signal_with_checkpoints_off_says_nothing_was_saved(tmp_path, one_rank,
                                                                      monkeypatch):
    """A SIGTERM just before step 2 stops the run after step 2; that step is logged though
    log_every is 100, and the reason says that nothing was saved."""
    _signal_during(monkeypatch, loop, "loop_step", signal.SIGTERM, at_call=2)
    out = _train(tmp_path, "--training.steps=6", "--metrics.log_every=100")
    assert out["step"] == 2
    assert out["stopped"] == ("stopped by SIGTERM after step 2 "
                              "(checkpoint.enabled = false: nothing saved)")
    assert [r["step"] for r in out["records"]] == [2]
    assert out["checkpoint"] is None and not (tmp_path / "run" / "checkpoints").exists()


def test_a_signal_while_a_step_computes_stops_the_run_after_that_step(tmp_path, one_rank,
                                                                       monkeypatch):
    _signal_during(monkeypatch, loop, "train_step", signal.SIGTERM, at_call=2, after=True)
    out = _train(tmp_path, "--training.steps=10", "--checkpoint.enabled=true",
                 "--checkpoint.interval=100")
    assert out["step"] == 2 and out["stopped"] == "stopped by SIGTERM after step 2"
    ckpts = str(tmp_path / "run" / "checkpoints")
    assert [step for step, _ in complete_checkpoints(ckpts)] == [2]


def test_a_signal_during_the_last_step_counts_for_it(tmp_path, one_rank, monkeypatch):
    _signal_during(monkeypatch, loop, "train_step", signal.SIGINT, at_call=3, after=True)
    out = _train(tmp_path, "--training.steps=3", "--checkpoint.enabled=true",
                 "--checkpoint.interval=100")
    assert out["step"] == 3 and out["stopped"] == "stopped by SIGINT after step 3"
    assert out["checkpoint"].endswith("step-3")


def test_a_signal_after_the_last_steps_flags_is_still_reported(tmp_path, one_rank, monkeypatch):
    """A Ctrl-C that arrives after the last step's flags were shared (here: during its
    checkpoint) is reported all the same, so that main answers 130 and a calling script
    stops."""
    _signal_during(monkeypatch, loop.Checkpointer, "save", signal.SIGINT)
    out = _train(tmp_path, "--training.steps=2", "--checkpoint.enabled=true",
                 "--checkpoint.interval=100")
    assert out["step"] == 2 and out["stopped"] == "stopped by SIGINT after step 2"
    assert out["checkpoint"].endswith("step-2")


def test_a_nonfinite_gradient_norm_with_a_finite_loss_stops_the_run(tmp_path, one_rank,
                                                                    monkeypatch):
    """The loop checks the gradient norm too: an Inf norm at step 2 (loss finite) raises
    NonFiniteLossError naming step 2, with that step logged (log_every 100)."""
    real, calls = loop.loop_step, []

    def inf_norm_at_step_2(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(1)
        return result._replace(grad_norm=math.inf) if len(calls) == 2 else result

    monkeypatch.setattr(loop, "loop_step", inf_norm_at_step_2)
    with pytest.raises(loop.NonFiniteLossError, match=r"gradient norm inf at step 2:"):
        _train(tmp_path, "--training.steps=5", "--metrics.log_every=100")
    records = _metrics_lines(tmp_path)[1:]
    assert [r["step"] for r in records] == [2]
    assert math.isfinite(records[0]["loss"]) and records[0]["grad_norm"] == math.inf


def test_the_configured_peak_flops_gives_the_mfu_on_the_cpu(tmp_path, one_rank):
    """[metrics] peak_flops > 0 is what MFU divides by, also where no peak is known (CPU):
    mfu = flops_per_token x tokens/s per rank / peak (float64 both sides: rel 1e-9)."""
    from ep_fp8.model import flops_per_token

    cfg = _config(tmp_path, "--training.steps=2", "--metrics.log_every=1",
                  "--metrics.peak_flops=1e9")
    out = loop.train(cfg)
    per_token = flops_per_token(resolve_model_args(cfg), cfg.training.seq_len)
    assert len(out["records"]) == 2
    for r in out["records"]:
        assert r["mfu"] > 0
        assert r["mfu"] == pytest.approx(per_token * r["tokens_per_s_per_gpu"] / 1e9, rel=1e-9)


# --- loop pieces ------------------------------------------------------------------------

def test_loop_step_reports_the_largest_imbalance_of_several_moe_layers(monkeypatch):
    """load_imbalance_max is the max over the MoE layers of their imbalances (3 MoE
    layers here, whose imbalances differ), not one layer's or the smallest."""
    import dataclasses

    import ep_fp8.moe as moe
    from ep_fp8.model import Transformer

    args = dataclasses.replace(ARGS, n_layers=4)           # 1 dense + 3 MoE layers
    torch.manual_seed(0)
    model = Transformer(args)
    seen, real = [], moe.balance_routers

    def observed(*a, **k):
        seen.append(real(*a, **k).clone())
        return seen[-1]

    monkeypatch.setattr(moe, "balance_routers", observed)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, args.vocab_size, (4, 9), generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    result = loop.loop_step(Config(), model, _Batches([(tokens[:, :-1], tokens[:, 1:])]),
                            optimizer, scheduler, CPU)
    [per_layer] = seen
    assert per_layer.numel() == 3 and per_layer.max() > per_layer.min(), per_layer
    assert result.load_imbalance_max == pytest.approx(float(per_layer.max()), rel=1e-6)


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_on_the_cpu():
    """training.dtype = "auto" resolves by device; an explicit dtype is kept."""
    cfg = Config()
    assert loop.resolve_dtype(cfg, CPU) is torch.float32
    assert loop.resolve_dtype(cfg, torch.device("cuda", 0)) is torch.bfloat16
    cfg.training.dtype = "float32"
    assert loop.resolve_dtype(cfg, torch.device("cuda", 0)) is torch.float32
    cfg.training.dtype = "bfloat16"
    assert loop.resolve_dtype(cfg, CPU) is torch.bfloat16


# --- metrics ----------------------------------------------------------------------------

def test_a_resumed_run_purges_tensorboard_after_its_step_and_logs_validation(tmp_path,
                                                                             tensorboard):
    """TensorBoard opens with purge_step = resumed step + 1 (the steps it will redo), and
    each evaluation goes there as val/loss."""
    m = make(tmp_path, tensorboard=True, steps=10)
    m.start("a", {}, resumed_step=5)
    m.validation(6, 2.5)
    assert tensorboard[0] == ("open", str(tmp_path / "tb"), 6)
    assert ("val/loss", 2.5, 6) in tensorboard


def test_other_ranks_print_nothing_and_open_no_tensorboard(tmp_path, tensorboard):
    """Rank 1 keeps its records but prints no log or validation line and writes no
    TensorBoard events."""
    printed = []
    m = make(tmp_path, rank=1, tensorboard=True, log_every=1, steps=2, printer=printed.append)
    m.start("a", {}, resumed_step=0)
    for step in (1, 2):
        m.step(step, loss=1.0, grad_norm=0.5, lr=1e-3, load_imbalance=1.0)
    m.validation(2, 1.5)
    assert [r["step"] for r in m.records] == [1, 2] and m.val_records[-1]["val_loss"] == 1.5
    assert printed == [] and tensorboard == []


def test_a_resume_keeps_the_validation_records_up_to_its_step(tmp_path):
    """The truncation of a resumed run keeps every record (training and validation) of
    steps <= the checkpoint's and drops the later ones."""
    m = make(tmp_path, log_every=1, steps=6)
    m.start("a", {}, resumed_step=0)
    for step in range(1, 5):
        m.step(step, 1.0, 0.0, 0.0, 1.0)
        if step % 2 == 0:
            m.validation(step, 2.0)
    make(tmp_path, log_every=1, steps=6).start("a", {}, resumed_step=3)
    kept = [(line.get("step"), "val_loss" in line) for line in read(tmp_path)]
    assert kept == [(None, False), (1, False), (2, False), (2, True), (3, False), (None, False)]


def test_the_summary_names_the_last_and_the_best_validation_loss_and_the_last_imbalance(tmp_path):
    """Validation line: the last evaluation's step and loss, the lowest loss; experts
    line: the last record's imbalance."""
    m = make(tmp_path, jsonl=False, log_every=1, steps=3)
    for step, imbalance in ((1, 1.9), (2, 1.7), (3, 1.3)):
        m.step(step, loss=3.0, grad_norm=0.5, lr=1e-3, load_imbalance=imbalance)
        m.validation(step, {1: 3.0, 2: 2.5, 3: 2.8}[step])
    text = m.summary()
    assert "validation  val_loss at step 3 2.8000  best 2.5000" in text, text
    assert "load imbalance (max/mean tokens) last 1.30" in text, text


def test_a_summary_of_two_logged_windows_leaves_out_the_first(tmp_path, monkeypatch):
    """Two windows: the throughput is the second's alone (exact integer ticks)."""
    clock = fake_clock(monkeypatch)
    m = make(tmp_path, jsonl=False, log_every=1, steps=2, tokens_per_step=1000)
    for step, t in ((1, 10.0), (2, 12.0)):      # 100 tok/s, then 500 tok/s
        clock[0] = t
        m.step(step, loss=1.0, grad_norm=0.5, lr=1e-3, load_imbalance=1.0)
    assert "throughput  500 tok/s  (250 per rank)" in m.summary()


def test_peak_memory_is_in_gib(monkeypatch):
    """peak_memory_gib divides torch's bytes by 2**30."""
    monkeypatch.setattr(metrics_module.torch.cuda, "max_memory_allocated",
                        lambda device: 3 * 2**30)
    assert metrics_module.peak_memory_gib(torch.device("cuda", 0)) == 3.0
    assert metrics_module.peak_memory_gib(CPU) == 0.0


# --- config -----------------------------------------------------------------------------

def _documented_defaults() -> dict:
    """{section: {key: default}} from the tables of docs/config.md (TOML values)."""
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        doc = f.read()
    out = {}
    for section in SECTIONS:
        body = doc.split(f"## [{section}]")[1].split("\n## ")[0]
        rows = re.findall(r"^\| `(\w+)` \| `([^|]+)` \|", body, flags=re.M)
        out[section] = {key: tomllib.loads(f"v = {value}")["v"] for key, value in rows}
    return out


def test_the_defaults_are_the_ones_docs_config_md_states():
    """Every section's default as docs/config.md's tables give it, of the same TOML type
    (an int documented for a float key aside: TOML reads 2 where the code holds 2.0); a key
    left out of a config keeps it, so a changed default changes users' runs silently."""
    documented, actual = _documented_defaults(), to_dict(Config())   # [model]: its name only
    for section in SECTIONS:
        assert set(documented[section]) == set(actual[section]), section
        for key, value in documented[section].items():
            got = actual[section][key]
            assert got == value, (section, key, got, value)
            assert type(got) is type(value) or isinstance(got, float) and isinstance(value, int), \
                (section, key, got, value)


def test_override_values_that_toml_reads_otherwise_stay_text_for_text_keys():
    """A bare number for a text key is text; '=' in a value is kept."""
    cfg = load_config(None, ["--job.name=123", "--checkpoint.folder=a=b"])
    assert cfg.job.name == "123" and cfg.checkpoint.folder == "a=b"


def test_text_with_quotes_and_backslashes_round_trips_through_to_toml(tmp_path):
    """to_toml escapes '"' and '\\' so that load_config reads the same text back."""
    cfg = load_config(None, ['--job.name=say "hi"', "--checkpoint.folder=c:\\ckpt\\n"])
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert (again.job.name, again.checkpoint.folder) == ('say "hi"', "c:\\ckpt\\n")


def test_an_error_found_after_overrides_names_the_file_and_the_command_line(tmp_path):
    """A range error that an override causes names '<file> + command line'."""
    path = write(tmp_path, "[training]\nsteps = 3\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path} + command line: [training] steps "
                                                    "must be finite and > 0, got 0")):
        load_config(path, ["--training.steps=0"])


# --- main -------------------------------------------------------------------------------

DEBUG = os.path.join(ROOT, "train_configs", "debug_model.toml")


def _main_with_train(monkeypatch, tmp_path, train):
    """main() on the debug recipe with loop.train replaced by `train` (a one-process group
    is made and destroyed around it)."""
    _torchrun_env(monkeypatch)
    monkeypatch.setattr(loop, "train", train)
    code = main(["--config", DEBUG, f"--job.output_dir={tmp_path}", "--training.device=cpu",
                 "--parallel.ep=1"])
    assert not dist.is_initialized()
    return code


@pytest.mark.parametrize("stopped, code", [("", 0), ("stopped by SIGTERM after step 2", 0),
                                           ("stopped by SIGINT after step 2", INTERRUPTED)])
def test_main_answers_0_for_a_sigterm_stop_and_130_for_a_sigint_stop(tmp_path, monkeypatch,
                                                                      stopped, code):
    """Exit code by why the run stopped: done or SIGTERM 0, SIGINT 130."""
    assert _main_with_train(monkeypatch, tmp_path, lambda cfg: {"stopped": stopped}) == code


def test_main_answers_1_for_a_nonfinite_loss(tmp_path, monkeypatch, capsys):
    """NonFiniteLossError: exit code 1 and the error on stderr."""
    def diverged(cfg):
        raise loop.NonFiniteLossError("loss is nan and gradient norm nan at step 3: stopping.")

    assert _main_with_train(monkeypatch, tmp_path, diverged) == 1
    assert "error: loss is nan and gradient norm nan at step 3" in capsys.readouterr().err


def test_main_check_uses_world_size_from_the_environment_and_starts_nothing(tmp_path,
                                                                            monkeypatch):
    """--check validates for WORLD_SIZE ranks (ep = 2 fits 2, not 1) and exits before any
    process group or file."""
    args = ["--check", "--config", DEBUG, f"--job.output_dir={tmp_path / 'out'}",
            "--training.device=cpu", "--parallel.ep=2"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(args) == 0
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(args) == 2
    assert not dist.is_initialized() and not (tmp_path / "out").exists()


def test_main_help_and_a_missing_config_file(tmp_path, capsys):
    """--help prints the usage and answers 0; a missing config file is a config error (2)."""
    assert main(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m ep_fp8.train")
    assert main(["--config", str(tmp_path / "none.toml")]) == 2
    assert "config error:" in capsys.readouterr().err


def test_joining_the_group_torchrun_describes_overwrites_none_of_its_environment(monkeypatch):
    """With RANK set (torchrun), init_distributed joins that rendezvous, overwriting
    nothing of it."""
    env = _torchrun_env(monkeypatch)
    init_distributed("cpu")
    try:
        assert dist.get_world_size() == 1
        assert {k: os.environ[k] for k in env} == env
    finally:
        dist.destroy_process_group()


def test_text_with_control_characters_survives_the_saved_config(tmp_path):
    """to_toml escapes control characters (a saved config.toml must load back), and the
    value read back is the one written."""
    name = "a\nb\x01c\x7fd\te\\f\"g"
    cfg = load_config(None, [f"--job.name={name}", f"--job.output_dir={tmp_path}"])
    assert cfg.job.name == name
    path = tmp_path / "saved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(str(path), []).job.name == name


def test_config_without_a_file_says_so():
    """`--config` as the last argument, or `--config=`, names no file."""
    from ep_fp8.train.main import parse_cli

    for argv in (["--config"], ["--config="], ["--training.steps=3", "--config"]):
        with pytest.raises(ConfigError, match="names no file: write --config FILE"):
            parse_cli(argv)


def test_a_held_out_path_with_validation_off_is_said_at_start_up(tmp_path, one_rank, capsys):
    (tmp_path / "held.txt").write_text("held out")
    _train(tmp_path, "--training.steps=1", "--data.source=text", f"--data.path={__file__}",
           "--model.vocab_size=257", f"--validation.path={tmp_path / 'held.txt'}")
    said = capsys.readouterr().out
    assert "[validation] path = " in said and "enabled = false: this run computes no held-out loss" in said
    assert "1 rank, ep=" in said
    _train(tmp_path, "--training.steps=1", name="plain")
    assert "computes no held-out loss" not in capsys.readouterr().out


def test_the_start_up_line_names_the_backend_of_the_experts_first_gemm(monkeypatch, capsys, one_rank):
    # x w13^T: D -> 2H (w1 and w3 stacked), which may resolve otherwise than D -> H would.
    from ep_fp8.parallel import ParallelDims

    asked = []

    def resolve(backend, device, K, N, **kw):
        asked.append((K, N))
        return "picked"

    monkeypatch.setattr("ep_fp8.ops.resolve_backend", resolve)
    cfg = load_config(None, ["--model.name=debug", "--float8.enabled=true", "--parallel.ep=1"])
    args = resolve_model_args(cfg)
    loop._describe(cfg, args, ParallelDims(world_size=1, ep=1), torch.device("cpu"), torch.float32)
    assert asked == [(args.dim, 2 * args.expert_hidden_dim)]
    assert "float8 on (auto: picked)" in capsys.readouterr().out


def test_a_damaged_initial_load_is_named_damaged_without_the_model_size_hint(tmp_path, one_rank):
    _train(tmp_path, "--training.steps=2", "--checkpoint.enabled=true", "--checkpoint.interval=2",
           name="source")
    step = tmp_path / "source" / "checkpoints" / "step-2"
    shard = next(p for p in step.iterdir() if p.suffix == ".distcp")
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ConfigError) as info:
        _train(tmp_path, "--training.steps=2", f"--checkpoint.initial_load={step}", name="next")
    message = str(info.value)
    assert "initial_load: " in message and "is damaged" in message
    assert message.endswith("Give another complete checkpoint (a step-N folder of a run)")
    assert "must have the sizes" not in message


def test_a_ctrl_c_while_the_summary_is_written_is_no_keyboard_interrupt(tmp_path, one_rank,
                                                                        monkeypatch):
    """The run is done and saved: a Ctrl-C then must not surface as a KeyboardInterrupt,
    which main reports as one before training started ("nothing saved")."""
    _signal_during(monkeypatch, metrics_module.MetricsLogger, "summary", signal.SIGINT)
    out = _train(tmp_path, "--training.steps=2", "--checkpoint.enabled=true",
                 "--checkpoint.interval=100")
    assert out["step"] == 2 and out["checkpoint"].endswith("step-2")
