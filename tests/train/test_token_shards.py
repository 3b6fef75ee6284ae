"""Sharded token files (prepare_data --shards): the shards of a corpus read through a glob
give the tokens and samples of one file prepared from all of it, a glob that misses or
repeats a shard is refused, a complete shard is kept on a second run, and the command
line writes every shard on worker processes, stopping them all on a failure or a signal."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from ep_fp8.train import prepare_data
from ep_fp8.train.config import ConfigError
from ep_fp8.train.data import PreparedTokenSource, list_files
from ep_fp8.train.token_file import (HEADER_BYTES, inputs_id, read_header, read_token_files, shard_glob,
                                     shard_path, split_files, write_token_file)
from tests.train.test_token_file import _config, _corpus, _quiet
from tests._paths import ROOT


def _shards(pattern, out, n, **kwargs):
    return [write_token_file(pattern, "text", "bytes", out, progress=_quiet, shard=(i, n), **kwargs)
            for i in range(n)]


def test_split_files_cuts_sorted_files_into_contiguous_runs_of_about_equal_bytes(tmp_path):
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        folder = tmp_path / str(trial)
        folder.mkdir()
        count = int(torch.randint(1, 30, (1,), generator=g))
        for i in range(count):   # sizes spread over three orders of magnitude, some empty
            size = int(torch.randint(0, 3, (1,), generator=g)) and int(10 ** (1 + 3 * torch.rand(1, generator=g)))
            (folder / f"{i:03d}.txt").write_bytes(b"x" * size)
        files = list_files(str(folder / "*.txt"))
        sizes = {p: os.path.getsize(p) for p in files}
        for n in {1, 2, count // 2 or 1, count}:
            runs = split_files(files, n)
            assert len(runs) == n and all(runs) and sum(runs, []) == files   # order kept, none lost
            biggest, total = max(sizes.values()), sum(sizes.values())
            for run in runs:   # no run holds more than its share plus one file
                assert sum(sizes[p] for p in run) <= total / n + biggest, (trial, n)
        with pytest.raises(ValueError, match=f"--shards {count + 1}: must be in \\[1, {count}\\]"):
            split_files(files, count + 1)


def test_shards_read_through_a_glob_are_the_one_file_of_the_whole_corpus(tmp_path):
    pattern = _corpus(tmp_path / "docs", n=7, size=200)   # and an empty file: 8 files
    whole = str(tmp_path / "whole.tokens")
    write_token_file(pattern, "text", "bytes", whole, progress=_quiet)
    out = str(tmp_path / "sh" / "train.tokens")
    headers = _shards(pattern, out, 5)
    names = sorted(os.listdir(tmp_path / "sh"))
    assert names == [f"train-{i:05d}-of-00005.tokens" for i in range(5)]
    assert [h["shard"] for h in headers] == list(range(5)) and {h["shards"] for h in headers} == {5}
    assert len({h["corpus"] for h in headers}) == 1
    assert sum(h["files"] for h in headers) == 8
    assert sum(h["documents"] for h in headers) == read_header(whole)["documents"] == 7
    one = PreparedTokenSource(whole, seq_len=16, seed=5)
    sharded = PreparedTokenSource(shard_glob(out, 5), seq_len=16, seed=5)
    assert len(sharded.parts) == 5 and torch.equal(sharded.tokens, one.tokens)
    assert sharded.n_windows == one.n_windows
    n = one.n_windows   # every window, many of them across two shards, for two epochs
    assert torch.equal(sharded.get(list(range(2 * n))), one.get(list(range(2 * n))))
    assert sharded.fingerprint != one.fingerprint   # other files, so another name for the stream
    assert sharded.fingerprint == PreparedTokenSource(shard_glob(out, 5), 16, 5).fingerprint


def test_an_empty_shard_is_written_and_a_window_reads_across_it(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("abcdefghij" * 3)
    (docs / "b.txt").write_text("")
    (docs / "c.txt").write_text("klmnopqrst" * 3)
    headers = _shards(str(docs / "*.txt"), str(tmp_path / "t.tokens"), 3)
    assert [h["tokens"] for h in headers] == [31, 0, 31]   # 30 bytes and an end token
    source = PreparedTokenSource(str(tmp_path / "t-*.tokens"), seq_len=20, seed=0)
    expected = torch.tensor([*b"abcdefghij" * 3, 256, *b"klmnopqrst" * 3, 256])
    assert torch.equal(source.tokens.long(), expected)
    for w in range(source.n_windows):   # window 1 starts in shard 0 and ends in shard 2
        assert torch.equal(source._span(20 * w, 20 * w + 21).long(), expected[20 * w: 20 * w + 21])


def test_a_glob_missing_or_repeating_a_shard_or_mixing_tokenizers_is_refused(
        tmp_path, word_tokenizer):
    pattern = _corpus(tmp_path / "docs")
    out = str(tmp_path / "t.tokens")
    _shards(pattern, out, 4)
    os.rename(shard_path(out, 2, 4), tmp_path / "aside")
    with pytest.raises(ValueError, match=r"1 of the 4 shards of corpus \w+ .* are missing: shard\(s\) 2\. "):
        PreparedTokenSource(str(tmp_path / "t-*.tokens"), 8, 0)
    with pytest.raises(ConfigError, match=r"\[data\] token files of .* are missing: shard\(s\) 2"):
        _config(tmp_path, "--data.source=tokens", f"--data.path={tmp_path / 't-*.tokens'}")
    os.rename(tmp_path / "aside", shard_path(out, 2, 4))
    (tmp_path / "t-copy.tokens").write_bytes(open(shard_path(out, 1, 4), "rb").read())
    with pytest.raises(ValueError, match="are both shard 1 of 4 of one corpus: keep one"):
        read_token_files(str(tmp_path / "t-*.tokens"))
    os.unlink(tmp_path / "t-copy.tokens")
    (tmp_path / "words.txt").write_text("a b " * 50)
    write_token_file(str(tmp_path / "words.txt"), "text", word_tokenizer({"a": 0, "b": 1}),
                     str(tmp_path / "t-words.tokens"), progress=_quiet)
    with pytest.raises(ValueError, match="were prepared with different tokenizers"):
        read_token_files(str(tmp_path / "t-*.tokens"))
    os.unlink(tmp_path / "t-words.tokens")
    cfg = _config(tmp_path, "--data.source=tokens", f"--data.path={tmp_path / 't-*.tokens'}")
    assert cfg.data.path.endswith("t-*.tokens")   # whole again: accepted


def test_a_corpus_cut_another_way_is_another_corpus(tmp_path):
    """Shards of two preparations (other shard counts, or files changed between them) do not
    complete each other."""
    pattern = _corpus(tmp_path / "docs")
    out = str(tmp_path / "t.tokens")
    three = _shards(pattern, out, 3)
    assert three[0]["corpus"] != _shards(pattern, str(tmp_path / "u.tokens"), 2)[0]["corpus"]
    with open(tmp_path / "docs" / "5.txt", "a") as f:
        f.write("more")
    write_token_file(pattern, "text", "bytes", out, progress=_quiet, shard=(1, 3), overwrite=True)
    with pytest.raises(ValueError, match=r"of the 3 shards of corpus \w+ .* are missing: shard\(s\) (1|0, 2)\. "
                                         r"The glob holds shards of 2 preparations"):
        read_token_files(str(tmp_path / "t-*.tokens"))


def test_a_held_out_shard_with_the_documents_of_a_training_shard_is_a_config_error(tmp_path):
    import shutil

    pattern = _corpus(tmp_path / "docs", n=4)
    _shards(pattern, str(tmp_path / "train.tokens"), 2)
    (tmp_path / "held").mkdir()   # shard 0's documents, copied and prepared on their own
    for path in split_files(list_files(pattern), 2)[0]:
        shutil.copy(path, tmp_path / "held")
    held = str(tmp_path / "held.tokens")
    write_token_file(str(tmp_path / "held" / "*"), "text", "bytes", held, progress=_quiet)
    with pytest.raises(ConfigError, match=r"hold the same documents as a file of \[data\] path"):
        _config(tmp_path, "--data.source=tokens", f"--data.path={tmp_path / 'train-*.tokens'}",
                "--validation.enabled=true", f"--validation.path={held}")
    os.unlink(held)   # other documents: accepted
    write_token_file(str(tmp_path / "held" / "0.txt"), "text", "bytes", held, progress=_quiet)
    _config(tmp_path, "--data.source=tokens", f"--data.path={tmp_path / 'train-*.tokens'}",
            "--validation.enabled=true", f"--validation.path={held}")


def test_one_corpus_prepared_twice_is_refused_in_one_glob_and_across_a_blend(tmp_path):
    """A whole file and the shards of the same inputs (the getting-started flow with one
    --out), or two shard counts, or a copy of a token file: read together they would hold
    every document twice; so would a blend of two such cuts."""
    import shutil

    pattern = _corpus(tmp_path / "docs", n=4)
    whole = str(tmp_path / "t.tokens")
    write_token_file(pattern, "text", "bytes", whole, progress=_quiet)
    _shards(pattern, whole, 2)
    assert len(read_token_files(str(tmp_path / "t-*.tokens"))[0]) == 2   # the shards alone: fine
    with pytest.raises(ValueError, match=r"were prepared from the same input files \(as one file "
                                         r"and as shards, or in other shard counts\): the stream "
                                         r"would hold every document twice"):
        read_token_files(str(tmp_path / "t*.tokens"))
    with pytest.raises(ConfigError, match=r"\[data\] blend\[1\] '.*-of-00002.tokens' and \[data\] "
                                          r"blend\[0\] '.*t.tokens' were prepared from the same "
                                          r"input files"):
        _config(tmp_path, "--data.source=tokens",
                f'--data.blend=["{whole}", "{tmp_path / "t-*-of-00002.tokens"}"]',
                "--data.blend_weights=[1, 1]")
    (tmp_path / "copy").mkdir()
    shutil.copy(whole, tmp_path / "copy" / "a.tokens")
    shutil.copy(whole, tmp_path / "copy" / "b.tokens")
    with pytest.raises(ValueError, match="prepared from the same input files"):
        read_token_files(str(tmp_path / "copy" / "*.tokens"))


def test_the_command_line_expands_a_tilde_in_out(tmp_path, capfd, monkeypatch):
    """--out=~/... (the shell leaves that ~ alone): every shard is written under the home
    folder, and the run ends with its summary, not a failure to read them back."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("HOME", str(tmp_path))
    pattern = _corpus(tmp_path / "docs")
    assert prepare_data.main(["--source", "text", "--path", pattern, "--out=~/o/t.tokens",
                              "--shards", "2", "--workers", "1"]) == 0
    assert "all 2 shards complete" in capfd.readouterr().out
    assert sorted(os.listdir(tmp_path / "o")) == [f"t-{i:05d}-of-00002.tokens" for i in range(2)]


def test_a_complete_shard_is_kept_and_anything_else_there_is_refused(tmp_path):
    pattern = _corpus(tmp_path / "docs")
    out = str(tmp_path / "t.tokens")
    header = write_token_file(pattern, "text", "bytes", out, progress=_quiet, shard=(1, 3))
    before = os.stat(shard_path(out, 1, 3))
    lines = []
    again = write_token_file(pattern, "text", "bytes", out, progress=lines.append, shard=(1, 3))
    after = os.stat(shard_path(out, 1, 3))
    assert again == header and (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert lines == [f"[prepare shard 1/3] {shard_path(out, 1, 3)} is already complete "
                     f"({header['tokens']:,} tokens), kept"]
    # Another shard under that name (shard 1 renamed as shard 2): not kept, not overwritten.
    os.replace(shard_path(out, 1, 3), shard_path(out, 2, 3))
    with pytest.raises(ValueError, match="exists: remove it or pass --overwrite"):
        write_token_file(pattern, "text", "bytes", out, progress=_quiet, shard=(2, 3))
    # A cut-short file under the shard's name: refused too, rewritten with overwrite.
    raw = open(shard_path(out, 2, 3), "rb").read()
    with open(shard_path(out, 1, 3), "wb") as f:
        f.write(raw[:-2])
    with pytest.raises(ValueError, match="exists"):
        write_token_file(pattern, "text", "bytes", out, progress=_quiet, shard=(1, 3))
    assert write_token_file(pattern, "text", "bytes", out, progress=_quiet, shard=(1, 3),
                            overwrite=True) == header


def test_a_shard_header_that_does_not_add_up_is_refused(tmp_path):
    out = str(tmp_path / "t.tokens")
    write_token_file(_corpus(tmp_path / "docs"), "text", "bytes", out, progress=_quiet, shard=(0, 2))
    raw = open(shard_path(out, 0, 2), "rb").read()
    header = json.loads(raw[8:HEADER_BYTES].decode())
    for change in ({"shard": 2}, {"shard": -1}, {"shards": "2"}, {"corpus": None}, {"shard": True}):
        text = json.dumps({**header, **change}).encode()
        (tmp_path / "bad.tokens").write_bytes((b"EPFP8TOK" + text).ljust(HEADER_BYTES, b" ")
                                              + raw[HEADER_BYTES:])
        with pytest.raises(ValueError, match="header keys shard .* are not an index below a count"):
            read_header(str(tmp_path / "bad.tokens"))


def test_the_command_line_writes_all_shards_on_workers(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pattern = _corpus(tmp_path / "docs")
    out = str(tmp_path / "t.tokens")
    assert prepare_data.main(["--source", "text", "--path", pattern, "--out", out, "--shards", "2",
                              "--workers", "2"]) == 0
    stdout = capfd.readouterr().out
    assert "[prepare] 2 shards of" in stdout and "0 already complete, 2 to write on 2 worker(s)" in stdout
    for i in range(2):
        assert f"[prepare shard {i}/2] wrote {shard_path(out, i, 2)}: " in stdout
    tokens = sum(read_header(shard_path(out, i, 2))["tokens"] for i in range(2))
    assert stdout.rstrip().endswith(f"all 2 shards complete: {tokens:,} tokens, 6 documents; "
                                    f"train on path = {shard_glob(out, 2)!r}")
    assert sorted(os.listdir(tmp_path)) == ["docs"] + [f"t-{i:05d}-of-00002.tokens" for i in range(2)]
    write_token_file(pattern, "text", "bytes", str(tmp_path / "whole.tokens"), progress=_quiet)
    assert torch.equal(PreparedTokenSource(shard_glob(out, 2), 16, 0).tokens,
                       PreparedTokenSource(str(tmp_path / "whole.tokens"), 16, 0).tokens)


def test_a_failing_shard_stops_the_command_line_and_leaves_the_complete_ones(tmp_path, capfd,
                                                                            monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "0.jsonl").write_text(json.dumps({"text": "x" * 100}) + "\n")
    (docs / "1.jsonl").write_text("not json\n")   # shard 1 of 3 fails; shard 2 never starts
    (docs / "2.jsonl").write_text(json.dumps({"text": "y" * 100}) + "\n")
    out = str(tmp_path / "t.tokens")
    code = prepare_data.main(["--source", "jsonl", "--path", str(docs / "*.jsonl"), "--out", out,
                              "--shards", "3", "--workers", "1"])
    stderr = capfd.readouterr().err
    assert code == 2
    assert "1.jsonl:1: not valid JSON" in stderr and "shard 1 of 3 failed" in stderr
    assert ("1 of 3 shards complete; the same command run again keeps the complete shards"
            in stderr)
    assert sorted(os.listdir(tmp_path)) == ["docs", "t-00000-of-00003.tokens"]   # no temporary file


def test_the_command_line_checks_its_shard_arguments(tmp_path, capsys):
    pattern = _corpus(tmp_path / "docs")   # 7 files
    for args, message in ((["--shards", "0"], "--shards must be at least 1"),
                          (["--shards", "3", "--shard", "3"], "--shard must be in [0, --shards 3)"),
                          (["--shards", "3", "--workers", "0"], "--workers must be at least 1")):
        with pytest.raises(SystemExit):
            prepare_data.main(["--source", "text", "--path", pattern, "--out", "t", *args])
        assert message in capsys.readouterr().err
    code = prepare_data.main(["--source", "text", "--path", pattern, "--out",
                              str(tmp_path / "t.tokens"), "--shards", "8"])
    assert code == 2 and "--shards 8: must be in [1, 7]" in capsys.readouterr().err
    assert prepare_data.main(["--source", "text", "--path", pattern, "--out",
                              str(tmp_path / "t.tokens"), "--shards", "3", "--shard", "2"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["docs", "t-00002-of-00003.tokens"]


def test_sigterm_stops_every_running_shard_once_and_reports(tmp_path, capsys, monkeypatch):
    started, popen = [], subprocess.Popen

    def slow_child(command, env):   # stands in for a shard: sleeps until stopped
        assert command[-2] == "--shard" and env["RAYON_NUM_THREADS"] and env["OMP_NUM_THREADS"]
        child = popen([sys.executable, "-c", "import time; time.sleep(60)"])
        started.append(child)
        return child

    monkeypatch.setattr(prepare_data.subprocess, "Popen", slow_child)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    handler = signal.getsignal(signal.SIGTERM)
    code = prepare_data.main(["--source", "text", "--path", _corpus(tmp_path / "docs"), "--out",
                              str(tmp_path / "t.tokens"), "--shards", "5", "--workers", "2"])
    timer.join()
    assert code == 128 + signal.SIGTERM
    assert len(started) == 2 and all(c.returncode == -signal.SIGTERM for c in started)
    assert "stopped by SIGTERM; 0 of 5 shards complete" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is handler


def test_shard_names_sort_in_shard_order_past_five_digits():
    names = [shard_path("d/t.tokens", i, 123456) for i in (0, 9, 10, 99999, 100000, 123455)]
    assert names[0] == "d/t-000000-of-123456.tokens" and sorted(names) == names
    assert shard_glob("d/t.tokens", 123456) == "d/t-*-of-123456.tokens"
    assert shard_path("t", 3, 16) == "t-00003-of-00016"


def test_each_cut_is_the_file_boundary_nearest_its_share_of_the_bytes(tmp_path):
    for name, size in (("a", 25), ("b", 25), ("c", 25), ("d", 25), ("e", 1)):
        (tmp_path / name).write_bytes(b"x" * size)
    files = list_files(str(tmp_path / "*"))
    assert [len(run) for run in split_files(files, 2)] == [2, 3]   # 50 | 51, not 75 | 26
    assert [len(run) for run in split_files(files, 4)] == [1, 1, 1, 2]


def test_a_rerun_with_another_tokenizer_keeps_no_shard(tmp_path, word_tokenizer):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(2):
        (docs / f"{i}.txt").write_text("a b " * (50 + i))
    pattern, out = str(docs / "*.txt"), str(tmp_path / "t.tokens")
    write_token_file(pattern, "text", "bytes", out, progress=_quiet, shard=(0, 2))
    # Another tokenizer with the bytes tokenizer's vocabulary size and end-of-document id.
    words = word_tokenizer({"a": 97, "b": 98, "<|endoftext|>": 256})
    with pytest.raises(ValueError, match="exists: remove it or pass --overwrite"):
        write_token_file(pattern, "text", words, out, progress=_quiet, shard=(0, 2))
    write_token_file(pattern, "text", words, out, progress=_quiet, shard=(1, 2))
    assert [read_header(shard_path(out, i, 2))["vocab_size"] for i in range(2)] == [257, 257]
    with pytest.raises(ValueError, match="shards of corpus .* The glob holds shards of 2 preparations"):
        read_token_files(str(tmp_path / "t-*.tokens"))


def test_shards_are_refused_where_the_input_glob_would_read_them(tmp_path, capsys):
    pattern = _corpus(tmp_path / "docs")
    inside = str(tmp_path / "docs" / "t.txt")   # t-00000-of-00002.txt matches docs/*.txt
    with pytest.raises(ValueError, match="would match --path .*: shards written first would be read"):
        write_token_file(pattern, "text", "bytes", inside, progress=_quiet, shard=(0, 2))
    code = prepare_data.main(["--source", "text", "--path", pattern, "--out", inside, "--shards", "2"])
    assert code == 2 and "would match --path" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "docs")) == [f"{i}.txt" for i in range(6)] + ["empty.txt"]


def test_every_output_is_checked_before_any_shard_is_written(tmp_path, capsys, monkeypatch):
    def no_child(*args, **kwargs):
        raise AssertionError("a shard was started")

    monkeypatch.setattr(prepare_data.subprocess, "Popen", no_child)
    pattern = _corpus(tmp_path / "docs")
    out = str(tmp_path / "t.tokens")
    (tmp_path / "t-00002-of-00003.tokens").write_text("left from something else")
    code = prepare_data.main(["--source", "text", "--path", pattern, "--out", out, "--shards", "3"])
    assert code == 2 and "t-00002-of-00003.tokens' exists" in capsys.readouterr().err
    os.unlink(tmp_path / "t-00002-of-00003.tokens")
    for i in range(3):   # all complete already: nothing to start, and the totals reported
        write_token_file(pattern, "text", "bytes", out, progress=_quiet, shard=(i, 3))
    assert prepare_data.main(["--source", "text", "--path", pattern, "--out", out, "--shards", "3"]) == 0
    stdout = capsys.readouterr().out
    assert "3 already complete, 0 to write" in stdout and "all 3 shards complete: " in stdout


def test_a_shard_killed_from_outside_is_named_as_such(tmp_path, capsys, monkeypatch):
    popen = subprocess.Popen

    def killed(command, env):
        return popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])

    monkeypatch.setattr(prepare_data.subprocess, "Popen", killed)
    code = prepare_data.main(["--source", "text", "--path", _corpus(tmp_path / "docs"), "--out",
                              str(tmp_path / "t.tokens"), "--shards", "2", "--workers", "1"])
    assert code == 2 and "shard 0 of 2 was killed by SIGKILL; 0 of 2 shards complete" in capsys.readouterr().err


def test_shards_of_only_empty_documents_are_reported_as_such(tmp_path, capsys, monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("a.txt", "b.txt"):
        (docs / name).write_text("")
    popen = subprocess.Popen

    def in_process(command, env):   # the shard written here; a child that only exits 0
        write_token_file(str(docs / "*.txt"), "text", "bytes", str(tmp_path / "t.tokens"),
                         progress=_quiet, shard=(int(command[-1]), 2))
        return popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr(prepare_data.subprocess, "Popen", in_process)
    code = prepare_data.main(["--source", "text", "--path", str(docs / "*.txt"), "--out",
                              str(tmp_path / "t.tokens"), "--shards", "2"])
    assert code == 2 and "hold no token (only empty documents); its 2 shards are empty" in capsys.readouterr().err


def test_a_token_file_among_text_inputs_is_named_not_read_as_text(tmp_path):
    from ep_fp8.train.data import TokenFileSource

    pattern = _corpus(tmp_path / "docs")
    write_token_file(pattern, "text", "bytes", str(tmp_path / "docs" / "z.txt"), progress=_quiet)
    with pytest.raises(ValueError, match="z.txt: is a token file \\(prepare_data wrote it\\), not text"):
        TokenFileSource(pattern, "text", "bytes", seq_len=8, seed=0)


def test_held_out_data_prepared_from_the_training_corpus_in_another_cut_is_a_config_error(tmp_path):
    """The whole corpus prepared as one held-out file against its training shards (or in
    another number of shards, or copied elsewhere first): the documents' hashes differ, but
    the files' `inputs` (the corpus's files by content) agree, and the run is refused. A
    corpus of other contents under the same file names and sizes is accepted."""
    import shutil

    pattern = _corpus(tmp_path / "docs", n=5)
    _shards(pattern, str(tmp_path / "train.tokens"), 3)
    train = f"--data.path={tmp_path / 'train-*.tokens'}"
    shutil.copytree(tmp_path / "docs", tmp_path / "copy")
    cuts = {"one file": (str(tmp_path / "docs" / "*"), str(tmp_path / "whole.tokens"), None),
            "two shards": (pattern, str(tmp_path / "two.tokens"), 2),
            "a copy": (str(tmp_path / "copy" / "*"), str(tmp_path / "copied.tokens"), None)}
    for what, (source, out, n) in cuts.items():
        if n is None:
            write_token_file(source, "text", "bytes", out, progress=_quiet)
            held = out
        else:
            _shards(source, out, n)
            held = shard_glob(out, n)
        with pytest.raises(ConfigError, match=r"were prepared from the same input files as "
                                              r"\[data\] path .* \(inputs \w{16}\)"):
            _config(tmp_path, "--data.source=tokens", train, "--validation.enabled=true",
                    f"--validation.path={held}")
    other = tmp_path / "other"   # same names and sizes, other bytes
    other.mkdir()
    for path in list_files(pattern):
        data = bytearray(open(path, "rb").read())
        if data:
            data[len(data) // 2] ^= 1
        (other / os.path.basename(path)).write_bytes(bytes(data))
    held = str(tmp_path / "other.tokens")
    header = write_token_file(str(other / "*"), "text", "bytes", held, progress=_quiet)
    assert header["inputs"] != read_header(str(tmp_path / "whole.tokens"))["inputs"]
    _config(tmp_path, "--data.source=tokens", train, "--validation.enabled=true",
            f"--validation.path={held}")


def test_inputs_key_names_the_files_by_content_source_and_field(tmp_path):
    """Equal for the same files in any folder, order or shard count, whatever the
    tokenizer; different when a byte, the source or the JSONL field differs."""
    pattern = _corpus(tmp_path / "docs", n=4)
    files = list_files(pattern)
    ident = inputs_id(files, "text", "text")
    assert ident == inputs_id(files[::-1], "text", "text")
    assert ident != inputs_id(files, "jsonl", "text") != inputs_id(files, "jsonl", "body")
    assert ident != inputs_id(files[1:], "text", "text")
    with open(files[-1], "r+b") as f:   # the last byte of a file longer than head and tail
        f.seek(0, os.SEEK_END)
        f.write(b"x")
    assert ident != inputs_id(files, "text", "text")


def test_the_default_worker_count_is_the_cores_this_process_may_use(tmp_path, capfd, monkeypatch):
    """Under taskset or a SLURM allocation smaller than the machine, one worker per core
    the process may run on, not per core of the machine."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    pattern = _corpus(tmp_path / "docs")
    assert prepare_data.main(["--source", "text", "--path", pattern,
                              "--out", str(tmp_path / "t.tokens"), "--shards", "2"]) == 0
    assert "2 to write on 1 worker(s)" in capfd.readouterr().out
