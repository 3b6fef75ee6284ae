"""Token files (python -m ep_fp8.train.prepare_data, [data] source = "tokens"): the same
samples as tokenizing at start-up, a destination that a failure leaves as it was, headers
checked, pages mapped rather than read, and the config's checks."""

import json
import os

import pytest
import torch

from ep_fp8.train import token_file
from ep_fp8.train.config import ConfigError, load_config
from ep_fp8.train.data import PreparedTokenSource, TokenFileSource
from ep_fp8.train.prepare_data import main as prepare_main
from ep_fp8.train.token_file import HEADER_BYTES, map_token_file, read_header, write_token_file
from tests._paths import ROOT


def _corpus(folder, n=6, size=300):
    g = torch.Generator().manual_seed(0)
    folder.mkdir(exist_ok=True)
    for i in range(n):
        ids = torch.randint(32, 127, (size + 37 * i,), generator=g).tolist()
        (folder / f"{i}.txt").write_text("".join(map(chr, ids)) + "\u00e9")   # 2-byte UTF-8 too
    (folder / "empty.txt").write_text("")
    return str(folder / "*.txt")


def _quiet(line):
    pass


@pytest.mark.parametrize("write_tokens", [7, 1 << 22])   # many writes, or one
def test_a_token_file_gives_the_samples_and_fingerprint_of_tokenizing_at_start_up(
        tmp_path, monkeypatch, write_tokens):
    monkeypatch.setattr(token_file, "_WRITE_TOKENS", write_tokens)
    pattern = _corpus(tmp_path / "docs")
    out = str(tmp_path / "train.tokens")
    header = write_token_file(pattern, "text", "bytes", out, progress=_quiet)
    direct = TokenFileSource(pattern, "text", "bytes", seq_len=16, seed=3)
    mapped = PreparedTokenSource(out, seq_len=16, seed=3)
    assert torch.equal(mapped.tokens, direct.tokens) and mapped.tokens.dtype == torch.int16
    assert mapped.fingerprint == direct.fingerprint and mapped.note == ""
    n = direct.n_windows
    assert torch.equal(mapped.get(list(range(2 * n + 5))), direct.get(list(range(2 * n + 5))))
    assert header == read_header(out)
    assert header["tokens"] == direct.tokens.numel() and header["documents"] == 6   # not the empty one
    assert header["files"] == 7 and header["vocab_size"] == 257 and header["eos_id"] == 256
    assert os.path.getsize(out) == HEADER_BYTES + 2 * header["tokens"]
    assert sorted(os.listdir(tmp_path)) == ["docs", "train.tokens"]   # no temporary file left


def test_jsonl_through_a_tokenizer_without_end_token_keeps_its_note_and_wide_ids(
        tmp_path, word_tokenizer):
    vocab = {"a": 0, "b": 1, "big": 40000}            # ids past 32767: int32 tokens
    tok = word_tokenizer(vocab)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": " ".join(["a b big"] * (i + 3))}) for i in range(5)))
    out = str(tmp_path / "d.tokens")
    header = write_token_file(str(path), "jsonl", tok, out, field="body", progress=_quiet)
    assert header["dtype"] == "int32" and header["eos_id"] is None and header["jsonl_field"] == "body"
    direct = TokenFileSource(str(path), "jsonl", tok, seq_len=4, seed=1, field="body")
    mapped = PreparedTokenSource(out, seq_len=4, seed=1)
    assert torch.equal(mapped.tokens, direct.tokens) and mapped.tokens.dtype == torch.int32
    assert int(mapped.tokens.max()) == 40000
    assert mapped.fingerprint == direct.fingerprint
    assert mapped.note == direct.note and "has no end-of-document token" in mapped.note
    assert torch.equal(mapped.get(list(range(20))), direct.get(list(range(20))))


def test_progress_is_reported_while_writing_and_at_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(token_file, "_WRITE_TOKENS", 50)
    lines = []
    write_token_file(_corpus(tmp_path / "docs"), "text", "bytes", str(tmp_path / "t.tokens"),
                     progress=lines.append, every_s=0.0)
    assert any(line.startswith("[prepare] ") and "documents" in line and "tokens so far" in line
               for line in lines[:-1]), lines
    assert lines[-1].startswith(f"[prepare] wrote {tmp_path / 't.tokens'}: ")
    assert "tokens, 6 documents from 7 file(s)" in lines[-1], lines[-1]


@pytest.mark.parametrize("failure", ["bad line", "interrupt"])
def test_a_failed_or_interrupted_preparation_leaves_the_destination_as_it_was(tmp_path, failure):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "document %d " % i * 50}) for i in range(20)]
    if failure == "bad line":
        lines.append("{not json")
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "d.tokens"
    out.write_bytes(b"an earlier file")

    def progress(line):
        if failure == "interrupt":
            raise KeyboardInterrupt

    with pytest.raises(ValueError if failure == "bad line" else KeyboardInterrupt) as err:
        write_token_file(str(path), "jsonl", "bytes", str(out), overwrite=True,
                         progress=progress, every_s=0.0)
    if failure == "bad line":
        assert f"{path}:21: not valid JSON" in str(err.value)
    assert out.read_bytes() == b"an earlier file"
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl", "d.tokens"]   # no temporary file left


def test_bad_destinations_are_refused_before_anything_is_written(tmp_path):
    pattern = _corpus(tmp_path / "docs")
    existing = tmp_path / "t.tokens"
    existing.write_bytes(b"keep")
    cases = [
        (str(existing), False, "exists: remove it or pass --overwrite"),
        (str(tmp_path / "docs"), True, "is a folder"),
        (str(tmp_path / "docs" / "0.txt"), True, "is one of the files of"),
        (str(tmp_path / "docs" / "0.txt" / "t.tokens"), True, "its folder cannot be made"),
    ]
    for out, overwrite, message in cases:
        with pytest.raises(ValueError, match=message):
            write_token_file(pattern, "text", "bytes", out, overwrite=overwrite, progress=_quiet)
    assert existing.read_bytes() == b"keep"
    assert sorted(os.listdir(tmp_path)) == ["docs", "t.tokens"]
    assert len(os.listdir(tmp_path / "docs")) == 7
    with pytest.raises(ValueError, match="source must be"):
        write_token_file(pattern, "csv", "bytes", str(tmp_path / "x.tokens"), progress=_quiet)
    write_token_file(pattern, "text", "bytes", str(tmp_path / "new" / "t.tokens"), progress=_quiet)
    assert read_header(str(tmp_path / "new" / "t.tokens"))["files"] == 7   # its folder made


def test_a_file_that_is_not_a_whole_token_file_is_named_and_refused(tmp_path):
    good = tmp_path / "good.tokens"
    write_token_file(_corpus(tmp_path / "docs"), "text", "bytes", str(good), progress=_quiet)
    raw = good.read_bytes()
    header = json.loads(raw[8:HEADER_BYTES].decode())

    def variant(name, data):
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    def with_header(**changes):
        text = json.dumps({**header, **changes}).encode()
        return (b"EPFP8TOK" + text).ljust(HEADER_BYTES, b" ") + raw[HEADER_BYTES:]

    cases = {
        variant("text.txt", b"plain text, not tokens" * 300): "is not a token file",
        variant("short.tokens", raw[:100]): "is not a token file",
        variant("cut.tokens", raw[:-1]): f"has {len(raw) - 1:,} bytes, but its header says",
        variant("long.tokens", raw + b"\0\0"): f"has {len(raw) + 2:,} bytes",
        variant("v2.tokens", with_header(version=2)): "has format version 2",
        variant("nokey.tokens", with_header(tokens="many")): "header key 'tokens' is missing or not int",
        variant("dtype.tokens", with_header(dtype="float32")): "header has dtype 'float32'",
        variant("inputs.tokens", with_header(inputs=7)): "header key 'inputs' is not str",
        variant("json.tokens", b"EPFP8TOK[" + raw[9:]): "its header is not valid JSON",
        str(tmp_path / "missing.tokens"): "matches no file",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            PreparedTokenSource(path, 8, 0)
        assert repr(path) in str(err.value)
    assert PreparedTokenSource(str(good), 8, 0).n_windows > 0
    del header["inputs"]   # files of earlier releases have no inputs key
    assert PreparedTokenSource(variant("older.tokens", with_header()), 8, 0).n_windows > 0


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
def test_a_token_file_is_mapped_not_read(tmp_path):
    n = 256 << 20                                  # 256 Mi int16 tokens: a 512 MiB file
    path = tmp_path / "big.tokens"
    header = {"version": 1, "dtype": "int16", "tokens": n, "documents": 1, "files": 1,
              "hash": "0" * 16, "tokenizer": "bytes", "vocab_size": 257, "eos_id": 256,
              "source": "text"}
    with open(path, "wb") as f:
        f.write((b"EPFP8TOK" + json.dumps(header).encode()).ljust(HEADER_BYTES, b" "))
        f.truncate(HEADER_BYTES + 2 * n)           # sparse: no disk used
        f.seek(HEADER_BYTES + 2 * (n - 3))
        f.write(token_file._as_bytes(torch.tensor([7, 8, 9], dtype=torch.int16)))

    def resident_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    before = resident_mib()
    tokens, _ = map_token_file(str(path))
    src = PreparedTokenSource(str(path), seq_len=1024, seed=0)
    batch = src.get(list(range(64)))
    grown = resident_mib() - before
    assert tokens.numel() == n and tokens[-3:].tolist() == [7, 8, 9]
    assert batch.shape == (64, 1025)
    assert grown < 64, f"resident memory grew by {grown:.0f} MiB for a 512 MiB file"


def _config(tmp_path, *overrides):
    return load_config(None, ["--model.vocab_size=300", f"--job.output_dir={tmp_path / 'runs'}",
                              *overrides], world_size=1)


def test_the_config_checks_a_token_file_and_its_held_out_twin(tmp_path, word_tokenizer):
    train, held = str(tmp_path / "train.tokens"), str(tmp_path / "held.tokens")
    write_token_file(_corpus(tmp_path / "a"), "text", "bytes", train, progress=_quiet)
    write_token_file(_corpus(tmp_path / "b", n=2), "text", "bytes", held, progress=_quiet)
    wide = str(tmp_path / "wide.tokens")
    (tmp_path / "words.txt").write_text("a b " * 200)
    write_token_file(str(tmp_path / "words.txt"), "text", word_tokenizer({"a": 0, "b": 299}),
                     wide, progress=_quiet)   # another tokenizer, without an end token
    base = ["--data.source=tokens", f"--data.path={train}"]
    cfg = _config(tmp_path, *base, "--validation.enabled=true", f"--validation.path={held}")
    assert cfg.data.source == "tokens"
    bad = [
        ([f"--data.tokenizer={tmp_path / 'tok.json'}"], "reads token files, which record the tokenizer"),
        (["--model.vocab_size=200"], f"[data] token file(s) {train!r} (tokenizer 'bytes') has 257 tokens, "
                                     "more than the model's vocab_size = 200"),
        ([f"--data.path={tmp_path / '*.tokens'}"],   # held, train and wide, in that order
         f"were prepared with different tokenizers: {held!r} with 'bytes' (257 tokens, end of "
         f"document 256), {wide!r} with"),
        ([f"--data.path={tmp_path / 'a' / '0.txt'}"], "is not a token file"),
        (["--data.jsonl_field=body"], "is read only with source = \"jsonl\""),
        (["--validation.enabled=true", f"--validation.path={train}"], "share 1 file(s)"),
        (["--validation.enabled=true", f"--validation.path={wide}"],
         f"[validation] token file(s) {wide!r} were prepared with tokenizer"),
        (["--validation.enabled=true", f"--validation.path={tmp_path / 'a' / '0.txt'}"],
         "[validation] "),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError) as err:
            _config(tmp_path, *base, *overrides)
        assert message in str(err.value), (overrides, str(err.value))


def test_the_command_line_writes_the_file_and_reports_errors(tmp_path, capsys):
    pattern = _corpus(tmp_path / "docs")
    out = str(tmp_path / "t.tokens")
    assert prepare_main(["--source", "text", "--path", pattern, "--out", out]) == 0
    assert capsys.readouterr().out.startswith(f"[prepare] wrote {out}: ")
    assert read_header(out)["files"] == 7
    assert prepare_main(["--source", "text", "--path", pattern, "--out", out]) == 2
    assert "prepare_data: output" in capsys.readouterr().err
    assert prepare_main(["--source", "text", "--path", pattern, "--out", out, "--overwrite"]) == 0
    with pytest.raises(SystemExit) as exit_:
        prepare_main(["--source", "text", "--path", pattern, "--out", out, "--jsonl-field", "body"])
    assert exit_.value.code == 2 and "--jsonl-field is read only with --source jsonl" in capsys.readouterr().err


def test_training_on_a_token_file_repeats_the_run_on_its_text(tmp_path, monkeypatch, capsys):
    from ep_fp8.train.main import free_port, main

    monkeypatch.setattr("ep_fp8.train.loop.SLOW_TOKENIZING_S", 0.0)   # every tokenization is slow

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    pattern = _corpus(tmp_path / "docs", n=4, size=3000)
    write_token_file(pattern, "text", "bytes", str(tmp_path / "t.tokens"), progress=_quiet)
    losses = {}
    for source, path in (("text", pattern), ("tokens", str(tmp_path / "t.tokens"))):
        out = tmp_path / source
        code = main(["--config", os.path.join(ROOT, "train_configs", "debug_model.toml"),
                     f"--data.source={source}", f"--data.path={path}", f"--job.output_dir={out}",
                     "--training.device=cpu", "--parallel.ep=1", "--model.vocab_size=320",
                     "--training.steps=3", "--metrics.log_every=1", "--metrics.tensorboard=false"])
        assert code == 0
        with open(out / "debug_model" / "metrics.jsonl") as f:
            losses[source] = [r["loss"] for r in map(json.loads, f) if "loss" in r]
        hint = "on every rank; python -m ep_fp8.train.prepare_data does it once"
        assert (hint in capsys.readouterr().out) == (source == "text")   # no hint for tokens
    assert len(losses["text"]) == 3 and losses["text"] == losses["tokens"], losses


def test_a_header_too_long_for_its_space_is_refused_before_tokenizing(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "abc"}) + "\n")
    with pytest.raises(ValueError, match="the header does not fit in 4096 bytes"):
        write_token_file(str(tmp_path / "d.jsonl"), "jsonl", "bytes", str(tmp_path / "d.tokens"),
                         field="f" * 5000, progress=_quiet)
    assert sorted(os.listdir(tmp_path)) == ["d.jsonl"]


def test_many_small_documents_are_written_as_they_come_not_held(tmp_path, monkeypatch):
    writes = []
    as_bytes = token_file._as_bytes
    monkeypatch.setattr(token_file, "_as_bytes", lambda t: writes.append(t.numel()) or as_bytes(t))
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": "ab"}) + "\n" for _ in range(10000)))
    header = write_token_file(str(path), "jsonl", "bytes", str(tmp_path / "d.tokens"), progress=_quiet)
    assert header["tokens"] == 30000 and header["documents"] == 10000
    assert writes[0] == 3 * 4096 and sum(writes) == 30000   # 8192 pieces, two per document


def test_a_corpus_without_tokens_is_refused_and_writes_nothing(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("")
    (tmp_path / "docs" / "b.txt").write_text("")
    with pytest.raises(ValueError, match="its 2 file\\(s\\) hold no token"):
        write_token_file(str(tmp_path / "docs" / "*.txt"), "text", "bytes",
                         str(tmp_path / "e.tokens"), progress=_quiet)
    assert sorted(os.listdir(tmp_path)) == ["docs"]


def test_a_file_that_appears_meanwhile_is_kept_unless_overwrite(tmp_path):
    pattern, out = _corpus(tmp_path / "docs"), tmp_path / "t.tokens"

    def another_run(line):       # called mid-way, once the temporary file exists
        assert any(n.startswith(".t.tokens.tmp-") for n in os.listdir(tmp_path))
        if not out.exists():
            out.write_bytes(b"the other run's file")

    with pytest.raises(ValueError, match="appeared while it was being prepared"):
        write_token_file(pattern, "text", "bytes", str(out), progress=another_run, every_s=0.0)
    assert out.read_bytes() == b"the other run's file"
    assert sorted(os.listdir(tmp_path)) == ["docs", "t.tokens"]
    write_token_file(pattern, "text", "bytes", str(out), overwrite=True, progress=_quiet)
    assert read_header(str(out))["files"] == 7


def test_a_symbolic_link_as_output_writes_its_target(tmp_path):
    (tmp_path / "store").mkdir()
    link = tmp_path / "t.tokens"
    link.symlink_to(tmp_path / "store" / "real.tokens")        # dangling until written
    write_token_file(_corpus(tmp_path / "docs"), "text", "bytes", str(link), progress=_quiet)
    assert link.is_symlink() and read_header(str(tmp_path / "store" / "real.tokens"))["files"] == 7
    assert sorted(os.listdir(tmp_path / "store")) == ["real.tokens"]


def test_a_glob_or_home_path_names_the_same_file_for_the_check_and_the_run(tmp_path, monkeypatch):
    from ep_fp8.train.data import build_source, build_validation_source

    monkeypatch.setenv("HOME", str(tmp_path))
    write_token_file(_corpus(tmp_path / "a"), "text", "bytes", str(tmp_path / "train.tokens"),
                     progress=_quiet)
    write_token_file(_corpus(tmp_path / "b", n=3), "text", "bytes", str(tmp_path / "held.tokens"),
                     progress=_quiet)
    cfg = _config(tmp_path, "--data.source=tokens", f"--data.path={tmp_path / 'tr*.tokens'}",
                  "--validation.enabled=true", "--validation.path=~/held.tokens",
                  "--training.seq_len=16")
    train, held = build_source(cfg), build_validation_source(cfg)
    assert train.fingerprint == PreparedTokenSource(str(tmp_path / "train.tokens"), 16, 0).fingerprint
    assert held.fingerprint == PreparedTokenSource(str(tmp_path / "held.tokens"), 16, 0).fingerprint
    assert train.fingerprint != held.fingerprint


def test_held_out_tokens_of_the_same_documents_and_too_short_files_are_config_errors(tmp_path):
    pattern = _corpus(tmp_path / "docs")
    for name in ("train.tokens", "copy.tokens"):
        write_token_file(pattern, "text", "bytes", str(tmp_path / name), progress=_quiet)
    with pytest.raises(ConfigError, match="hold the same documents as a file of \\[data\\] path"):
        _config(tmp_path, "--data.source=tokens", f"--data.path={tmp_path / 'train.tokens'}",
                "--validation.enabled=true", f"--validation.path={tmp_path / 'copy.tokens'}")
    tokens = read_header(str(tmp_path / "train.tokens"))["tokens"]
    with pytest.raises(ConfigError, match=f"holds {tokens} tokens, fewer than \\[training\\] seq_len"):
        _config(tmp_path, "--data.source=tokens", f"--data.path={tmp_path / 'train.tokens'}",
                f"--training.seq_len={tokens}", f"--model.max_seq_len={tokens}")


def test_writes_to_the_mapped_tokens_never_reach_the_file(tmp_path):
    out = tmp_path / "t.tokens"
    write_token_file(_corpus(tmp_path / "docs"), "text", "bytes", str(out), progress=_quiet)
    before = out.read_bytes()
    tokens, _ = map_token_file(str(out))
    tokens[:100] = 3
    assert out.read_bytes() == before


def test_sigterm_stops_the_command_line_and_removes_its_temporary_file(tmp_path, capsys, monkeypatch):
    import signal

    pattern, out = _corpus(tmp_path / "docs"), tmp_path / "t.tokens"
    monkeypatch.setattr(token_file, "_WRITE_TOKENS", 10)
    write = token_file.write_token_file

    def write_then_terminated(*args, **kwargs):
        kwargs.update(every_s=0.0, progress=lambda line: os.kill(os.getpid(), signal.SIGTERM))
        return write(*args, **kwargs)

    monkeypatch.setattr("ep_fp8.train.prepare_data.write_token_file", write_then_terminated)
    handler = signal.getsignal(signal.SIGTERM)
    assert prepare_main(["--source", "text", "--path", pattern, "--out", str(out)]) == 128 + signal.SIGTERM
    assert f"stopped by SIGTERM; {out} is as it was" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["docs"]
    assert signal.getsignal(signal.SIGTERM) is handler          # restored


def test_an_interrupt_after_the_rename_says_the_file_was_written(tmp_path, capsys, monkeypatch):
    def interrupted(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr("ep_fp8.paths.fsync_folder", interrupted)   # the folder sync after the rename
    out = tmp_path / "t.tokens"
    out.write_bytes(b"old")
    code = prepare_main(["--source", "text", "--path", _corpus(tmp_path / "docs"), "--out", str(out),
                         "--overwrite"])
    assert code == 130 and f"{out} was written before it stopped" in capsys.readouterr().err
    assert read_header(str(out))["files"] == 7


@pytest.mark.parametrize("out, message", [("", "must name a file"), ("newdir/", "must name a file")])
def test_an_output_that_names_no_file_is_refused_before_tokenizing(tmp_path, out, message):
    with pytest.raises(ValueError, match=message):
        write_token_file(_corpus(tmp_path / "docs"), "text", "bytes", out, progress=_quiet)
