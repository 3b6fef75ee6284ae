"""Config: TOML parsing, overrides, round trip, and every kind of error naming its key."""

import dataclasses
import os
import re
import shutil
import typing

import pytest
import torch

from ep_fp8.model import ModelArgs
from ep_fp8.train.config import (SECTIONS, Config, ConfigError, load_config, resolve_model_args,
                                 section_fields, to_toml)
from ep_fp8.train.checkpoint import MARKER
from ep_fp8.train.loop import dispatch_payload
from ep_fp8.train.main import main, parse_cli
from tests._paths import ROOT


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_values_from_file_and_overrides_reach_the_dataclasses(tmp_path):
    path = write(tmp_path, """
[job]
name = "t"
[model]
name = "debug"
dim = 128
[training]
steps = 7
max_norm = 2          # an int where a float is wanted is fine
[optimizer]
betas = [0.8, 0.9]
""")
    cfg = load_config(path, ["--training.steps=9", "--job.name=other", "--float8.enabled=true",
                             "--model.n_layers=3", "--optimizer.lr=1e-3", '--checkpoint.folder="a b"'])
    assert cfg.training.steps == 9 and cfg.training.max_norm == 2.0
    assert isinstance(cfg.training.max_norm, float)
    assert cfg.job.name == "other" and cfg.float8.enabled is True
    assert cfg.optimizer.betas == (0.8, 0.9) and cfg.optimizer.lr == 1e-3
    assert cfg.checkpoint.folder == "a b"
    args = resolve_model_args(cfg)
    assert (args.dim, args.n_layers) == (128, 3)
    assert args.n_experts == ModelArgs().n_experts      # untouched fields keep the preset


def test_toml_round_trip_gives_an_equal_config(tmp_path):
    cfg = load_config(None, ["--model.dim=96", "--optimizer.betas=[0.5, 0.6]",
                             "--metrics.log_every=3", "--job.name=round"])
    again = load_config(write(tmp_path, to_toml(cfg)))
    assert again == cfg
    full = load_config(write(tmp_path, to_toml(cfg, resolve_model=True), "full.toml"))
    assert resolve_model_args(full) == resolve_model_args(cfg)


@pytest.mark.parametrize("text, key", [
    ("[jobs]\nname = 'x'", "unknown section [jobs]"),
    ("[training]\nstepz = 3", "unknown key 'stepz' in [training]"),
    ("[training]\nsteps = 'ten'", "[training] steps must be int"),
    ("[training]\nsteps = 2.5", "[training] steps must be int"),
    ("[float8]\nenabled = 1", "[float8] enabled must be bool"),
    ("[training]\nbatch_size = true", "[training] batch_size must be int"),
    ("[float8]\nbackend = 'fast'", "[float8] backend must be 'auto' | 'cuda'"),
    ("[optimizer]\nbetas = [0.9]", "[optimizer] betas must be a list of 2 values"),
    ("[model]\nwidth = 3", "unknown key 'width' in [model]"),
    ("[model]\ndim = 'big'", "[model] dim must be int"),
    ("[model]\nname = 'huge'", "[model] name must be one of"),
    ("[model]\nn_heads = 3", "[model] model.n_heads (3) must divide model.dim"),
    ("[training]\nsteps = 0", "[training] steps must be finite and > 0"),
    ("[optimizer]\nlr = inf", "[optimizer] lr must be finite and > 0, got inf"),
    ("[training]\nmax_norm = inf", "[training] max_norm must be finite and >= 0, got inf"),
    ("[lr_schedule]\nmin_lr_ratio = 2.0", "[lr_schedule] min_lr_ratio must be in [0, 1]"),
    ("[optimizer]\nbetas = [0.9, 1.0]", "[optimizer] betas must be in [0, 1)"),
    ("[training]\nseq_len = 100000", "[training] seq_len = 100000 exceeds the model's max_seq_len"),
    ("[parallel]\nep = 3", "[parallel] parallel.ep (3) must divide model.n_experts (8)"),
    ("[parallel]\nep = 8", "[parallel] ep = 8 must divide the world size 2 / [parallel] dp_replicate 1 = 2 (--parallel.ep=0 picks"),
    ("[parallel]\ndp_replicate = 3", "[parallel] dp_replicate = 3 must divide the world size 2"),
    ("[data]\nsource = 'text'", "[data] source = 'text' needs [data] path"),
    ("[data]\nsource = 'jsonl'\npath = '/nonexistent/*.jsonl'", "matches no file"),
    ("[data]\nsynthetic_vocab = 1000", "[data] synthetic_vocab must be in [2, model vocab_size"),
    ("[data]\nsynthetic_branching = 0", "[data] synthetic_branching must be in [1,"),
    ("[data]\nsource = 'text'\npath = '{cfg}'\ntokenizer = '/nonexistent/tokenizer.json'",
     "tokenizer file '/nonexistent/tokenizer.json' does not exist"),
    ("[data]\nsource = 'text'\npath = '{cfg}'\n[model]\nvocab_size = 200",
     "has 257 tokens, more than the model's vocab_size = 200"),
    ("[model]\nn_expert_groups = 4\nn_limited_groups = 1\ntop_k = 3",
     "[model] model.top_k (3) must be <= model.n_limited_groups (1)"),
    ("[job]\noutput_dir = '{cfg}'", "the run's folder ([job] output_dir / name) '{cfg}/"),
    ("[checkpoint]\nenabled = true\nfolder = '{cfg}/ckpt'", "[checkpoint] folder '{cfg}/ckpt' cannot be made: '{cfg}' is a file"),
    ("[validation]\nbatches = 0", "[validation] batches must be finite and > 0, got 0"),
    ("[validation]\ninterval = -5", "[validation] interval must be finite and > 0, got -5"),
    ("[validation]\nenabled = true\npath = 'held.txt'",
     "[validation] path = 'held.txt' is set, but [data] source = \"synthetic\" validates on "
     "held-out samples of its own chain"),
    ("[data]\nsource = 'text'\npath = '{cfg}'\n[model]\nvocab_size = 257\n[validation]\nenabled = true",
     "[validation] enabled = true with [data] source = 'text' needs [validation] path"),
    ("[data]\nsource = 'text'\npath = '{cfg}'\n[model]\nvocab_size = 257\n[validation]\n"
     "enabled = true\npath = '/nonexistent/*.txt'", "[validation] data path '/nonexistent/*.txt' matches no file"),
    ("job = 3", "top-level key 'job' must be a [section]"),
    ("[training\nsteps = 3", "not valid TOML"),
])
def test_each_bad_value_is_an_error_naming_the_file_and_key(tmp_path, text, key):
    path = str(tmp_path / "bad.toml")
    write(tmp_path, text.replace("{cfg}", path), "bad.toml")
    with pytest.raises(ConfigError) as err:
        load_config(path, world_size=2)
    key = key.replace("{cfg}", path)
    assert path in str(err.value) and key in str(err.value), str(err.value)


@pytest.mark.parametrize("name", ["config.toml", "metrics.jsonl"])
def test_a_folder_in_place_of_a_file_the_run_writes_is_a_config_error(tmp_path, name):
    (tmp_path / "run" / name).mkdir(parents=True)
    with pytest.raises(ConfigError, match=re.escape(f"the run's {name} '{tmp_path}/run/{name}' cannot be "
                                                    "written: it is a folder, not a file")):
        load_config(None, [f"--job.output_dir={tmp_path}", "--job.name=run"])


def test_a_config_path_that_cannot_be_read_as_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: cannot read the config file: Is a directory")):
        load_config(str(tmp_path))
    utf16 = tmp_path / "utf16.toml"
    utf16.write_bytes("[training]\nsteps = 3\n".encode("utf-16"))  # starts with the bytes ff fe
    with pytest.raises(ConfigError, match=re.escape(f"{utf16}: not valid TOML: not UTF-8 text")):
        load_config(str(utf16))
    marked = tmp_path / "marked.toml"
    marked.write_bytes(b"\xef\xbb\xbf[training]\nsteps = 3\n")    # a UTF-8 byte-order mark
    assert load_config(str(marked)).training.steps == 3


def test_seeds_and_names_that_torch_or_the_file_system_cannot_take_are_errors(tmp_path):
    for key in ("job", "data"):
        with pytest.raises(ConfigError, match=rf"\[{key}\] seed must be below 2\*\*63"):
            load_config(None, [f"--{key}.seed={2**63}"])
        load_config(None, [f"--{key}.seed={2**63 - 1}"])
    nul = write(tmp_path, '[job]\nname = "a\\u0000b"\n', "nul.toml")
    with pytest.raises(ConfigError, match=re.escape("[job] name must be a non-empty folder name")):
        load_config(nul)


@pytest.mark.parametrize("overrides, message", [
    (["--data.path=corpus/*.txt"], '[data] path = \'corpus/*.txt\' is set, but [data] source = "synthetic"'),
    (["--data.tokenizer=tok.json"], "[data] tokenizer = 'tok.json' is set, but"),
    (["--data.jsonl_field=body"], '[data] jsonl_field = \'body\' is set, but [data] source = "synthetic"'),
    (["--data.source=text", "--data.path={readme}", "--data.jsonl_field=body", "--model.vocab_size=257"],
     "[data] jsonl_field = 'body' is set, but [data] source = 'text'"),
])
def test_data_keys_the_chosen_source_does_not_read_are_errors(overrides, message):
    overrides = [o.replace("{readme}", os.path.join(ROOT, "README.md")) for o in overrides]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_validation_files_that_are_also_training_files_are_an_error(tmp_path):
    (tmp_path / "train").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "train" / name).write_text("some text " * 20)
    (tmp_path / "held.txt").write_text("other text " * 20)
    os.symlink(tmp_path / "train" / "b.txt", tmp_path / "b_again.txt")
    os.link(tmp_path / "train" / "a.txt", tmp_path / "a_hard.txt")
    base = ["--data.source=text", f"--data.path={tmp_path / 'train' / '*.txt'}",
            "--model.vocab_size=257", "--validation.enabled=true"]
    cfg = load_config(None, base + [f"--validation.path={tmp_path / 'held.txt'}"])
    assert cfg.validation.path == str(tmp_path / "held.txt")
    # By name, by a symbolic link, by a hard link.
    for shared in (tmp_path / "train" / "a.txt", tmp_path / "b_again.txt", tmp_path / "a_hard.txt"):
        with pytest.raises(ConfigError, match=r"share 1 file\(s\) .* validation data must be "
                                              r"held out of training"):
            load_config(None, base + [f"--validation.path={shared}"])


def test_validation_files_that_are_copies_of_training_files_are_an_error(tmp_path):
    """Held-out files that are copies of training files (under another name or folder) are
    refused, naming one pair, when they hold a tenth of the held-out bytes or more; a
    small shared file (boilerplate) is let through, and a file of the same size with other
    bytes, or empty files on both sides, are not copies."""
    g = torch.Generator().manual_seed(3)
    (tmp_path / "train").mkdir()
    (tmp_path / "held").mkdir()
    for name in ("a.txt", "b.txt"):   # 20 KiB each: longer than both ends read
        text = "".join(map(chr, torch.randint(97, 123, (20480,), generator=g).tolist()))
        (tmp_path / "train" / name).write_text(text)
    (tmp_path / "train" / "empty.txt").write_text("")
    (tmp_path / "held" / "empty.txt").write_text("")
    b = (tmp_path / "train" / "b.txt").read_text()
    (tmp_path / "held" / "b_last_byte.txt").write_text(b[:-1] + ("a" if b[-1] != "a" else "b"))
    (tmp_path / "train" / "init.txt").write_text("x = 1\n" * 300)   # 1,800 bytes: < 10%
    shutil.copy(tmp_path / "train" / "init.txt", tmp_path / "held" / "init_copy.txt")
    base = ["--data.source=text", f"--data.path={tmp_path / 'train' / '*.txt'}",
            "--model.vocab_size=257", "--validation.enabled=true"]
    load_config(None, base + [f"--validation.path={tmp_path / 'held' / '*.txt'}"])
    shutil.copy(tmp_path / "train" / "b.txt", tmp_path / "held" / "renamed.txt")
    with pytest.raises(ConfigError, match=r"2 file\(s\), 52% of its bytes, are copies of files "
                                          r"of \[data\] path .*'.*held/init_copy.txt' of "
                                          r"'.*train/init.txt'\): validation"):
        load_config(None, base + [f"--validation.path={tmp_path / 'held' / '*.txt'}"])


@pytest.mark.parametrize("arg, key", [
    ("--training.steps=abc", "command line --training.steps=abc: [training] steps must be int"),
    ("--training.nope=1", "command line --training.nope=1: unknown key 'nope'"),
    ("--nope.steps=1", "command line --nope.steps=1: unknown section [nope]"),
    ("--model.depth=2", "unknown key 'depth' in [model]"),
    ("training.steps=3", "is not of the form --section.key=value"),
])
def test_each_bad_override_is_an_error_naming_it(arg, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [arg])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_or_backend_without_cuda_is_an_error():
    with pytest.raises(ConfigError, match=re.escape('[training] device = "cuda"')):
        load_config(None, ["--training.device=cuda"])
    with pytest.raises(ConfigError, match=re.escape('[float8] backend = "cuda" needs')):
        load_config(None, ["--float8.backend=cuda"])


def test_a_bad_config_stops_main_before_any_process_group_or_file(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--config", write(tmp_path, "[parallel]\nep = 3"),
                 f"--job.output_dir={out}"])
    assert code == 2
    assert "[parallel] parallel.ep (3) must divide" in capsys.readouterr().err
    assert not out.exists()
    assert not torch.distributed.is_initialized()


def test_data_too_short_for_a_sample_stops_main_with_a_config_error_before_any_file(
        tmp_path, capsys, monkeypatch):
    from ep_fp8.train.main import free_port

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)   # the one-process group main makes, undone after
    (tmp_path / "tiny.txt").write_text("hi")
    out = tmp_path / "out"
    code = main(["--config", os.path.join(ROOT, "train_configs", "debug_model.toml"),
                 "--data.source=text", f"--data.path={tmp_path / 'tiny.txt'}",
                 f"--job.output_dir={out}", "--training.device=cpu", "--parallel.ep=1",
                 "--model.vocab_size=512"])
    assert code == 2
    err = capsys.readouterr().err
    assert "[data] data path" in err and "fewer than seq_len + 1 = 65" in err, err
    assert not out.exists()
    assert not torch.distributed.is_initialized()


def test_command_line_forms():
    assert parse_cli(["--config", "a.toml", "--training.steps=3", "--job.name", "x"]) == (
        "a.toml", ["--training.steps=3", "--job.name=x"])
    with pytest.raises(ConfigError, match="--config given twice \\('a.toml' and 'b.toml'\\)"):
        parse_cli(["--config", "a.toml", "--config=b.toml"])
    assert parse_cli(["--config=a.toml"]) == ("a.toml", [])
    with pytest.raises(ConfigError, match="cannot read 'steps=3'"):
        parse_cli(["steps=3"])
    with pytest.raises(ConfigError, match="--config FILE is required"):
        parse_cli(["--training.steps=3"])
    # A bare flag (the habit from other trainers) and a capitalised boolean say what to write.
    with pytest.raises(ConfigError, match=r"'--float8.enabled' has no value: write --float8.enabled=true"):
        parse_cli(["--config", "c.toml", "--float8.enabled"])
    with pytest.raises(ConfigError, match=r"must be bool, got 'False' .*lowercase: false"):
        load_config(None, ["--float8.enabled=False"])


@pytest.mark.parametrize("name, world", [("debug_model.toml", 2), ("moe_1b_h200.toml", 1),
                                         ("moe_16b.toml", 8)])
def test_shipped_configs_load_and_float8_switch_changes_only_the_experts(name, world):
    path = os.path.join(ROOT, "train_configs", name)
    cpu = []
    if name != "debug_model.toml" and not torch.cuda.is_available():
        # The GPU recipes ask for one, so that they do not start a 1B model on the CPU.
        with pytest.raises(ConfigError, match='device = "cuda" but no CUDA device'):
            load_config(path, world_size=world)
        cpu = ["--training.device=cpu"]
    on = load_config(path, cpu, world_size=world)
    off = load_config(path, cpu + ["--float8.enabled=false"], world_size=world)
    assert on.float8.enabled, f"{name} is a float8 recipe"
    assert dataclasses.replace(off, float8=on.float8, source=on.source) == on
    assert dispatch_payload(off) == "bf16"


def test_every_config_key_is_documented():
    with open(os.path.join(ROOT, "docs", "config.md")) as f:
        doc = f.read()
    missing = [f"[{s}] {k}" for s in SECTIONS for k in section_fields(s)
               if f"`{k}`" not in doc.split(f"## [{s}]")[-1].split("\n## ")[0]]
    missing += [f"[model] {f.name}" for f in dataclasses.fields(ModelArgs)
                if f"`{f.name}`" not in doc]
    assert not missing, f"docs/config.md does not describe {missing}"


def test_a_new_run_in_a_folder_with_an_earlier_runs_checkpoints_is_an_error(tmp_path):
    run = ["--job.name=run", f"--job.output_dir={tmp_path}", "--checkpoint.enabled=true"]
    os.makedirs(tmp_path / "run" / "checkpoints" / "step-1500")     # no marker: not complete
    load_config(None, run + ["--checkpoint.resume=false"])
    (tmp_path / "run" / "checkpoints" / "step-1500" / MARKER).write_text("{}")
    with pytest.raises(ConfigError) as err:
        load_config(None, run + ["--checkpoint.resume=false"])
    for words in ("holds 1 complete checkpoint(s) of an earlier run in", "[job] name 'run'",
                  "step 1500", "resume = true", str(tmp_path / "run" / "checkpoints")):
        assert words in str(err.value), str(err.value)
    load_config(None, run)                                          # resume = true: fine
    load_config(None, run + ["--checkpoint.resume=false", "--job.name=other"])
    # Checkpoints off would still replace that run's config.toml and metrics.jsonl.
    with pytest.raises(ConfigError, match=r"\[checkpoint\] enabled = false, but .* step 1500"):
        load_config(None, run + ["--checkpoint.enabled=false"])
    load_config(None, run + ["--checkpoint.enabled=false", "--job.name=other"])
    # Another [checkpoint] folder does not make that run's folder free (it used to).
    for off in (["--checkpoint.enabled=false"], ["--checkpoint.resume=false"]):
        with pytest.raises(ConfigError, match=r"choose another \[job\] name"):
            load_config(None, run + off + ["--checkpoint.folder=elsewhere"])
    # A tool that writes nothing in the run's folder (the step profiler) skips these checks.
    load_config(None, run + ["--checkpoint.enabled=false"], run_folder=False)


def test_the_folder_a_saved_config_names_counts_as_that_runs_checkpoints(tmp_path):
    run = ["--job.name=run", f"--job.output_dir={tmp_path}"]
    os.makedirs(tmp_path / "run" / "ck" / "step-20")
    (tmp_path / "run" / "ck" / "step-20" / MARKER).write_text("{}")
    (tmp_path / "run" / "config.toml").write_text('[checkpoint]\nenabled = true\nfolder = "ck"\n')
    with pytest.raises(ConfigError, match=re.escape(f"in '{tmp_path}/run/ck' (newest: step 20)")):
        load_config(None, run)
    (tmp_path / "run" / "config.toml").write_text("not toml [")   # unreadable: nothing to follow
    load_config(None, run)


@pytest.mark.parametrize("folder", ["config.toml", "metrics.jsonl", ".lock", "tb", "./tb/"])
def test_a_checkpoint_folder_that_is_one_of_the_runs_own_files_is_an_error(tmp_path, folder):
    with pytest.raises(ConfigError, match=r"\[checkpoint\] folder .* is the run's own"):
        load_config(None, [f"--job.output_dir={tmp_path}", "--checkpoint.enabled=true",
                           f"--checkpoint.folder={folder}"])


def test_names_too_long_for_the_file_system_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="is longer than the 255 bytes this file system allows"):
        load_config(None, [f"--job.output_dir={tmp_path}", f"--job.name={'n' * 300}"])
    with pytest.raises(ConfigError, match=r"\[checkpoint\] folder .* is longer than"):
        load_config(None, [f"--job.output_dir={tmp_path}", "--checkpoint.enabled=true",
                           f"--checkpoint.folder={'c' * 300}"])
    assert os.listdir(tmp_path) == []


def test_a_leading_tilde_in_the_output_and_checkpoint_folders_is_the_home_folder(tmp_path, monkeypatch):
    from ep_fp8.train.config import checkpoint_dir, run_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["--job.output_dir=~/runs", "--checkpoint.folder=~/ck"])
    assert run_dir(cfg) == f"{tmp_path}/runs/run" and checkpoint_dir(cfg) == f"{tmp_path}/ck"


def test_config_choices_are_the_ones_the_lower_layers_accept():
    # The config module stays free of torch, so it spells the choices out; they must be
    # exactly the tuples owned by ep_fp8.moe and ep_fp8.parallel.
    from ep_fp8.moe import DISPATCH_PAYLOADS
    from ep_fp8.parallel import AC_MODES
    from ep_fp8.train import config

    hints = {s: typing.get_type_hints(cls) for s, cls in
             (("float8", config.Float8Config), ("ac", config.ActivationCheckpointConfig))}
    assert typing.get_args(hints["float8"]["dispatch_payload"]) == DISPATCH_PAYLOADS
    assert typing.get_args(hints["ac"]["mode"]) == AC_MODES


def test_defaults_are_a_valid_config():
    assert load_config(None, world_size=1) == Config()


@pytest.mark.parametrize("world, ep", [(1, 1), (2, 2), (3, 1), (4, 4), (16, 8)])
def test_ep_zero_resolves_to_the_largest_degree_dividing_experts_and_ranks(world, ep):
    assert load_config(None, ["--parallel.ep=0"], world_size=world).parallel.ep == ep


@pytest.mark.parametrize("supported, overrides, message", [
    (True, ["--model.expert_hidden_dim=40"], "multiples of 16"),
    (False, [], "compute capability 9.0 or 10.0"),
])
def test_float8_cuda_backend_that_cannot_run_here_is_a_config_error(monkeypatch, supported, overrides,
                                                                     message):
    # A GPU is faked: the check must name the backend, the sizes and the reason before any
    # process group exists, instead of failing in the first forward.
    from ep_fp8.ops import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backends, "_has_scaled_grouped_mm", lambda device_type, index: supported)
    base = ["--float8.enabled=true", "--float8.backend=cuda"]
    with pytest.raises(ConfigError, match=re.escape('[float8] backend = "cuda"')) as err:
        load_config(None, base + overrides)
    assert message in str(err.value) and "expert_hidden_dim" in str(err.value)
    if supported:  # aligned sizes on a supported GPU are fine, below 1024 experts per rank
        load_config(None, base)
        many = base + ["--model.n_experts=2048", "--model.top_k=2"]
        with pytest.raises(ConfigError, match="n_experts = 2048 \\(1024 per rank\\).*fewer than 1024"):
            load_config(None, many + ["--parallel.ep=2"], world_size=2)
        load_config(None, many + ["--parallel.ep=4"], world_size=4)


@pytest.mark.parametrize("section, key, value, bound", [
    ("training", "steps", "0", "> 0"),
    ("training", "batch_size", "0", "> 0"),
    ("training", "seq_len", "0", "> 0"),
    ("training", "grad_accum", "0", "> 0"),
    ("parallel", "dp_replicate", "0", "> 0"),
    ("checkpoint", "interval", "0", "> 0"),
    ("metrics", "log_every", "0", "> 0"),
    ("optimizer", "lr", "0.0", "> 0"),
    ("optimizer", "eps", "0.0", "> 0"),
    ("job", "seed", "-1", ">= 0"),
    ("parallel", "ep", "-1", ">= 0"),
    ("data", "seed", "-1", ">= 0"),
    ("training", "max_norm", "-1.0", ">= 0"),
    ("optimizer", "weight_decay", "-1.0", ">= 0"),
    ("lr_schedule", "warmup_steps", "-1", ">= 0"),
    ("checkpoint", "keep_last", "-1", ">= 0"),
    ("router", "bias_update_rate", "-1.0", ">= 0"),
    ("metrics", "peak_flops", "-1.0", ">= 0"),
])
def test_each_positive_and_non_negative_value_is_checked(tmp_path, section, key, value, bound):
    # One case per key of validate._ranges' `positive` and `non_negative`, each at the
    # first value out of range, with and without a world size.
    path = write(tmp_path, f"[{section}]\n{key} = {value}", "bad.toml")
    message = f"{path}: [{section}] {key} must be finite and {bound}, got {value}"
    for world in (None, 2):
        with pytest.raises(ConfigError) as err:
            load_config(path, world_size=world)
        assert message in str(err.value), str(err.value)


def test_ep_with_dp_replicate_counts_the_ranks_of_one_replica():
    rep = ["--parallel.dp_replicate=2"]    # world 4: two replicas of 2 ranks (8 experts)
    assert load_config(None, rep + ["--parallel.ep=0"], world_size=4).parallel.ep == 2
    assert load_config(None, rep + ["--parallel.ep=2"], world_size=4).parallel.ep == 2
    assert load_config(None, ["--parallel.dp_replicate=4", "--parallel.ep=0"],
                       world_size=4).parallel.ep == 1
    with pytest.raises(ConfigError, match=re.escape(
            "[parallel] ep = 4 must divide the world size 4 / [parallel] dp_replicate 2 = 2")):
        load_config(None, rep + ["--parallel.ep=4"], world_size=4)
    assert load_config(None, ["--parallel.ep=4"], world_size=4).parallel.ep == 4


@pytest.mark.parametrize("name", ["a/b", "..", ".", "/abs", ""])
def test_a_job_name_that_is_not_one_folder_name_is_an_error(tmp_path, name):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f'--job.name="{name}"', f"--job.output_dir={tmp_path}"])
    assert (f"[job] name must be a non-empty folder name without '/', got {name!r}"
            in str(err.value)), str(err.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("text, override, message", [
    ("[training]\nmax_norm = true", "--training.max_norm=true",
     "[training] max_norm must be float, got True (bool)"),
    ("[optimizer]\nlr = false", "--optimizer.lr=false",
     "[optimizer] lr must be float, got False (bool)"),
    ("[optimizer]\nbetas = [0.9, true]", "--optimizer.betas=[0.9, true]",
     "[optimizer] betas[1] must be float, got True (bool)"),
])
def test_a_bool_where_a_float_is_wanted_is_an_error_naming_the_type(tmp_path, text, override,
                                                                    message):
    # A bool is an int in Python: true must not pass as 1.0.
    path = write(tmp_path, text, "bad.toml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: {message}" in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match=re.escape(f"command line {override}: {message}")):
        load_config(None, [override])
