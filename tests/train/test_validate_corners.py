"""Corners of the start-up checks (ep_fp8.train.validate) and of the config reader
(ep_fp8.train.config): the copy check's threshold on both sides of a tenth, token files
copied or prepared with another end-of-document token in a blend, held-out token files
against every corpus of a blend, initial_load when the run will not resume, backend =
"cuda" with float8 off, the earlier-runs folder as a checkpoint folder, and overrides
without a section."""

import re
import shutil

import pytest
import torch

from ep_fp8.train.config import ConfigError, load_config
from ep_fp8.train.token_file import write_token_file
from tests.train.test_data_blend import _config as _text_config
from tests.train.test_data_corners import _random_text
from tests.train.test_token_file import _quiet


def _held_out_with_copies(tmp_path, copied, own):
    """A training file, and a held-out folder with a copy of `copied` of its bytes (as a
    copy of one training file) next to `own` bytes of other text."""
    g = torch.Generator().manual_seed(7)
    for folder in ("train", "held"):
        (tmp_path / folder).mkdir(exist_ok=True)
    (tmp_path / "train" / "big.txt").write_text(_random_text(g, 9000))
    (tmp_path / "train" / "small.txt").write_text(_random_text(g, copied))
    shutil.copy(tmp_path / "train" / "small.txt", tmp_path / "held" / "copy.txt")
    (tmp_path / "held" / "own.txt").write_text(_random_text(g, own))
    return str(tmp_path / "train" / "*.txt"), str(tmp_path / "held" / "*.txt")


@pytest.mark.parametrize("copied, own, refused", [
    (1000, 9000, True),     # exactly a tenth: refused
    (1000, 9001, False),    # just under a tenth: a few shared files pass
    (2000, 8000, True),     # a fifth
])
def test_held_out_copies_are_refused_from_a_tenth_of_the_bytes(tmp_path, copied, own, refused):
    train, held = _held_out_with_copies(tmp_path, copied, own)
    overrides = [f"--data.path={train}", "--validation.enabled=true", f"--validation.path={held}"]
    if not refused:
        _text_config(tmp_path, *overrides)
        return
    share = round(100 * copied / (copied + own))
    with pytest.raises(ConfigError, match=re.escape(
            f"[validation] path {held!r}: 1 file(s), {share}% of its bytes, are copies of files "
            f"of [data] path {train!r}")):
        _text_config(tmp_path, *overrides)


@pytest.mark.parametrize("copied, own, refused", [
    (1000, 9000, True), (1000, 9001, False), (2000, 8000, True)])
def test_a_blend_corpus_of_copies_is_refused_from_a_tenth_of_its_bytes(tmp_path, copied, own,
                                                                       refused):
    train, held = _held_out_with_copies(tmp_path, copied, own)   # held: the second corpus
    overrides = [f'--data.blend=["{train}", "{held}"]', "--data.blend_weights=[1, 1]"]
    if not refused:
        _text_config(tmp_path, *overrides)
        return
    share = round(100 * copied / (copied + own))
    with pytest.raises(ConfigError, match=re.escape(
            f"[data] blend[1] {held!r} holds copies of files of [data] blend[0] {train!r} (") +
            f".*copy.txt' of .*small.txt'; 1 file\\(s\\), {share}% of its bytes\\)"):
        _text_config(tmp_path, *overrides)


def test_a_token_file_copied_into_another_corpus_is_refused_however_small_its_share(tmp_path):
    """Text copies pass below a tenth of a corpus's bytes; a token file with another
    corpus's documents' hash does not, even beside many other tokens."""
    (tmp_path / "a.txt").write_text(_random_text(torch.Generator().manual_seed(1), 400))
    (tmp_path / "b").mkdir()
    (tmp_path / "big.txt").write_text(_random_text(torch.Generator().manual_seed(2), 60000))
    a, big = str(tmp_path / "a.tokens"), str(tmp_path / "b" / "big.tokens")
    write_token_file(str(tmp_path / "a.txt"), "text", "bytes", a, progress=_quiet)
    write_token_file(str(tmp_path / "big.txt"), "text", "bytes", big, progress=_quiet)
    shutil.copy(a, tmp_path / "b" / "a_copy.tokens")   # under 10% of corpus b's bytes
    b = str(tmp_path / "b" / "*.tokens")
    with pytest.raises(ConfigError, match=re.escape(
            f"[data] blend[1] {b!r} holds copies of files of [data] blend[0] {a!r} "
            f"({str(tmp_path / 'b' / 'a_copy.tokens')!r} of {a!r}): a document may be in one "
            f"corpus of a blend only")):
        _text_config(tmp_path, "--data.source=tokens", f'--data.blend=["{a}", "{b}"]',
                     "--data.blend_weights=[1, 1]")


def test_a_copy_across_corpora_names_the_first_file_it_copies(tmp_path):
    """Two equal files in one corpus are no error; a copy of them in another corpus is
    named against the first of them."""
    train, held = _held_out_with_copies(tmp_path, 1000, 1000)
    shutil.copy(tmp_path / "train" / "small.txt", tmp_path / "train" / "small_twin.txt")
    with pytest.raises(ConfigError, match=re.escape(
            f"({str(tmp_path / 'held' / 'copy.txt')!r} of {str(tmp_path / 'train' / 'small.txt')!r}; "
            "1 file(s), 50% of its bytes)")):
        _text_config(tmp_path, f'--data.blend=["{train}", "{held}"]', "--data.blend_weights=[1, 1]")


def test_a_cuda_backend_with_float8_off_is_not_checked_against_the_gpu(monkeypatch):
    """backend = "cuda" with float8 disabled runs no float8 GEMM: sizes the GPU kernel cannot
    take are no error then, and are one once float8 is enabled."""
    from ep_fp8.ops import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backends, "_has_scaled_grouped_mm", lambda device_type, index: True)
    odd = ["--float8.backend=cuda", "--model.expert_hidden_dim=40", "--training.device=cuda"]
    load_config(None, odd + ["--float8.enabled=false"], run_folder=False)
    with pytest.raises(ConfigError, match="multiples of 16"):
        load_config(None, odd + ["--float8.enabled=true"], run_folder=False)


def test_initial_load_is_checked_for_a_run_that_will_not_resume_its_own_checkpoints(tmp_path):
    """With resume = false the run starts from initial_load even when its own folder holds
    checkpoints, so a missing initial_load is an error there too (checked also for a tool
    that skips the run folder's checks); resuming, it is not read."""
    from ep_fp8.train.checkpoint import MARKER

    (tmp_path / "run" / "checkpoints" / "step-3").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-3" / MARKER).write_text("{}")
    gone = tmp_path / "gone" / "step-9"
    run = [f"--job.output_dir={tmp_path}", "--checkpoint.enabled=true",
           f"--checkpoint.initial_load={gone}"]
    load_config(None, run)
    with pytest.raises(ConfigError, match=re.escape(f"[checkpoint] initial_load '{gone}' is not a folder")):
        load_config(None, run + ["--checkpoint.resume=false"], run_folder=False)


@pytest.mark.parametrize("arg", ["--steps=3", "--training=3", "--training-steps=3"])
def test_an_override_without_a_section_is_an_error_naming_it(arg):
    with pytest.raises(ConfigError, match=re.escape(f"command line: {arg!r} is not of the form "
                                                    "--section.key=value")):
        load_config(None, [arg])


def test_blended_token_files_with_another_end_of_document_token_are_refused(tmp_path, word_tokenizer):
    """Two corpora of token files with as many tokens but another end-of-document id (here
    none) cannot be one stream of ids."""
    (tmp_path / "a.txt").write_text("a b " * 40)
    (tmp_path / "b.txt").write_text("b a " * 40)
    with_eos, without = str(tmp_path / "with.tokens"), str(tmp_path / "without.tokens")
    write_token_file(str(tmp_path / "a.txt"), "text", word_tokenizer({"a": 0, "b": 1, "<|endoftext|>": 2}),
                     with_eos, progress=_quiet)
    write_token_file(str(tmp_path / "b.txt"), "text", word_tokenizer({"a": 0, "b": 1, "c": 2}),
                     without, progress=_quiet)
    with pytest.raises(ConfigError, match=re.escape(
            f"[data] blend[1] {without!r}: token file(s) {without!r} (tokenizer ") +
            r".* has 3 tokens and end of document None, \[data\] blend\[0\] .* 3 and 2: prepare"):
        _text_config(tmp_path, "--data.source=tokens", f'--data.blend=["{with_eos}", "{without}"]',
                     "--data.blend_weights=[1, 1]")


def test_held_out_token_files_are_checked_against_every_corpus_of_a_token_blend(tmp_path):
    """A held-out token file with the documents of the second corpus of a blend (a copy of
    its file under another name) is refused, as one of the first corpus is."""
    g = torch.Generator().manual_seed(3)
    outs = []
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(_random_text(g, 300))
        outs.append(str(tmp_path / f"{name}.tokens"))
        write_token_file(str(tmp_path / f"{name}.txt"), "text", "bytes", outs[-1], progress=_quiet)
    blend = ["--data.source=tokens", f'--data.blend=["{outs[0]}", "{outs[1]}"]',
             "--data.blend_weights=[1, 1]", "--validation.enabled=true"]
    _text_config(tmp_path, *blend, f"--validation.path={outs[2]}")
    for i in (0, 1):
        held = str(tmp_path / f"held{i}.tokens")
        shutil.copy(outs[i], held)
        with pytest.raises(ConfigError, match=re.escape(
                f"[validation] token file(s) {held!r} hold the same documents as a file of "
                f"[data] blend {outs[:2]!r}")):
            _text_config(tmp_path, *blend, f"--validation.path={held}")


@pytest.mark.parametrize("folder", ["earlier-runs", "./earlier-runs/", "tb/../earlier-runs"])
def test_the_folder_earlier_runs_are_kept_in_is_no_checkpoint_folder(tmp_path, folder):
    """A fresh run moves an earlier run's files into earlier-runs/: checkpoints there would
    mix with them."""
    with pytest.raises(ConfigError, match=re.escape(
            f"[checkpoint] folder {folder!r} is the run's own 'earlier-runs': choose another name")):
        load_config(None, [f"--job.output_dir={tmp_path}", "--checkpoint.enabled=true",
                           f"--checkpoint.folder={folder}"])
    assert list(tmp_path.iterdir()) == []


def test_a_config_path_the_system_cannot_open_is_a_config_error(tmp_path, capsys):
    """A file on the path in place of a folder, or a name too long, is the same error as a
    folder or an unreadable file (exit code 2), not a traceback; a missing file stays a
    FileNotFoundError."""
    from ep_fp8.train.main import main

    (tmp_path / "a.toml").write_text("[training]\nsteps = 3\n")
    for path, reason in ((tmp_path / "a.toml" / "b.toml", "Not a directory"),
                         (tmp_path / ("n" * 300 + ".toml"), "File name too long")):
        with pytest.raises(ConfigError, match=re.escape(f"{path}: cannot read the config file: {reason}")):
            load_config(str(path))
        assert main(["--check", "--config", str(path)]) == 2
        assert f"cannot read the config file: {reason}" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "missing.toml"))


@pytest.mark.parametrize("folder, own", [("config.toml/ck", "config.toml"), ("metrics.jsonl/ck", "metrics.jsonl"),
                                         (".lock/ck", ".lock"), ("./tb/ck/", "tb"),
                                         ("earlier-runs/x/ck", "earlier-runs")])
def test_a_checkpoint_folder_inside_one_of_the_runs_own_files_is_an_error(tmp_path, folder, own):
    """The run writes config.toml, metrics.jsonl and .lock as files before its first
    checkpoint, so a checkpoint folder inside one could never be made; and a fresh run
    moves tb/ aside. A name that merely starts like one of them is fine."""
    run = [f"--job.output_dir={tmp_path}", "--checkpoint.enabled=true"]
    with pytest.raises(ConfigError, match=re.escape(
            f"[checkpoint] folder {folder!r} is inside the run's own {own!r}: choose another name")):
        load_config(None, run + [f"--checkpoint.folder={folder}"])
    assert list(tmp_path.iterdir()) == []
    load_config(None, run + [f"--checkpoint.folder={own}-ck/x"])
