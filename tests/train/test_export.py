"""Exporting a run's checkpoint as one model file (ep_fp8.train.export) and sampling from
it (ep_fp8.generate): a checkpoint of 2 EP ranks comes out whole, equal to torch's own
conversion of the same DCP folder; the loaded model gives the logits of those weights;
every refusal comes before anything is written; and generation follows its definition
(greedy = the argmax chain, the window of max_seq_len, top-k, the allowed ids, the stop
token, the seed)."""

import dataclasses
import functools
import json
import os
import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from ep_fp8.generate import generate, generate_samples, main as generate_main, sample_next
from ep_fp8.model import PRESETS, ModelArgs, Transformer
from ep_fp8.train import export
from ep_fp8.train.export import export_model, find_checkpoint, load_exported
from tests._dist import run_ranks
from tests.train._train_worker import run_plan

pytestmark = pytest.mark.slow

TEXT = "def f(x):\n    return x * 2\n\n" * 200


def _quiet(line):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run of 2 gloo ranks with EP = 2 on byte-tokenized text, checkpoints at steps 2
    and 4."""
    root = tmp_path_factory.mktemp("runs")
    (root / "train.txt").write_text(TEXT)
    plan = [{"name": "ep2", "overrides": [
        "--parallel.ep=2", "--training.steps=4", "--checkpoint.enabled=true",
        "--checkpoint.interval=2", "--data.source=text", f"--data.path={root / 'train.txt'}",
        "--model.vocab_size=257"]}]
    run_ranks(functools.partial(run_plan, root=str(root), plan=plan), 2, timeout=240)
    result = json.loads((root / "ep2" / "result-rank0.json").read_text())
    assert "error" not in result and result["step"] == 4, result
    return root / "ep2"


def _reference(checkpoint, tmp_path):
    """The model tensors of a DCP checkpoint through torch's own converter."""
    dcp_to_torch_save(checkpoint, tmp_path / "ref.pt")
    saved = torch.load(tmp_path / "ref.pt", weights_only=True)
    return saved["model"]


def test_an_ep2_checkpoint_is_exported_whole_and_loads_into_a_plain_model(run, tmp_path):
    meta = export_model(str(run), str(tmp_path / "m.pt"), progress=_quiet)
    assert (meta["step"], meta["tokenizer"], meta["format"]) == (4, "bytes", export.FORMAT)
    assert meta["checkpoint"].endswith("step-4")
    reference = _reference(meta["checkpoint"], tmp_path)
    written = torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"]
    assert written.keys() == reference.keys()
    for name, tensor in reference.items():   # the experts' EP shards reassembled, bit for bit
        assert torch.equal(written[name], tensor), name
    assert written["layers.1.moe.experts.w13"].shape[0] == meta["model_args"]["n_experts"]

    model, loaded = load_exported(str(tmp_path / "m.pt"))
    assert not model.training and loaded["step"] == 4
    plain = Transformer(ModelArgs(**meta["model_args"]))
    plain.load_state_dict(reference)
    tokens = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), plain.eval()(tokens), rtol=0, atol=0)
    assert not any(b.is_meta for b in model.buffers())


def test_an_older_step_and_bfloat16_weights(run, tmp_path):
    """--step picks a checkpoint; --dtype bfloat16 casts the parameters only (the routers'
    bias stays float32), and the loaded model computes in bfloat16."""
    meta = export_model(str(run), str(tmp_path / "m.pt"), step=2, dtype="bfloat16", progress=_quiet)
    assert meta["step"] == 2 and meta["checkpoint"].endswith("step-2")
    reference = _reference(meta["checkpoint"], tmp_path)
    written = torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"]
    for name, tensor in reference.items():
        if name.endswith("expert_bias"):
            assert written[name].dtype == torch.float32 and torch.equal(written[name], tensor)
        else:
            assert written[name].dtype == torch.bfloat16
            assert torch.equal(written[name], tensor.to(torch.bfloat16)), name
    model, _ = load_exported(str(tmp_path / "m.pt"))
    assert model.output.weight.dtype == torch.bfloat16


def test_what_cannot_be_exported_is_refused_before_anything_is_written(run, tmp_path):
    out = tmp_path / "m.pt"
    cases = [
        (dict(run=str(tmp_path / "nowhere")), "does not exist"),
        (dict(run=str(tmp_path)), "is not a run folder: it has no config.toml"),
        (dict(run=str(run / "checkpoints" / "step-2")), "no config.toml: it is a checkpoint; "
                                                         "give its run's folder"),
        (dict(run=str(run), step=3), r"no complete checkpoint of step 3 .* steps there: 2, 4"),
        (dict(run=str(run), dtype="float16"), "dtype must be one of"),
        (dict(run=str(run), out=str(tmp_path)), "it is a folder, not a file"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            export_model(**{"out": str(out), **kwargs}, progress=_quiet)
    assert sorted(os.listdir(tmp_path)) == []

    empty = tmp_path / "empty"   # a run folder whose checkpoints are gone
    empty.mkdir()
    shutil.copy(run / "config.toml", empty / "config.toml")
    with pytest.raises(ValueError, match="has no complete checkpoint in [^(]*$"):
        export_model(str(empty), str(out), progress=_quiet)
    config = (empty / "config.toml").read_text()   # a run that never saved one says why
    assert "[checkpoint]\nenabled = true\n" in config
    (empty / "config.toml").write_text(config.replace("[checkpoint]\nenabled = true\n",
                                                      "[checkpoint]\nenabled = false\n"))
    with pytest.raises(ValueError, match=r"no complete checkpoint .*\(its config has \[checkpoint\] "
                                         r"enabled = false: it saved none\)"):
        export_model(str(empty), str(out), progress=_quiet)

    other = tmp_path / "other"   # the checkpoints of another model size
    shutil.copytree(run, other)
    text = (other / "config.toml").read_text()
    assert "\nn_layers = 4\n" in text
    (other / "config.toml").write_text(text.replace("\nn_layers = 4\n", "\nn_layers = 3\n"))
    with pytest.raises(ValueError, match=r"could not be loaded into the model of .*config.toml: it "
                                          r"holds model tensors this model does not have: layers.3"):
        export_model(str(other), str(out), progress=_quiet)
    (other / "config.toml").write_text(text.replace("\nn_layers = 4\n", "\nn_layers = 5\n"))
    with pytest.raises(ValueError, match=r"could not be loaded into the model of .*config.toml: it "
                                          r"lacks tensors of this model: layers.4"):
        export_model(str(other), str(out), progress=_quiet)

    out.write_bytes(b"keep me")
    with pytest.raises(ValueError, match="exists: remove it or pass --overwrite"):
        export_model(str(run), str(out), progress=_quiet)
    assert out.read_bytes() == b"keep me"
    export_model(str(run), str(out), overwrite=True, progress=_quiet)
    assert sorted(os.listdir(tmp_path)) == ["empty", "m.pt", "other"]   # no temporary file left
    with pytest.raises(ValueError, match="is not a model file"):
        load_exported(str(run / "config.toml"))


def test_a_model_file_that_does_not_add_up_is_refused(run, tmp_path):
    """load_exported names the file: another format version, model_args ModelArgs refuses,
    weights of another shape than its model_args."""
    export_model(str(run), str(tmp_path / "m.pt"), progress=_quiet)
    good = torch.load(tmp_path / "m.pt", weights_only=True)
    bad_weights = dict(good["state_dict"], **{"output.weight": torch.zeros(3, 3)})
    for name, change, message in (
            ("v3", {"version": 3}, "has format version 3; this ep_fp8 reads versions 1 and 2"),
            ("args", {"model_args": dict(good["model_args"], n_heads=3)},
             "its model_args are not valid"),
            ("shape", {"state_dict": bad_weights}, "its weights do not fit its model_args")):
        torch.save(dict(good, **change), tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=rf"model file '.*{name}.pt'.*{message}"):
            load_exported(str(tmp_path / f"{name}.pt"))


def test_an_output_that_appears_during_the_export_is_left_as_it_is(run, tmp_path, monkeypatch):
    """Without --overwrite, a file another process puts at the output while the export
    writes is not replaced: a ValueError says so, and no temporary file is left."""
    out = tmp_path / "m.pt"
    save = torch.save

    def save_while_another_writes(obj, f):
        out.write_bytes(b"another run's")
        save(obj, f)

    monkeypatch.setattr(torch, "save", save_while_another_writes)
    with pytest.raises(ValueError, match="appeared while it was being prepared"):
        export_model(str(run), str(out), progress=_quiet)
    assert out.read_bytes() == b"another run's" and os.listdir(tmp_path) == ["m.pt"]


def test_a_run_whose_checkpoints_lie_elsewhere_and_whose_data_is_gone(run, tmp_path):
    """An absolute [checkpoint] folder is followed; the run's data files need not exist
    any more (the tokenizer is still recorded)."""
    moved = tmp_path / "run"
    moved.mkdir()
    shutil.copytree(run / "checkpoints", tmp_path / "elsewhere")
    text = (run / "config.toml").read_text()
    assert 'folder = "checkpoints"' in text and "train.txt" in text
    text = text.replace('folder = "checkpoints"', f'folder = "{tmp_path / "elsewhere"}"')
    (moved / "config.toml").write_text(text.replace("train.txt", "gone.txt"))
    _, step, path = find_checkpoint(str(moved))
    assert step == 4 and path == str(tmp_path / "elsewhere" / "step-4")
    meta = export_model(str(moved), str(tmp_path / "m.pt"), progress=_quiet)
    assert meta["tokenizer"] == "bytes"


def test_the_tokenizer_is_found_embedded_or_said_to_be_missing(run, tmp_path, word_tokenizer):
    """A tokens run's tokenizer comes from its token files, and a warning (not a silent
    None) when they are gone; a tokenizer.json is embedded with its end-of-document token,
    so the model file decodes after the original is deleted; --tokenizer replaces the run's."""
    from ep_fp8.train.config import read_config
    from ep_fp8.train.export import _tokenizer, exported_tokenizer
    from ep_fp8.train.token_file import write_token_file

    write_token_file(str(run.parent / "train.txt"), "text", "bytes", str(tmp_path / "t.tokens"),
                     progress=_quiet)
    cfg = read_config(None, ["--data.source=tokens", f"--data.path={tmp_path / 't.tokens'}"])
    said = []
    assert _tokenizer(cfg, None, said.append) == {"tokenizer": "bytes"} and said == []
    os.rename(tmp_path / "t.tokens", tmp_path / "moved.tokens")
    assert _tokenizer(cfg, None, said.append) == {"tokenizer": None}
    assert len(said) == 1 and "its tokenizer is unknown: pass --tokenizer" in said[0]
    assert _tokenizer(cfg, "bytes", said.append) == {"tokenizer": "bytes"}

    path = word_tokenizer({"def": 0, "f": 1, "x": 2, "<eos>": 3}, eos_token="<eos>")
    text_cfg = read_config(None, ["--data.source=text", f"--data.tokenizer={path}"])
    entries = _tokenizer(text_cfg, None, said.append)
    assert entries["tokenizer"] == path and entries["tokenizer_eos"] == "<eos>"
    os.unlink(path)
    tok = exported_tokenizer(entries)
    assert (tok.eos_id, tok.encode("def f x"), tok.decode([2, 1])) == (3, [0, 1, 2], "x f")
    said.clear()
    assert _tokenizer(text_cfg, None, said.append) == {"tokenizer": path}
    assert "cannot be read here" in said[0] and "--tokenizer to embed it" in said[0]
    assert exported_tokenizer({"tokenizer": None}) is None


def test_a_failed_or_stopped_write_leaves_no_file(run, tmp_path, monkeypatch, capsys):
    """torch.save failing as on a full disk (a RuntimeError) is a ValueError naming the
    output; a SIGTERM during the write ends the command with 128 + 15; neither leaves the
    output or a temporary file."""
    import signal

    def full_disk(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 458432")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ValueError, match=r"output '.*m.pt' could not be written \(.*unexpected pos"):
        export_model(str(run), str(tmp_path / "m.pt"), progress=_quiet)
    assert os.listdir(tmp_path) == []

    def killed(obj, f):
        f.write(b"partial")
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(torch, "save", killed)
    assert export.main([str(run), "--out", str(tmp_path / "m.pt")]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handler is restored

    from torch.distributed.checkpoint import FileSystemReader

    def read_killed(self, plan, planner):   # most of an export's time is this read
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(FileSystemReader, "read_data", read_killed)
    assert export.main([str(run), "--out", str(tmp_path / "m.pt")]) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_an_ignored_hangup_stays_ignored_and_a_damaged_checkpoint_is_named(run, tmp_path):
    """Under nohup SIGHUP is ignored: the export's signal handling leaves it so. A
    checkpoint without its .metadata is an error naming it, not a traceback."""
    import signal

    from ep_fp8.train.prepare_data import StopOnSignals

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        stop = StopOnSignals()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        stop.restore()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
    shutil.copytree(run, tmp_path / "run")
    os.unlink(tmp_path / "run" / "checkpoints" / "step-4" / ".metadata")
    with pytest.raises(ValueError, match=r"step-4 is damaged: its .metadata cannot be read.*; "
                                         r"--step 2 exports the one before it"):
        export_model(str(tmp_path / "run"), str(tmp_path / "m.pt"), progress=_quiet)
    assert not (tmp_path / "m.pt").exists()
    os.unlink(tmp_path / "run" / "checkpoints" / "step-2" / ".metadata")   # none before it
    with pytest.raises(ValueError, match=r"step-2 is damaged: its .metadata cannot be read[^;]*$"):
        export_model(str(tmp_path / "run"), str(tmp_path / "m.pt"), step=2, progress=_quiet)


def test_a_new_run_starts_from_a_checkpoints_weights_on_another_layout(run, tmp_path):
    """[checkpoint] initial_load: one rank (EP = 1) starts from the EP = 2 run's step 4.
    With lr 1e-30 (below every weight's float32 spacing) and no bias update, its step-1
    checkpoint holds exactly those weights, and its own step count and optimizer start
    anew. Resumed (to step 2) with initial_load naming another checkpoint, it keeps its
    own weights; resumed again (to step 3) with initial_load naming a folder that is gone,
    it still starts. A model of another size is refused, naming the tensors, before the
    run writes its config."""
    source = run / "checkpoints"
    common = ["--parallel.ep=1", "--data.source=text", f"--data.path={run.parent / 'train.txt'}",
              "--model.vocab_size=257", "--optimizer.lr=1e-30", "--router.bias_update_rate=0",
              "--checkpoint.enabled=true", "--checkpoint.interval=1"]
    plan = [{"name": "init", "overrides": common + [
                f"--checkpoint.initial_load={source / 'step-4'}", "--training.steps=1"]},
            {"name": "init", "overrides": common + [
                f"--checkpoint.initial_load={source / 'step-2'}", "--training.steps=2"]},
            {"name": "init", "overrides": common + [
                f"--checkpoint.initial_load={tmp_path / 'gone' / 'step-9'}", "--training.steps=3"]},
            {"name": "misfit", "overrides": ["--parallel.ep=1", "--model.n_layers=3",
                                             f"--checkpoint.initial_load={source / 'step-4'}"]}]
    run_ranks(functools.partial(run_plan, root=str(tmp_path), plan=plan), 1, timeout=300)
    result = json.loads((tmp_path / "init" / "result-rank0.json").read_text())   # the last
    assert "error" not in result and result["step"] == 3, result
    reference = _reference(source / "step-4", tmp_path)
    for step in (1, 2, 3):
        dcp_to_torch_save(tmp_path / "init" / "checkpoints" / f"step-{step}", tmp_path / "new.pt")
        new = torch.load(tmp_path / "new.pt", weights_only=True)
        assert new["model"].keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(new["model"][name], tensor), (step, name)
        assert new["train"]["step"] == step
        steps = {float(v["step"]) for v in new["optimizer"]["state"].values()}
        assert steps == {float(step)}   # AdamW's own count: from this run's start, not 4 + step
    misfit = json.loads((tmp_path / "misfit" / "result-rank0.json").read_text())
    assert "[checkpoint] initial_load:" in misfit["error"]
    assert "model tensors this model does not have: layers.3." in misfit["error"]
    assert "must have the sizes of the one saved there" in misfit["error"]
    assert not (tmp_path / "misfit" / "config.toml").exists()


# ---- generation -------------------------------------------------------------------------

def _tiny(max_seq_len=8):
    args = dataclasses.replace(PRESETS["debug"], dim=16, n_layers=2, vocab_size=32,
                               max_seq_len=max_seq_len)
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(5)
    return model.eval()


def test_greedy_generation_is_the_argmax_chain_over_the_last_max_seq_len_tokens():
    model = _tiny(max_seq_len=8)
    prompt = [3, 1, 4, 1, 5, 9]
    new = generate(model, prompt, 10, temperature=0)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):   # the definition, written out
            context = torch.tensor([seq[-8:]])
            seq.append(int(model(context)[0, -1].argmax()))
    assert new == seq[len(prompt):]
    assert generate(model, prompt, 10, temperature=2.0, top_k=1,
                    generator=torch.Generator().manual_seed(3)) == new   # top-1 is greedy
    assert generate(model, prompt, 0) == []
    stop = new[2]
    assert generate(model, prompt, 10, temperature=0, stop=stop) == new[:new.index(stop) + 1]


def test_sampling_follows_the_softmax_within_the_top_k_and_allowed_ids():
    """Frequencies of 20,000 draws against softmax(logits / T) over the allowed top k,
    within 5 standard errors (about 0.015 at p = 0.5); nothing outside it is ever drawn."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, generator=g, dtype=torch.float64) * 2
    for temperature, top_k, allowed in ((1.0, 0, 12), (0.5, 4, 12), (2.0, 0, 6), (1.0, 3, 6)):
        kept = logits[:allowed]
        order = kept.argsort(descending=True)
        keep = order[:top_k] if top_k else order
        expected = torch.zeros(allowed, dtype=torch.float64)
        expected[keep] = (kept[keep] / temperature).softmax(-1)
        n = 20_000
        draws = torch.tensor([sample_next(logits.float(), temperature, top_k, allowed, g)
                              for _ in range(n)])
        freq = torch.bincount(draws, minlength=allowed).double() / n
        assert freq.numel() == allowed
        assert torch.all(freq[expected == 0] == 0)
        tolerance = 5 * (expected * (1 - expected) / n).sqrt() + 1e-9
        assert torch.all((freq - expected).abs() <= tolerance), (temperature, top_k, freq, expected)
    assert sample_next(logits.float(), 0.0, 0, 12, g) == int(logits.argmax())


def test_the_seed_fixes_the_sample_and_bad_settings_are_refused():
    model = _tiny()
    draw = functools.partial(generate, model, [1, 2], 12, temperature=1.0)
    assert draw(generator=torch.Generator().manual_seed(7)) == \
        draw(generator=torch.Generator().manual_seed(7))
    assert draw(generator=torch.Generator().manual_seed(7)) != \
        draw(generator=torch.Generator().manual_seed(8))
    for kwargs, message in ((dict(prompt=[]), "holds no token"),
                            (dict(prompt=[32]), r"ints in \[0, 32\)"),
                            (dict(temperature=-1.0), "must be >= 0"),
                            (dict(top_k=-1), "must be >= 0"),
                            (dict(max_new_tokens=-1), "must be >= 0")):
        with pytest.raises(ValueError, match=message):
            generate(model, **{"prompt": [1], "max_new_tokens": 2, **kwargs})


def test_the_command_line_prints_each_of_several_samples(run, tmp_path, capsys):
    export_model(str(run), str(tmp_path / "m.pt"), progress=_quiet)
    assert generate_main([str(tmp_path / "m.pt"), "--prompt", "def f(", "--max-new-tokens", "6",
                          "--samples", "3", "--seed", "7", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    model, _ = load_exported(str(tmp_path / "m.pt"))
    prompt = list(b"def f(")
    drawn = generate_samples(model, prompt, 6, 3, temperature=0.8, top_k=50, allowed=257,
                             stop=256, generator=torch.Generator().manual_seed(7))
    assert printed == "".join(
        f"--- sample {i + 1} of 3 ---\n"
        + bytes(prompt + [t for t in new if t < 256]).decode("utf-8", "replace") + "\n"
        for i, new in enumerate(drawn))
    assert len(set(map(tuple, drawn))) > 1
    assert generate_main([str(tmp_path / "m.pt"), "--prompt", "a", "--samples", "0"]) == 2
    assert "--samples must be >= 1, got 0" in capsys.readouterr().err


def test_the_command_line_continues_a_prompt_with_the_runs_tokenizer(run, tmp_path, capsys,
                                                                      word_tokenizer):
    export_model(str(run), str(tmp_path / "m.pt"), progress=_quiet)
    assert generate_main([str(tmp_path / "m.pt"), "--prompt", "def f(", "--max-new-tokens", "5",
                          "--temperature", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("def f(")
    model, _ = load_exported(str(tmp_path / "m.pt"))
    prompt = list(b"def f(")
    new = generate(model, prompt, 5, temperature=0, allowed=257, stop=256)
    assert printed == bytes(prompt + [t for t in new if t < 256]).decode("utf-8", "replace") + "\n"
    assert generate_main([str(tmp_path / "m.pt"), "--prompt-ids", "1,x"]) == 2
    assert "--prompt-ids must be comma-separated ints" in capsys.readouterr().err
    wide = word_tokenizer({"a": 0, "b": 300})   # 301 ids for a model of 257
    assert generate_main([str(tmp_path / "m.pt"), "--prompt", "a b", "--tokenizer", wide]) == 2
    assert "has 301 tokens, the model 257: it is not the run's tokenizer" in capsys.readouterr().err
    for device, message in (("gpu", "--device 'gpu' is not a device: give cpu, cuda, cuda:N or auto"),
                            ("cuda:99", "--device cuda:99: this machine has"),
                            ("meta", "--device meta: give cpu, cuda, cuda:N or auto")):
        assert generate_main([str(tmp_path / "m.pt"), "--prompt-ids", "1", "--device", device]) == 2
        assert message in capsys.readouterr().err
