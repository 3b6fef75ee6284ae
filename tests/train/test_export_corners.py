"""Corners of exporting (ep_fp8.train.export), sampling from the file (ep_fp8.generate's
command line) and writing an output file (ep_fp8.paths), on a run folder built here (a
config.toml and single-process DCP checkpoints of a small model, no training): a relative
run folder and an output under missing folders, the file's entries, the tokenizer
recorded and embedded, files load_exported refuses, the command lines' exit codes and
what they print, and the output file synced, published and cleaned up."""

import errno
import os
import stat
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ep_fp8 import paths
from ep_fp8.generate import generate, main as generate_main
from ep_fp8.model import ModelArgs, Transformer
from ep_fp8.train import export
from ep_fp8.train.checkpoint import MARKER
from ep_fp8.train.config import read_config, resolve_model_args, to_toml
from ep_fp8.train.export import _tokenizer, export_model, exported_tokenizer, load_exported
from tests.train.test_export import _quiet

SMALL = ["--model.dim=16", "--model.n_layers=2", "--model.vocab_size=32", "--model.max_seq_len=16",
         "--checkpoint.enabled=true"]
ENTRIES = {"format", "version", "model_args", "step", "checkpoint", "tokenizer", "config"}


def _fake_run(root, overrides=(), steps=(1, 2), seed=3):
    """A run folder at `root`: its config.toml (SMALL + `overrides`) and a complete
    checkpoint of one model (init_weights(seed), times 4 for sharper logits) for each of
    `steps`; returns the model."""
    cfg = read_config(None, [*SMALL, *overrides])
    root.mkdir(parents=True)
    (root / "config.toml").write_text(to_toml(cfg))
    model = Transformer(resolve_model_args(cfg))
    model.init_weights(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    for step in steps:
        path = root / "checkpoints" / f"step-{step}"
        with warnings.catch_warnings():   # DCP's warning that it runs without a process group
            warnings.simplefilter("ignore")
            dcp.save({"model": model.state_dict()}, checkpoint_id=str(path), no_dist=True)
        (path / MARKER).write_text("{}")
    return model.eval()


def test_a_relative_run_folder_into_missing_folders_gives_the_documented_file(tmp_path,
                                                                              monkeypatch):
    """The run's weights (logits equal, float32, atol 0); `checkpoint` an absolute path
    that is still right after a change of directory; missing output folders made; the
    config's [model] lists every size, so it rebuilds the model without the preset; the
    entries load_exported returns are the documented ones, less the weights."""
    model = _fake_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    meta = export_model("run", os.path.join("out", "sub", "m.pt"), progress=_quiet)
    assert (tmp_path / "out" / "sub" / "m.pt").is_file()
    assert sorted(os.listdir(tmp_path / "out" / "sub")) == ["m.pt"]   # no temporary file
    checkpoint = os.path.realpath(tmp_path / "run" / "checkpoints" / "step-2")
    assert meta["checkpoint"] == checkpoint and meta["step"] == 2 and meta["tokenizer"] is None
    monkeypatch.chdir(tmp_path / "out")
    loaded, entries = load_exported(os.path.join("sub", "m.pt"))
    assert set(entries) == ENTRIES
    assert entries["checkpoint"] == checkpoint and os.path.isdir(entries["checkpoint"])
    config = tmp_path / "config.toml"
    config.write_text(entries["config"])
    assert read_config(str(config)).model.overrides == entries["model_args"]
    assert resolve_model_args(read_config(str(config))) == ModelArgs(**entries["model_args"])
    tokens = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_a_tokenizer_json_is_recorded_by_absolute_path_with_its_own_eos(tmp_path, monkeypatch,
                                                                       word_tokenizer):
    """A jsonl run's tokenizer.json, named relative to the directory of the export: the
    file records its absolute path, embeds it, and keeps an end-of-document token that is
    none of the default names, so the embedded copy still stops at it once the original
    is gone."""
    path = word_tokenizer({"a": 0, "b": 1, "c": 2, "<stop>": 3}, eos_token="<stop>")
    monkeypatch.chdir(os.path.dirname(os.path.dirname(path)))
    relative = os.path.relpath(path)
    cfg = read_config(None, ["--data.source=jsonl", f"--data.tokenizer={relative}"])
    said = []
    entries = _tokenizer(cfg, None, said.append)
    assert said == []
    assert entries["tokenizer"] == os.path.realpath(path) and entries["tokenizer_eos"] == "<stop>"
    os.unlink(path)
    os.unlink(os.path.join(os.path.dirname(path), "tokenizer_config.json"))
    tok = exported_tokenizer(entries)
    assert (tok.eos_id, tok.encode("c a"), tok.decode([1, 3])) == (3, [2, 0], "b <stop>")


@pytest.mark.parametrize("blend", [["gone", "a"], ["a", "gone"]], ids=["first-gone", "later-gone"])
def test_a_blend_with_a_token_file_gone_records_the_tokenizer_of_the_one_left(tmp_path, blend):
    from ep_fp8.train.token_file import write_token_file

    (tmp_path / "a.txt").write_text("some text " * 20)
    write_token_file(str(tmp_path / "a.txt"), "text", "bytes", str(tmp_path / "a.tokens"),
                     progress=_quiet)
    paths = ", ".join(f'"{tmp_path / name}.tokens"' for name in blend)
    cfg = read_config(None, ["--data.source=tokens", f"--data.blend=[{paths}]", "--data.blend_weights=[1, 1]"])
    said = []
    assert _tokenizer(cfg, None, said.append) == {"tokenizer": "bytes"} and said == []


def test_a_checkpoint_folder_under_the_home_directory_is_found(tmp_path, monkeypatch):
    """[checkpoint] folder = "~/ckpts" names the folder in the home directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _fake_run(tmp_path / "run", ["--checkpoint.folder=~/ckpts"])
    (tmp_path / "home").mkdir()
    os.rename(tmp_path / "run" / "checkpoints", tmp_path / "home" / "ckpts")
    meta = export_model(str(tmp_path / "run"), str(tmp_path / "m.pt"), progress=_quiet)
    assert meta["step"] == 2
    expected = tmp_path / "home" / "ckpts" / "step-2"
    assert os.path.realpath(meta["checkpoint"]) == os.path.realpath(expected)


class _Payload:
    """A pickled object of a class: not a plain type, tensor or container."""


def test_load_exported_names_a_missing_file_and_loads_no_pickled_object(tmp_path):
    with pytest.raises(ValueError, match=r"model file '.*none.pt' cannot be read \(No such file"):
        load_exported(str(tmp_path / "none.pt"))
    _fake_run(tmp_path / "run")
    export_model(str(tmp_path / "run"), str(tmp_path / "m.pt"), progress=_quiet)
    good = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save(dict(good, note=_Payload()), tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="is not a model file of python -m ep_fp8.train.export"):
        load_exported(str(tmp_path / "pickled.pt"))
    load_exported(str(tmp_path / "m.pt"))   # the same file without the object loads


def test_the_export_command_exits_2_with_an_error_line(tmp_path, capsys):
    assert export.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run folder ") and "does not exist" in err
    assert os.listdir(tmp_path) == []


# ---- the generate command line ------------------------------------------------------------

WORDS = {"a": 0, "b": 1, "<stop>": 2, "c": 3, "d": 4, "e": 5}


@pytest.fixture
def word_model(tmp_path, word_tokenizer):
    """A model file (vocabulary 32) carrying a tokenizer.json of 6 words, '<stop>' (2) its
    end-of-document token."""
    _fake_run(tmp_path / "run")
    tok = word_tokenizer(WORDS, eos_token="<stop>")
    export_model(str(tmp_path / "run"), str(tmp_path / "m.pt"), tokenizer=tok, progress=_quiet)
    return str(tmp_path / "m.pt")


def _sample(path, prompt_ids, seed, temperature, n=40, **kwargs):
    model, _ = load_exported(path)
    return generate(model, prompt_ids, n, temperature=temperature,
                    generator=torch.Generator().manual_seed(seed), **kwargs)


def test_generate_draws_the_tokenizers_ids_with_the_seed_and_stops_at_its_eos(word_model,
                                                                             capsys):
    """The command's text is the prompt and the draws of generate() with the tokenizer's
    ids only (6 of the model's 32), its end-of-document token as the stop (not printed),
    the temperature and the seed given. Not vacuous: each seed's draws end at the stop
    well before the limit, differ from the other seed's and from those at the default
    temperature (0.8)."""
    args = [word_model, "--prompt", "a b", "--temperature", "1.5", "--top-k", "0",
            "--max-new-tokens", "40", "--device", "cpu"]
    words = {i: w for w, i in WORDS.items()}
    printed = {}
    for seed in (0, 1):
        assert generate_main(args + ["--seed", str(seed)]) == 0
        printed[seed] = capsys.readouterr().out
        new = _sample(word_model, [0, 1], seed, 1.5, allowed=6, stop=2)
        assert 4 <= len(new) < 40 and new[-1] == 2 and set(new) <= set(words)
        assert printed[seed] == " ".join(["a", "b"] + [words[t] for t in new[:-1]]) + "\n"
        assert _sample(word_model, [0, 1], seed, 0.8, allowed=6, stop=2) != new
    assert printed[0] != printed[1]


def test_generate_from_a_file_without_a_tokenizer_prints_the_prompt_ids_and_the_new_ones(
        tmp_path, capsys):
    _fake_run(tmp_path / "run")   # synthetic data: no tokenizer
    export_model(str(tmp_path / "run"), str(tmp_path / "m.pt"), progress=_quiet)
    path = str(tmp_path / "m.pt")
    assert generate_main([path, "--prompt-ids", "5,7,9", "--temperature", "0",
                          "--max-new-tokens", "6", "--device", "cpu"]) == 0
    new = _sample(path, [5, 7, 9], 0, 0, n=6)
    assert len(new) == 6
    assert capsys.readouterr().out == ",".join(map(str, [5, 7, 9] + new)) + "\n"
    assert generate_main([path, "--prompt", "hello", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "records no tokenizer" in err and "give --prompt-ids, or --tokenizer" in err


def test_generate_prints_ids_when_the_files_tokenizer_cannot_be_loaded_here(tmp_path, capsys):
    """A file that names a tokenizer this machine lacks (or embeds one without the
    tokenizers package): --prompt-ids still samples and prints ids, with a note; --prompt,
    which needs it, and an explicit --tokenizer that fails are errors naming what to do."""
    _fake_run(tmp_path / "run")
    export_model(str(tmp_path / "run"), str(tmp_path / "m.pt"), progress=_quiet)
    data = torch.load(tmp_path / "m.pt", weights_only=True)
    torch.save(dict(data, tokenizer="/nonexistent/tokenizer.json"), tmp_path / "gone.pt")
    path = str(tmp_path / "gone.pt")
    assert generate_main([path, "--prompt-ids", "5,7,9", "--temperature", "0",
                          "--max-new-tokens", "4", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ",".join(map(str, [5, 7, 9] + _sample(path, [5, 7, 9], 0, 0, n=4))) + "\n"
    assert "note: tokenizer file '/nonexistent/tokenizer.json' does not exist" in captured.err
    assert "printing token ids" in captured.err
    assert generate_main([path, "--prompt", "hi", "--device", "cpu"]) == 2
    assert "give --tokenizer PATH, or sample token ids with --prompt-ids" in capsys.readouterr().err
    assert generate_main([path, "--prompt-ids", "5", "--tokenizer", "/nope.json",
                          "--device", "cpu"]) == 2
    capsys.readouterr()


def test_an_embedded_tokenizer_without_its_package_is_named_as_such(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tokenizers", None)   # import tokenizers: ImportError
    with pytest.raises(ValueError, match=r"^the model file embeds its tokenizer.json, which needs "
                                         r"the 'tokenizers' package \(pip install tokenizers\)$"):
        exported_tokenizer({"tokenizer": "/gone/tokenizer.json", "tokenizer_json": "{}"})


# ---- writing the output file (ep_fp8.paths) -----------------------------------------------

def _fsync_log(monkeypatch):
    """os.fsync recorded as ('file', size on disk) or ('folder', path) before it runs."""
    log, real = [], os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            log.append(("folder", os.readlink(f"/proc/self/fd/{fd}")))
        else:
            log.append(("file", st.st_size))
        real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return log


def test_the_output_is_synced_with_its_content_then_published_and_its_folder_synced(tmp_path,
                                                                                    monkeypatch):
    log = _fsync_log(monkeypatch)
    target = str(tmp_path / "m.pt")
    with paths.new_file(target, "m.pt", overwrite=False) as f:
        f.write(b"x" * 100)   # less than the write buffer: on disk only once flushed
        assert not os.path.exists(target)
    assert log == [("file", 100), ("folder", os.path.realpath(tmp_path))]
    assert open(target, "rb").read() == b"x" * 100 and os.listdir(tmp_path) == ["m.pt"]


def test_without_hard_links_an_output_that_appeared_is_still_left_as_it_is(tmp_path,
                                                                          monkeypatch):
    """On a file system without hard links (os.link fails with EPERM), a file that
    appeared at the output while it was written is not replaced either."""
    def no_links(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "m.pt"
    with pytest.raises(ValueError, match="appeared while it was being prepared"):
        with paths.new_file(str(target), "m.pt", overwrite=False) as f:
            f.write(b"mine")
            target.write_bytes(b"another run's")
    assert target.read_bytes() == b"another run's" and os.listdir(tmp_path) == ["m.pt"]
    with paths.new_file(str(tmp_path / "n.pt"), "n.pt", overwrite=False) as f:   # none there
        f.write(b"mine")
    assert (tmp_path / "n.pt").read_bytes() == b"mine"
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "n.pt"]


def test_an_output_name_with_a_nul_or_too_long_is_named_before_the_export(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    assert paths.output_path_problem(str(tmp_path / ("n" * limit))) == ""
    assert paths.output_path_problem(str(tmp_path / ("n" * (limit + 1)))).startswith(
        "cannot be made: the name 'nnnn")
    assert f"longer than the {limit} bytes" in paths.output_path_problem(
        str(tmp_path / "sub" / ("n" * (limit + 1)) / "m.pt"))
    assert paths.output_path_problem(str(tmp_path / "a\0b.pt")) == \
        "cannot be made: it holds a NUL character"
    with pytest.raises(ValueError, match="output .* cannot be made: it holds a NUL character"):
        export_model(str(tmp_path / "nowhere"), str(tmp_path / "a\0b.pt"), progress=_quiet)


def test_a_symbolic_link_as_output_writes_its_target(tmp_path):
    """As for a token file: a link (dangling until written) is followed, the link stays a
    link, and --overwrite replaces its target's content, not the link."""
    _fake_run(tmp_path / "run")
    (tmp_path / "store").mkdir()
    link = tmp_path / "m.pt"
    link.symlink_to(tmp_path / "store" / "real.pt")
    export_model(str(tmp_path / "run"), str(link), progress=_quiet)
    assert link.is_symlink() and load_exported(str(link))[1]["step"] == 2
    export_model(str(tmp_path / "run"), str(link), step=1, overwrite=True, progress=_quiet)
    assert link.is_symlink() and load_exported(str(tmp_path / "store" / "real.pt"))[1]["step"] == 1
    assert sorted(os.listdir(tmp_path / "store")) == ["real.pt"]
