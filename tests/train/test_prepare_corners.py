"""Corners of preparing token files (ep_fp8.train.token_file, prepare_data, tokenizer):
where shards are cut, what a glob of token files must agree on, which headers are refused,
what a write failure, a file replaced while it is mapped and a symbolic link leave, the
command line's workers and signals, and how a tokenizer.json is read."""

import contextlib
import errno
import itertools
import json
import os
import signal
import sys
import types

import pytest
import torch

from ep_fp8.train import prepare_data, token_file
from ep_fp8.train.data import PreparedTokenSource, list_files
from ep_fp8.train.prepare_data import StopOnSignals
from ep_fp8.train.token_file import (HEADER_BYTES, map_token_file, read_header, read_token_files,
                                     shard_path, split_files, write_token_file)
from ep_fp8.train.tokenizer import ByteTokenizer, load_tokenizer
from tests.train.conftest import _WordTokenizer
from tests.train.test_token_file import _corpus, _quiet
from tests.train.test_token_shards import _shards


def _with_header(path, out, **changes):
    """The token file at `path` written to `out` with its header's keys changed (a value of
    None removes the key)."""
    raw = open(path, "rb").read()
    header = json.loads(raw[8:HEADER_BYTES].decode())
    header.update(changes)
    header = {k: v for k, v in header.items() if v is not None}
    out.write_bytes((b"EPFP8TOK" + json.dumps(header).encode()).ljust(HEADER_BYTES, b" ")
                    + raw[HEADER_BYTES:])
    return str(out)


def test_a_cut_halfway_between_two_file_boundaries_takes_the_lower_one(tmp_path):
    for name, size in (("a", 1), ("b", 2), ("c", 1)):   # half the bytes: 2, between 1 and 3
        (tmp_path / name).write_bytes(b"x" * size)
    files = list_files(str(tmp_path / "*"))
    assert [[os.path.basename(p) for p in run] for run in split_files(files, 2)] == [["a"], ["b", "c"]]


def test_token_files_with_other_end_of_document_ids_are_refused_together(tmp_path, word_tokenizer):
    """Same vocab_size and dtype as the bytes tokenizer, another end-of-document id."""
    write_token_file(_corpus(tmp_path / "docs"), "text", "bytes", str(tmp_path / "a.tokens"),
                     progress=_quiet)
    (tmp_path / "words.txt").write_text("a b " * 50)
    tok = word_tokenizer({"a": 97, "b": 98, "</s>": 5, "z": 256})
    header = write_token_file(str(tmp_path / "words.txt"), "text", tok, str(tmp_path / "b.tokens"),
                              progress=_quiet)
    assert (header["vocab_size"], header["eos_id"], header["dtype"]) == (257, 5, "int16")
    with pytest.raises(ValueError, match=r"were prepared with different tokenizers: .* end of "
                                         r"document 256\), .* end of document 5\)"):
        read_token_files(str(tmp_path / "*.tokens"))


def test_a_glob_missing_the_last_shard_is_refused(tmp_path):
    out = str(tmp_path / "t.tokens")
    _shards(_corpus(tmp_path / "docs"), out, 3)
    os.unlink(shard_path(out, 2, 3))
    with pytest.raises(ValueError, match=r"1 of the 3 shards of corpus \w+ .* are missing: shard\(s\) 2\. "):
        read_token_files(str(tmp_path / "t-*.tokens"))


def test_the_documents_hash_of_several_files_follows_their_order(tmp_path):
    """Two token files that swap names give another stream: its documents' hash (which a
    resumed run compares) changes with it, and the token count is the files' sum."""
    a, b = tmp_path / "a.tokens", tmp_path / "b.tokens"
    write_token_file(_corpus(tmp_path / "x", n=2), "text", "bytes", str(a), progress=_quiet)
    write_token_file(_corpus(tmp_path / "y", n=3), "text", "bytes", str(b), progress=_quiet)
    before = PreparedTokenSource(str(tmp_path / "*.tokens"), 8, 0)
    assert before.header["tokens"] == read_header(str(a))["tokens"] + read_header(str(b))["tokens"]
    os.replace(a, tmp_path / "swap")
    os.replace(b, a)
    os.replace(tmp_path / "swap", b)
    after = PreparedTokenSource(str(tmp_path / "*.tokens"), 8, 0)
    assert after.header["hash"] != before.header["hash"]
    assert after.earlier_fingerprint != before.earlier_fingerprint


def test_a_shard_index_past_the_count_is_refused_before_anything_is_read(tmp_path):
    pattern = _corpus(tmp_path / "docs")
    with pytest.raises(ValueError, match=r"--shard 2: must be in \[0, --shards 2\)"):
        write_token_file(pattern, "text", "bytes", str(tmp_path / "t.tokens"), progress=_quiet,
                         shard=(2, 2))
    assert sorted(os.listdir(tmp_path)) == ["docs"]


@pytest.mark.parametrize("glob_folder", ["docs", "link"])
def test_a_shard_the_glob_would_read_through_a_linked_output_folder_is_refused(tmp_path, glob_folder):
    """The output names the folder of the documents by a symbolic link, and the glob by its
    real path or by the same link."""
    _corpus(tmp_path / "docs")
    (tmp_path / "link").symlink_to(tmp_path / "docs")
    pattern = str(tmp_path / glob_folder / "*.txt")
    with pytest.raises(ValueError, match="would match --path .*: shards written first would be read"):
        write_token_file(pattern, "text", "bytes", str(tmp_path / "link" / "t.txt"), progress=_quiet,
                         shard=(0, 2))
    assert sorted(os.listdir(tmp_path / "docs")) == [f"{i}.txt" for i in range(6)] + ["empty.txt"]


def test_shards_are_not_started_when_the_tokenizer_cannot_be_loaded(tmp_path, capsys, monkeypatch):
    def no_child(*args, **kwargs):
        raise AssertionError("a shard was started")

    monkeypatch.setattr(prepare_data.subprocess, "Popen", no_child)
    code = prepare_data.main(["--source", "text", "--path", _corpus(tmp_path / "docs"), "--out",
                              str(tmp_path / "t.tokens"), "--shards", "2", "--tokenizer",
                              str(tmp_path / "missing.json")])
    assert code == 2 and "missing.json' does not exist" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["docs"]


def test_only_a_jsonl_preparation_records_its_field(tmp_path):
    text = write_token_file(_corpus(tmp_path / "docs"), "text", "bytes", str(tmp_path / "t.tokens"),
                            progress=_quiet)
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "abc"}) + "\n")
    jsonl = write_token_file(str(tmp_path / "d.jsonl"), "jsonl", "bytes", str(tmp_path / "j.tokens"),
                             field="body", progress=_quiet)
    assert "jsonl_field" not in text and "jsonl_field" not in read_header(str(tmp_path / "t.tokens"))
    assert jsonl["jsonl_field"] == "body" == read_header(str(tmp_path / "j.tokens"))["jsonl_field"]


def test_a_header_too_long_is_refused_before_any_document_is_read(tmp_path):
    (tmp_path / "d.jsonl").write_text("{not json\n")   # read first, this would be the error
    with pytest.raises(ValueError, match="the header does not fit in 4096 bytes"):
        write_token_file(str(tmp_path / "d.jsonl"), "jsonl", "bytes", str(tmp_path / "d.tokens"),
                         field="f" * 5000, progress=_quiet)
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


def test_progress_comes_every_every_s_seconds_not_at_every_write(tmp_path, monkeypatch):
    clock = itertools.count()   # one second per reading of the clock
    monkeypatch.setattr(token_file, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock))))
    monkeypatch.setattr(token_file, "_WRITE_TOKENS", 10)
    writes, as_bytes = [], token_file._as_bytes
    monkeypatch.setattr(token_file, "_as_bytes", lambda t: writes.append(t.numel()) or as_bytes(t))
    (tmp_path / "d.jsonl").write_text((json.dumps({"text": "abcdefghij"}) + "\n") * 20)
    lines = []
    write_token_file(str(tmp_path / "d.jsonl"), "jsonl", "bytes", str(tmp_path / "t.tokens"),
                     progress=lines.append, every_s=2.5)
    assert len(writes) == 20   # one per document of 11 tokens
    assert len(lines) - 1 == len(writes) // 3, (len(writes), lines)   # at seconds 3, 6, 9, ...
    assert all("tokens so far" in line for line in lines[:-1]) and " wrote " in lines[-1]


@pytest.mark.parametrize("change, message", [
    ({"version": None}, "has format version None"),
    ({"vocab_size": True}, "header key 'vocab_size' is missing or not int"),
    ({"documents": False}, "header key 'documents' is missing or not int"),
    ({"eos_id": True}, "header has dtype 'int16' .* and eos_id True"),
])
def test_headers_without_a_version_or_with_booleans_for_counts_are_refused(tmp_path, change, message):
    good = str(tmp_path / "good.tokens")
    write_token_file(_corpus(tmp_path / "docs"), "text", "bytes", good, progress=_quiet)
    bad = _with_header(good, tmp_path / "bad.tokens", **change)
    with pytest.raises(ValueError, match=message):
        read_header(bad)


def test_a_file_renamed_over_between_its_check_and_its_mapping_is_read_as_mapped(tmp_path, monkeypatch):
    """The header returned is that of the file actually mapped, not of the one checked."""
    path, other = tmp_path / "t.tokens", tmp_path / "other.tokens"
    write_token_file(_corpus(tmp_path / "a", n=2), "text", "bytes", str(path), progress=_quiet)
    write_token_file(_corpus(tmp_path / "b", n=5), "text", "bytes", str(other), progress=_quiet)
    replacement = read_header(str(other))
    checked = token_file.read_header

    def then_replaced(p):
        header = checked(p)
        os.replace(other, path)
        return header

    monkeypatch.setattr(token_file, "read_header", then_replaced)
    tokens, header = map_token_file(str(path))
    assert header == replacement and tokens.numel() == replacement["tokens"]


def test_a_write_that_fails_is_a_value_error_and_leaves_no_file(tmp_path, monkeypatch):
    opened = token_file.new_file

    @contextlib.contextmanager
    def full_disk(target, out, overwrite):
        with opened(target, out, overwrite) as f:
            class Full:
                def write(self, data):
                    if len(data) != HEADER_BYTES:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    return f.write(data)

                def seek(self, *args):
                    return f.seek(*args)
            yield Full()

    monkeypatch.setattr(token_file, "new_file", full_disk)
    out = tmp_path / "t.tokens"
    with pytest.raises(ValueError, match=f"output {str(out)!r} could not be written "
                                         r"\(No space left on device\)"):
        write_token_file(_corpus(tmp_path / "docs"), "text", "bytes", str(out), progress=_quiet)
    assert sorted(os.listdir(tmp_path)) == ["docs"]


def test_reading_the_header_of_a_folder_is_a_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=f"token file {str(tmp_path)!r} cannot be read"):
        read_header(str(tmp_path))


class _Child:
    """Stands in for a shard's process: exits with `code` at once, or (code None) runs
    until terminated, then takes a few polls to clean up."""

    def __init__(self, code=None):
        self.code, self.returncode, self.polls, self.terminations = code, None, 0, 0

    def poll(self):
        self.polls += 1
        if self.code is not None or (self.terminations and self.polls > 6):
            self.returncode = -signal.SIGTERM if self.code is None else self.code
        return self.returncode

    def terminate(self):
        self.terminations += 1

    def wait(self):
        self.returncode = self.returncode if self.returncode is not None else -signal.SIGTERM
        return self.returncode


def test_a_failed_shard_stops_the_others_with_one_sigterm_each(tmp_path, capsys, monkeypatch):
    children = {}

    def start(command, env):
        children[command[-1]] = _Child(1 if command[-1] == "0" else None)
        return children[command[-1]]

    monkeypatch.setattr(prepare_data.subprocess, "Popen", start)
    code = prepare_data.main(["--source", "text", "--path", _corpus(tmp_path / "docs"), "--out",
                              str(tmp_path / "t.tokens"), "--shards", "2", "--workers", "2"])
    assert code == 2 and "shard 0 of 2 failed" in capsys.readouterr().err
    assert children["1"].returncode == -signal.SIGTERM and children["1"].terminations == 1


def test_no_shard_starts_after_one_has_failed(tmp_path, capsys, monkeypatch):
    """Shard 0 fails while shard 1 is still running: shard 2 never starts, though a worker
    is free."""
    started = []

    def start(command, env):
        started.append(command[-1])
        return _Child(1 if command[-1] == "0" else None)

    monkeypatch.setattr(prepare_data.subprocess, "Popen", start)
    code = prepare_data.main(["--source", "text", "--path", _corpus(tmp_path / "docs"), "--out",
                              str(tmp_path / "t.tokens"), "--shards", "3", "--workers", "2"])
    assert code == 2 and "shard 0 of 3 failed (its error is above); 0 of 3 shards complete" in capsys.readouterr().err
    assert started == ["0", "1"]


def test_workers_are_no_more_than_the_shards_to_write_and_share_the_cores(tmp_path, capsys, monkeypatch):
    """A thread count set by the user is kept; the other is the cores over the workers."""
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    pattern, out, envs = _corpus(tmp_path / "docs"), str(tmp_path / "t.tokens"), []

    def in_process(command, env):   # the shard written here, by a child that exits at once
        envs.append(env)
        write_token_file(pattern, "text", "bytes", out, progress=_quiet, shard=(int(command[-1]), 2))
        return _Child(0)

    monkeypatch.setattr(prepare_data.subprocess, "Popen", in_process)
    assert prepare_data.main(["--source", "text", "--path", pattern, "--out", out, "--shards", "2",
                              "--workers", "5"]) == 0
    assert "0 already complete, 2 to write on 2 worker(s)" in capsys.readouterr().out
    assert len(envs) == 2 and all(env["OMP_NUM_THREADS"] == "3" for env in envs)
    assert all(env["RAYON_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2)) for env in envs)


def test_stop_on_signals_keeps_an_ignored_hangup_and_ignores_a_second_signal():
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)   # as under nohup
    term = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignals()
    try:
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
        try:
            os.kill(os.getpid(), signal.SIGTERM)   # during the clean-up: ignored
        except KeyboardInterrupt:
            pytest.fail("a second signal interrupted the clean-up")
        assert stop.signum == signal.SIGTERM
    finally:
        stop.restore()
        signal.signal(signal.SIGHUP, before)
    assert signal.getsignal(signal.SIGTERM) is term


def test_a_signal_while_held_stops_at_the_end_of_the_block():
    stop, reached = StopOnSignals(), []
    try:
        with pytest.raises(KeyboardInterrupt):
            with stop.held():
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append(True)
        assert reached == [True] and stop.signum == signal.SIGTERM
    finally:
        stop.restore()


def test_the_byte_tokenizer_decodes_every_byte_and_drops_the_end_token():
    tok = ByteTokenizer()
    assert tok.decode([0, 104, 105, 256, 195, 169]) == "\x00hi\u00e9"
    assert tok.decode(tok.encode("\x00a\u00e9")) == "\x00a\u00e9"
    assert tok.encode_tensor(b"", torch.int16).numel() == 0
    assert [t.tolist() for t in tok.encode_tensors([b"", "\u00e9"], torch.int32)] == [[], [195, 169]]


class _Padded(_WordTokenizer):
    """A tokenizer.json that pads every encoding to 6 ids, until no_padding."""

    padding = 6

    def no_padding(self):
        self.padding = None

    def encode(self, text, add_special_tokens=False):
        encoding = super().encode(text, add_special_tokens)
        if self.padding:
            encoding.ids = encoding.ids + [self.vocab["<pad>"]] * (self.padding - len(encoding.ids))
        return encoding


def test_a_tokenizer_json_with_saved_padding_encodes_documents_unpadded(tmp_path, word_tokenizer,
                                                                         monkeypatch):
    path = word_tokenizer({"a": 0, "b": 1, "<pad>": 2, "<|endoftext|>": 3})
    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=_Padded))
    assert load_tokenizer(path).encode("a b") == [0, 1]
    (tmp_path / "d.txt").write_text("a b a")
    write_token_file(str(tmp_path / "d.txt"), "text", path, str(tmp_path / "d.tokens"), progress=_quiet)
    tokens, _ = map_token_file(str(tmp_path / "d.tokens"))
    assert tokens.tolist() == [0, 1, 0, 3]


def test_text_that_is_not_utf8_reaches_a_tokenizer_json_with_replacement_characters(
        tmp_path, word_tokenizer):
    path = word_tokenizer({"a": 0, "b": 1, "\ufffd": 2, "<|endoftext|>": 3})
    assert load_tokenizer(path).encode(b"a \xff b") == [0, 2, 1]
    (tmp_path / "d.txt").write_bytes(b"a \xff b")
    write_token_file(str(tmp_path / "d.txt"), "text", path, str(tmp_path / "d.tokens"), progress=_quiet)
    tokens, _ = map_token_file(str(tmp_path / "d.tokens"))
    assert tokens.tolist() == [0, 2, 1, 3]


@pytest.mark.parametrize("config", [{"eos_token": ["<|im_end|>"]}, ["<|im_end|>"], "<|im_end|>"])
def test_a_tokenizer_config_that_names_no_eos_string_is_passed_over(tmp_path, word_tokenizer, config):
    """An eos_token that is not a string, or a tokenizer_config.json that is valid JSON but
    not an object: the known names decide, <|endoftext|> before </s>."""
    path = word_tokenizer({"a": 0, "</s>": 1, "<|endoftext|>": 2, "<|im_end|>": 3})
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(path).eos_id == 2


def test_a_tokenizer_json_encodes_a_document_of_over_a_million_tokens_whole(word_tokenizer):
    tok = load_tokenizer(word_tokenizer({"a": 0, "b": 1}))
    n = (1 << 20) + 5
    (tokens,) = tok.encode_tensors(["a " * (n - 1) + "b"], torch.int32)
    assert tokens.numel() == n and int(tokens[-1]) == 1


def test_a_shard_the_glob_would_read_through_a_linked_input_folder_is_refused(tmp_path, capsys):
    """The glob names the folder of the documents by a symbolic link, the output by its real
    path: refused before any shard is written, not found when the second shard reads the
    first as a document."""
    _corpus(tmp_path / "docs")
    (tmp_path / "link").symlink_to(tmp_path / "docs")
    pattern, out = str(tmp_path / "link" / "*.txt"), str(tmp_path / "docs" / "t.txt")
    with pytest.raises(ValueError, match="would match --path .*: shards written first would be read"):
        write_token_file(pattern, "text", "bytes", out, progress=_quiet, shard=(0, 2))
    code = prepare_data.main(["--source", "text", "--path", pattern, "--out", out, "--shards", "2"])
    assert code == 2 and "would match --path" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "docs")) == [f"{i}.txt" for i in range(6)] + ["empty.txt"]
    assert not token_file._matches([str(tmp_path / "docs" / "t.tokens")], pattern)


@pytest.mark.parametrize("pattern", ["data/*", "data/*.txt", "data/**/*.txt", "data/**", "**/*.tokens",
                                     "data/*/*", "data/[ab]*", "data/sub/**/x?.txt", "*/sub/*"])
def test_the_output_check_matches_as_the_glob_lists(tmp_path, pattern):
    """_glob_match says yes for exactly the files glob.glob(recursive=True) lists: `*` stays
    within a name, `**` crosses folders (none included)."""
    import glob

    names = ["data/a.txt", "data/b.tokens", "data/sub/x1.txt", "data/sub/deep/x2.txt",
             "data/sub/deep/t.tokens", "other/sub/c.txt", "top.tokens"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    full = os.path.join(str(tmp_path), pattern)
    listed = {p for p in glob.glob(full, recursive=True) if os.path.isfile(p)}
    for name in names:
        path = str(tmp_path / name)
        assert token_file._glob_match(path, full) == (path in listed), (pattern, name)


def test_a_shard_output_in_a_folder_the_glob_does_not_reach_is_accepted(tmp_path):
    pattern = _corpus(tmp_path / "docs").replace("*.txt", "*")   # docs/*: not docs/tok/...
    out = str(tmp_path / "docs" / "tok" / "t.tokens")
    _shards(pattern, out, 2)
    assert len(read_token_files(str(tmp_path / "docs" / "tok" / "t-*.tokens"))[0]) == 2
    with pytest.raises(ValueError, match="would match --path"):   # docs/t...: it would
        write_token_file(pattern, "text", "bytes", str(tmp_path / "docs" / "t.tokens"),
                         progress=_quiet, shard=(0, 2))
