"""Corners of ep_fp8.train.data and of the data and validation checks of
ep_fp8.train.validate: the copy check's file fingerprint, the held-out chain's indices, the
window order across epochs, JSONL lines that are not objects, the held-out sources built
from the config, and the boundaries of the config's ranges."""

import hashlib
import json
import math
import re

import pytest
import torch

from ep_fp8.train.config import ConfigError, load_config
from ep_fp8.train.data import (DataLoader, MarkovSource, PreparedTokenSource, TokenFileSource,
                               build_source, build_validation_source, file_fingerprint, list_files,
                               token_chunks)
from ep_fp8.train.token_file import write_token_file
from ep_fp8.train.tokenizer import ByteTokenizer
from tests.train.test_token_file import _config, _corpus, _quiet


def _random_text(g, n):
    return "".join(map(chr, torch.randint(97, 123, (n,), generator=g).tolist()))


def test_the_file_fingerprint_counts_the_size_not_only_both_ends(tmp_path):
    """Two files with the same first and last 4 KiB but different lengths are not copies:
    file_fingerprint differs, and a held-out file like that passes the copy check."""
    g = torch.Generator().manual_seed(0)
    head, middle, tail = _random_text(g, 4096), _random_text(g, 3000), _random_text(g, 4096)
    (tmp_path / "train").mkdir()
    (tmp_path / "held").mkdir()
    (tmp_path / "train" / "a.txt").write_text(head + middle + tail)
    (tmp_path / "held" / "a.txt").write_text(head + middle[:1000] + tail)
    (tmp_path / "held" / "b.txt").write_text(head + middle + tail)   # a true copy
    assert (file_fingerprint(str(tmp_path / "train" / "a.txt"))
            != file_fingerprint(str(tmp_path / "held" / "a.txt")))
    assert (file_fingerprint(str(tmp_path / "train" / "a.txt"))
            == file_fingerprint(str(tmp_path / "held" / "b.txt")))
    base = ["--data.source=text", f"--data.path={tmp_path / 'train' / '*.txt'}",
            "--model.vocab_size=257", "--validation.enabled=true"]
    load_config(None, base + [f"--validation.path={tmp_path / 'held' / 'a.txt'}"])
    with pytest.raises(ConfigError, match=r"1 file\(s\), \d+% of its bytes, are copies of files of \[data\] path"):
        load_config(None, base + [f"--validation.path={tmp_path / 'held' / '*.txt'}"])


def test_held_out_markov_sample_i_is_drawn_at_index_minus_2_minus_i():
    """Held-out sample i is the chain's sample at index -2 - i (as _generator documents),
    never at -1, where the chain itself was drawn."""
    train, held = MarkovSource(64, 4, 16, seed=7), MarkovSource(64, 4, 16, seed=7, held_out=True)
    assert torch.equal(held.get([0, 1, 5]), train.get([-2, -3, -7]))
    assert not torch.equal(held.get([0]), train.get([-1]))


def test_branching_equal_to_the_vocabulary_is_a_uniform_chain():
    """branching may be the whole vocabulary: every row's successors are then a
    permutation of it and the entropy is ln(vocab); one more is refused."""
    src = MarkovSource(vocab=8, branching=8, seq_len=4, seed=1)
    assert all(sorted(row.tolist()) == list(range(8)) for row in src.successors_VK)
    assert src.entropy == pytest.approx(math.log(8))
    with pytest.raises(ValueError, match=re.escape("synthetic_branching must be in [1, synthetic_vocab=8], got 9")):
        MarkovSource(vocab=8, branching=9, seq_len=4, seed=1)


def test_each_epoch_visits_every_window_once_in_its_own_order(tmp_path):
    """Epoch e's order is shuffled by (seed, e): the three epochs are each a permutation of
    the windows, and not the same permutation."""
    (tmp_path / "a.txt").write_text("".join(chr(97 + i % 26) for i in range(401)))
    src = TokenFileSource(str(tmp_path / "a.txt"), "text", "bytes", seq_len=8, seed=0)
    n = src.n_windows
    epochs = [src.get(list(range(e * n, (e + 1) * n))) for e in range(3)]
    for e in epochs:
        assert sorted(map(tuple, e.tolist())) == sorted(map(tuple, epochs[0].tolist()))
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])


def test_the_last_window_ends_on_the_last_token_and_a_stream_of_exactly_seq_len_plus_1_has_one(tmp_path):
    """seq_len * k + 1 tokens hold k windows, the last one ending on the last token; one
    token fewer holds k - 1."""
    (tmp_path / "a.txt").write_bytes(bytes(range(97, 97 + 40)))   # 40 bytes + EOS = 41 tokens
    src = TokenFileSource(str(tmp_path / "a.txt"), "text", "bytes", seq_len=10, seed=0)
    assert src.n_windows == 4
    rows = sorted(map(tuple, src.get(list(range(4))).tolist()))
    assert rows[-1] == tuple(range(127, 137)) + (256,)
    (tmp_path / "a.txt").write_bytes(bytes(range(97, 97 + 39)))
    assert TokenFileSource(str(tmp_path / "a.txt"), "text", "bytes", seq_len=10, seed=0).n_windows == 3
    (tmp_path / "a.txt").write_bytes(b"abcdefghi")                # 10 tokens = seq_len + 1
    one = TokenFileSource(str(tmp_path / "a.txt"), "text", "bytes", seq_len=9, seed=0)
    assert one.n_windows == 1 and one.get([0, 1]).tolist() == [list(b"abcdefghi") + [256]] * 2


@pytest.mark.parametrize("line", ['["text"]', '"text"', "3", "null"])
def test_a_jsonl_line_that_is_not_an_object_is_named(tmp_path, line):
    """A JSON value that is not an object (even a list or string holding the field's name)
    is a ValueError naming the file and line, not a TypeError."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "abc"}\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not a JSON object with a string field 'text'")):
        TokenFileSource(str(path), "jsonl", "bytes", seq_len=1, seed=0)


def test_a_json_error_column_counts_a_byte_order_mark(tmp_path):
    """The column of a JSON error on a line that opens with a byte-order mark counts the
    mark, as an editor would (the mark is one character)."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "cd"\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: not valid JSON (Expecting ',' delimiter at column 15)")):
        TokenFileSource(str(path), "jsonl", "bytes", seq_len=1, seed=0)


def test_token_chunks_count_each_document_once_across_chunks(tmp_path):
    """With chunks far smaller than the corpus, the documents counts of the chunks add up to
    the non-empty documents and the chunks join into the whole stream."""
    pattern = _corpus(tmp_path / "docs", n=5, size=40)
    files = list_files(pattern)
    chunks = list(token_chunks(files, "text", ByteTokenizer(), "text", hashlib.blake2b(), max_tokens=30))
    assert len(chunks) >= 5
    assert sum(n for _, n in chunks) == 5
    stream = TokenFileSource(pattern, "text", "bytes", seq_len=1, seed=0).tokens
    assert torch.equal(torch.cat([c for c, _ in chunks]), stream)


def test_many_documents_in_several_chunks_give_the_header_count(tmp_path, monkeypatch):
    """write_token_file's header counts every non-empty document once when its writes come
    in many small chunks."""
    from ep_fp8.train import token_file

    monkeypatch.setattr(token_file, "_WRITE_TOKENS", 50)
    pattern = _corpus(tmp_path / "docs", n=6, size=40)
    header = write_token_file(pattern, "text", "bytes", str(tmp_path / "t.tokens"), progress=_quiet)
    assert header["documents"] == 6


def test_the_held_out_jsonl_source_reads_the_configured_field(tmp_path):
    """build_validation_source reads [validation] path with [data] jsonl_field, like the
    training files."""
    (tmp_path / "train.jsonl").write_text(json.dumps({"body": "t" * 40}) + "\n")
    (tmp_path / "held.jsonl").write_text(json.dumps({"body": "held out text", "text": "x"}) + "\n")
    cfg = _config(tmp_path, "--data.source=jsonl", f"--data.path={tmp_path / 'train.jsonl'}",
                  "--data.jsonl_field=body", "--validation.enabled=true",
                  f"--validation.path={tmp_path / 'held.jsonl'}", "--training.seq_len=4")
    assert build_validation_source(cfg).tokens.tolist() == list(b"held out text") + [256]


def test_the_held_out_token_source_reads_the_validation_files(tmp_path):
    """For source = "tokens", build_validation_source maps [validation] path, not the
    training files."""
    train, held = str(tmp_path / "train.tokens"), str(tmp_path / "held.tokens")
    write_token_file(_corpus(tmp_path / "a"), "text", "bytes", train, progress=_quiet)
    write_token_file(_corpus(tmp_path / "b", n=2), "text", "bytes", held, progress=_quiet)
    cfg = _config(tmp_path, "--data.source=tokens", f"--data.path={train}",
                  "--validation.enabled=true", f"--validation.path={held}", "--training.seq_len=16")
    source = build_validation_source(cfg)
    assert torch.equal(source.tokens, PreparedTokenSource(held, 16, 0).tokens)


def test_the_synthetic_held_out_source_is_the_held_out_chain():
    """For synthetic data, build_validation_source gives the held-out samples of the
    training chain, never training samples."""
    cfg = load_config(None, ["--validation.enabled=true", "--training.seq_len=16"])
    held = build_validation_source(cfg)
    assert held.held_out and held.fingerprint.endswith(", held out")
    d = cfg.data
    train = MarkovSource(d.synthetic_vocab, d.synthetic_branching, 16, d.seed)
    assert torch.equal(held.get([0, 1]), train.get([-2, -3]))


@pytest.mark.parametrize("overrides, message", [
    (["--lr_schedule.min_lr_ratio=1.5"], "[lr_schedule] min_lr_ratio must be in [0, 1], got 1.5"),
    (["--lr_schedule.min_lr_ratio=-0.1"], "[lr_schedule] min_lr_ratio must be in [0, 1], got -0.1"),
    (["--optimizer.betas=[0.9, 1.0]"], "[optimizer] betas must be in [0, 1), got [0.9, 1.0]"),
    (["--data.synthetic_vocab=1", "--data.synthetic_branching=1"],
     "[data] synthetic_vocab must be in [2, model vocab_size"),
    (["--data.synthetic_vocab=16", "--data.synthetic_branching=17"],
     "[data] synthetic_branching must be in [1, synthetic_vocab = 16], got 17"),
    (["--model.max_seq_len=64", "--training.seq_len=65"],
     "[training] seq_len = 65 exceeds the model's max_seq_len = 64"),
])
def test_values_just_past_a_bound_are_errors_naming_the_key(overrides, message):
    """The first value past each bound is a ConfigError naming its key."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides", [
    ["--lr_schedule.min_lr_ratio=1.0"], ["--lr_schedule.min_lr_ratio=0.0"],
    ["--optimizer.betas=[0.0, 0.999]"],
    ["--data.synthetic_vocab=2", "--data.synthetic_branching=2"],
    ["--model.max_seq_len=64", "--training.seq_len=64"],
])
def test_values_on_a_bound_are_accepted(overrides):
    """Each bound itself is allowed."""
    load_config(None, overrides)


def test_a_byte_tokenizer_fills_a_model_vocabulary_of_exactly_its_size(tmp_path):
    """A tokenizer with as many ids as the model's vocab_size fits; one more is refused."""
    (tmp_path / "a.txt").write_text("some text " * 20)
    base = ["--data.source=text", f"--data.path={tmp_path / 'a.txt'}"]
    load_config(None, base + ["--model.vocab_size=257"])
    with pytest.raises(ConfigError, match=re.escape("has 257 tokens, more than the model's vocab_size = 256")):
        load_config(None, base + ["--model.vocab_size=256"])


def test_held_out_jsonl_copies_of_training_files_are_an_error(tmp_path):
    """The copy check covers JSONL files too, not only text."""
    (tmp_path / "train").mkdir()
    (tmp_path / "held").mkdir()
    line = json.dumps({"text": "some text " * 10}) + "\n"
    (tmp_path / "train" / "a.jsonl").write_text(line * 3)
    (tmp_path / "held" / "b.jsonl").write_text(line * 3)
    with pytest.raises(ConfigError, match=r"1 file\(s\), \d+% of its bytes, are copies of files of \[data\] path"):
        load_config(None, ["--data.source=jsonl", f"--data.path={tmp_path / 'train' / '*.jsonl'}",
                           "--model.vocab_size=257", "--validation.enabled=true",
                           f"--validation.path={tmp_path / 'held' / '*.jsonl'}"])


def test_held_out_shards_may_have_an_empty_shard_like_the_training_shards(tmp_path):
    """An empty shard on both sides (no documents) is not 'the same documents': the
    held-out check compares only shards that hold tokens."""
    for side, text in (("train", "abcdefghij"), ("held", "zyxwvutsrq")):
        docs = tmp_path / side
        docs.mkdir()
        (docs / "a.txt").write_text(text * 3)
        (docs / "b.txt").write_text("")
        (docs / "c.txt").write_text(text[::-1] * 3)
        for i in range(3):
            write_token_file(str(docs / "*.txt"), "text", "bytes", str(tmp_path / f"{side}.tokens"),
                             progress=_quiet, shard=(i, 3))
    _config(tmp_path, "--data.source=tokens", f"--data.path={tmp_path / 'train-*.tokens'}",
            "--validation.enabled=true", f"--validation.path={tmp_path / 'held-*.tokens'}",
            "--training.seq_len=16")


def test_held_out_tokens_with_another_end_of_document_token_are_an_error(tmp_path, word_tokenizer):
    """Token files of tokenizers with the same vocabulary size but another end-of-document
    token (here none) cannot validate each other's runs."""
    (tmp_path / "train.txt").write_text("a b " * 40)
    (tmp_path / "held.txt").write_text("b a " * 40)
    with_eos = word_tokenizer({"a": 0, "b": 1, "<|endoftext|>": 2})
    train = str(tmp_path / "train.tokens")
    write_token_file(str(tmp_path / "train.txt"), "text", with_eos, train, progress=_quiet)
    without = word_tokenizer({"a": 0, "b": 1, "c": 2})
    held = str(tmp_path / "held.tokens")
    write_token_file(str(tmp_path / "held.txt"), "text", without, held, progress=_quiet)
    with pytest.raises(ConfigError, match=r"end of document None\), \[data\] path .* end of "
                                          r"document 2\): prepare both with the same tokenizer"):
        _config(tmp_path, "--data.source=tokens", f"--data.path={train}", "--training.seq_len=16",
                "--validation.enabled=true", f"--validation.path={held}")


def test_a_loaded_position_is_where_the_next_batch_starts_across_epochs(tmp_path):
    """A loader resumed at a position past an epoch's end continues exactly as the loader
    that drew up to it."""
    (tmp_path / "a.txt").write_text("".join(chr(97 + i % 26) for i in range(161)))
    src = TokenFileSource(str(tmp_path / "a.txt"), "text", "bytes", seq_len=8, seed=3)
    run = DataLoader(src, batch_size=3, rank=0, world=1)
    for _ in range(9):                 # 27 samples: past the 20 windows of epoch 0
        run.next()
    resumed = DataLoader(TokenFileSource(str(tmp_path / "a.txt"), "text", "bytes", seq_len=8, seed=3),
                         batch_size=3, rank=0, world=1)
    resumed.load_state_dict(run.state_dict())
    assert resumed.samples_seen == 27 and resumed.resume_note == ""
    for _ in range(3):
        assert torch.equal(resumed.next()[0], run.next()[0])


def test_a_window_reads_across_two_empty_shards_in_a_row(tmp_path):
    """A window that starts before two consecutive empty shards and ends after them reads
    the tokens on both sides."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("abcdefghij" * 3)
    (docs / "b.txt").write_text("")
    (docs / "c.txt").write_text("")
    (docs / "d.txt").write_text("klmnopqrst" * 3)
    headers = [write_token_file(str(docs / "*.txt"), "text", "bytes", str(tmp_path / "t.tokens"),
                                progress=_quiet, shard=(i, 4)) for i in range(4)]
    assert [h["tokens"] for h in headers] == [31, 0, 0, 31]
    source = PreparedTokenSource(str(tmp_path / "t-*.tokens"), seq_len=20, seed=0)
    expected = torch.tensor([*b"abcdefghij" * 3, 256, *b"klmnopqrst" * 3, 256])
    got = sorted(map(tuple, source.get(list(range(source.n_windows))).tolist()))
    assert got == sorted(tuple(expected[20 * w: 20 * w + 21].tolist()) for w in range(source.n_windows))


def test_the_fingerprint_tells_documents_split_at_another_byte(tmp_path):
    """The same bytes cut into documents at another place are other documents (another
    end-of-document position), so another fingerprint."""
    (tmp_path / "a.txt").write_text("abcdefgh" * 4)
    (tmp_path / "b.txt").write_text("ijklmnoq" * 4)
    glob_ = str(tmp_path / "*.txt")
    before = TokenFileSource(glob_, "text", "bytes", seq_len=4, seed=0)
    (tmp_path / "a.txt").write_text("abcdefgh" * 4 + "i")
    (tmp_path / "b.txt").write_text("jklmnoq" + "ijklmnoq" * 3)
    after = TokenFileSource(glob_, "text", "bytes", seq_len=4, seed=0)
    assert before.tokens.numel() == after.tokens.numel()
    assert not torch.equal(before.tokens, after.tokens)
    assert before.fingerprint != after.fingerprint


def test_prefetching_more_while_some_batches_are_ready_draws_only_the_next_ones():
    """prefetch(n) with fewer than n batches ready draws the batches after the ready ones,
    so the loader still returns the plain sequence."""
    src = MarkovSource(64, 3, 8, seed=0)
    plain = DataLoader(src, batch_size=2, rank=1, world=2)
    ahead = DataLoader(src, batch_size=2, rank=1, world=2)
    want = [plain.next()[0] for _ in range(4)]
    ahead.prefetch(1)
    ahead.prefetch(3)
    assert ahead.samples_seen == 0
    got = [ahead.next()[0] for _ in range(4)]
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_initial_load_must_be_a_folder_with_the_complete_marker(tmp_path):
    """[checkpoint] initial_load names a step-N folder holding the complete marker: a
    missing path or a folder without the marker is refused, one with it accepted."""
    from ep_fp8.train.checkpoint import MARKER

    step = tmp_path / "step-4"
    with pytest.raises(ConfigError, match=re.escape(f"[checkpoint] initial_load '{step}' is not a "
                                                    f"folder")):
        load_config(None, [f"--checkpoint.initial_load={step}"])
    step.mkdir()
    with pytest.raises(ConfigError, match=re.escape(f"[checkpoint] initial_load '{step}' is not a "
                                                    f"complete checkpoint (no {MARKER} marker)")):
        load_config(None, [f"--checkpoint.initial_load={step}"])
    (step / MARKER).write_text("{}")
    assert load_config(None, [f"--checkpoint.initial_load={step}"]).checkpoint.initial_load == str(step)


def test_held_out_token_files_of_an_earlier_release_without_inputs_are_accepted(tmp_path):
    """Token files written before headers named their inputs (no 'inputs' key) are not
    'prepared from the same input files' merely because both lack the key."""
    from ep_fp8.train import token_file

    for name, n in (("train", 4), ("held", 2)):
        out = str(tmp_path / f"{name}.tokens")
        header = write_token_file(_corpus(tmp_path / name, n=n), "text", "bytes", out, progress=_quiet)
        del header["inputs"]
        with open(out, "r+b") as f:
            f.write(token_file._header_bytes(header, out))
        assert "inputs" not in token_file.read_header(out)
    _config(tmp_path, "--data.source=tokens", f"--data.path={tmp_path / 'train.tokens'}",
            "--validation.enabled=true", f"--validation.path={tmp_path / 'held.tokens'}",
            "--training.seq_len=16")


def test_build_source_passes_the_data_seed_and_jsonl_field(tmp_path):
    """build_source gives token files the [data] seed (it sets the window order) and JSONL
    files the [data] jsonl_field."""
    train = str(tmp_path / "train.tokens")
    write_token_file(_corpus(tmp_path / "a"), "text", "bytes", train, progress=_quiet)
    cfg = _config(tmp_path, "--data.source=tokens", f"--data.path={train}", "--data.seed=5",
                  "--training.seq_len=16")
    source = build_source(cfg)
    assert source.fingerprint == PreparedTokenSource(train, 16, 5).fingerprint
    assert torch.equal(source.get(list(range(8))), PreparedTokenSource(train, 16, 5).get(list(range(8))))
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "trained on", "text": "not this"}) + "\n")
    cfg = _config(tmp_path, "--data.source=jsonl", f"--data.path={tmp_path / 'd.jsonl'}",
                  "--data.jsonl_field=body", "--training.seq_len=4")
    assert build_source(cfg).tokens.tolist() == list(b"trained on") + [256]


def test_an_empty_checkpoint_folder_is_an_error(tmp_path):
    """An empty [checkpoint] folder would put checkpoints in the run's own folder: refused."""
    with pytest.raises(ConfigError, match=re.escape("[checkpoint] folder must not be empty")):
        load_config(None, [f"--job.output_dir={tmp_path}", '--checkpoint.folder=""'])


def test_the_fingerprint_tells_tokenizers_that_give_as_many_tokens_apart(tmp_path, word_tokenizer):
    """Two tokenizers that swap two ids give as many tokens and the same documents' hash,
    but other samples: the fingerprint differs, so a resume across them gets its note. A
    position saved by an earlier release (without the tokens' hash) resumes with none."""
    (tmp_path / "a.txt").write_text("a b a a b " * 20)
    one = word_tokenizer({"a": 0, "b": 1, "<|endoftext|>": 2})
    first = TokenFileSource(str(tmp_path / "a.txt"), "text", one, 8, 0)
    second = TokenFileSource(str(tmp_path / "a.txt"), "text",
                             word_tokenizer({"a": 1, "b": 0, "<|endoftext|>": 2}), 8, 0)
    assert not torch.equal(first.get([0])[0], second.get([0])[0])
    assert first.fingerprint != second.fingerprint
    loader = DataLoader(second, 2, 0, 1)
    loader.load_state_dict({"samples_seen": 4, "source": first.fingerprint})
    assert "[data] differs from the checkpoint's" in loader.resume_note
    loader.load_state_dict({"samples_seen": 4, "source": second.earlier_fingerprint})
    assert loader.resume_note == ""


def test_a_tokenizer_path_takes_a_tilde_as_data_paths_do(tmp_path, monkeypatch):
    from ep_fp8.train import tokenizer as tokenizer_module

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tok.json").write_text("{}")
    opened = []
    monkeypatch.setattr(tokenizer_module, "JsonTokenizer", lambda path: opened.append(path) or path)
    assert tokenizer_module.load_tokenizer("~/tok.json") == str(tmp_path / "tok.json")
    with pytest.raises(ValueError, match=r"tokenizer file '~/missing.json' does not exist"):
        tokenizer_module.load_tokenizer("~/missing.json")
