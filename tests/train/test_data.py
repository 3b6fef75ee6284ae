"""Data: the Markov source's entropy and determinism, text/JSONL windows, rank sharding
and the checkpointed position."""

import json
import math
import sys
import types
from collections import Counter

import pytest
import torch

from ep_fp8.train.data import DataLoader, MarkovSource, TokenFileSource, list_files
from ep_fp8.train.tokenizer import ByteTokenizer, load_tokenizer


def test_markov_samples_follow_the_successor_table_with_entropy_ln_branching():
    src = MarkovSource(vocab=32, branching=4, seq_len=64, seed=3)
    succ = src.successors_VK
    assert all(len(set(row.tolist())) == 4 for row in succ)      # distinct successors
    tokens = src.get(list(range(400)))                            # (400, 65)
    assert tokens.shape == (400, 65) and tokens.dtype == torch.int64
    prev, nxt = tokens[:, :-1].flatten(), tokens[:, 1:].flatten()
    assert (succ[prev] == nxt[:, None]).any(dim=1).all()
    # Empirical conditional entropy H(next | prev) from 25,600 transitions; with 32 x 4
    # uniform cells the plug-in estimate is within a few hundredths of ln 4.
    pairs, firsts = Counter(zip(prev.tolist(), nxt.tolist())), Counter(prev.tolist())
    n = len(prev)
    h = -sum(c / n * math.log(c / firsts[p]) for (p, _), c in pairs.items())
    assert abs(h - math.log(4)) < 0.03, h
    assert src.entropy == pytest.approx(math.log(4))


def test_markov_sample_depends_only_on_seed_and_index():
    a = MarkovSource(64, 3, 16, seed=1)
    b = MarkovSource(64, 3, 16, seed=1)
    assert torch.equal(a.get([5, 9, 2]), torch.stack([b.get([i])[0] for i in (5, 9, 2)]))
    assert not torch.equal(a.get([5]), MarkovSource(64, 3, 16, seed=2).get([5]))


def test_held_out_markov_samples_follow_the_same_chain_but_are_not_training_samples():
    train, held = MarkovSource(64, 4, 24, seed=4), MarkovSource(64, 4, 24, seed=4, held_out=True)
    assert torch.equal(held.successors_VK, train.successors_VK)
    val = held.get(list(range(64)))
    assert (train.successors_VK[val[:, :-1]] == val[:, 1:, None]).any(dim=-1).all()
    assert torch.equal(val, held.get(list(range(64))))   # the same set at every evaluation
    # 64 * 4^24 possible samples: a repeat by chance is out of reach, so any sample the
    # two share would be a training sample drawn again.
    seen = {tuple(row) for row in train.get(list(range(4096))).tolist()}
    assert not seen & {tuple(row) for row in val.tolist()}
    assert held.fingerprint != train.fingerprint


def test_ranks_read_disjoint_rows_that_together_make_the_single_rank_batch():
    src = MarkovSource(64, 3, 8, seed=0)
    one = DataLoader(src, batch_size=4, rank=0, world=1)
    two = [DataLoader(src, batch_size=2, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        inputs, targets = one.next()
        parts = [loader.next() for loader in two]
        assert torch.equal(inputs, torch.cat([p[0] for p in parts]))
        assert torch.equal(targets, torch.cat([p[1] for p in parts]))
        assert torch.equal(inputs[:, 1:], targets[:, :-1])       # targets are shifted inputs


def test_loader_position_resumes_on_another_world_size():
    src = MarkovSource(64, 3, 8, seed=0)
    run = DataLoader(src, batch_size=2, rank=1, world=2)
    run.next()
    run.next()
    resumed = DataLoader(src, batch_size=4, rank=0, world=1)
    resumed.load_state_dict(run.state_dict())
    assert run.state_dict()["samples_seen"] == 8 and resumed.resume_note == ""
    reference = DataLoader(src, batch_size=4, rank=0, world=1)
    reference.next()
    reference.next()
    assert torch.equal(resumed.next()[0], reference.next()[0])


def test_prefetched_batches_are_the_same_batches_and_the_position_counts_only_consumed_ones():
    src = MarkovSource(64, 3, 8, seed=0)
    plain = DataLoader(src, batch_size=2, rank=1, world=2)
    ahead = DataLoader(src, batch_size=2, rank=1, world=2)
    want = [plain.next() for _ in range(7)]
    calls = []
    get = src.get
    src.get = lambda indices: calls.append(list(indices)) or get(indices)
    got = [ahead.next()]
    ahead.prefetch(1, ahead=3)             # three batches in one call of the source
    assert calls[-1] == [6, 7, 10, 11, 14, 15]   # rank 1's rows of global batches 1-3
    assert ahead.state_dict() == {"samples_seen": 4, "source": src.fingerprint}  # 1 batch of 4
    ahead.prefetch(2, ahead=5)             # two are ready: nothing drawn
    assert len(calls) == 2
    got += [ahead.next(), ahead.next()]
    ahead.prefetch(1)                      # one still waiting
    got += [ahead.next(), ahead.next(), ahead.next(), ahead.next()]   # then drawn on demand
    for (i, t), (wi, wt) in zip(got, want, strict=True):
        assert torch.equal(i, wi) and torch.equal(t, wt)
    # A loaded position discards what was drawn for the old one.
    ahead.prefetch(2)
    ahead.load_state_dict({"samples_seen": 0, "source": src.fingerprint})
    assert torch.equal(ahead.next()[0], want[0][0])


def test_text_files_become_one_stream_of_byte_windows_visited_once_per_epoch(tmp_path):
    docs = ["hello world, " * 5, "second file\n" * 4, "ünïcode" * 3]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
    src = TokenFileSource(str(tmp_path / "*.txt"), "text", "bytes", seq_len=10, seed=0)
    stream = []
    for d in docs:                                   # files sorted by name, EOS after each
        stream += list(d.encode("utf-8")) + [256]
    assert src.tokens.tolist() == stream
    n = (len(stream) - 1) // 10
    windows = src.get(list(range(n)))
    expected = sorted(tuple(stream[w * 10: w * 10 + 11]) for w in range(n))
    assert sorted(tuple(w) for w in windows.tolist()) == expected
    assert not torch.equal(src.get(list(range(n))), src.get(list(range(n, 2 * n))))



def test_data_seed_sets_the_window_order_of_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("".join(chr(97 + i % 26) for i in range(400)))
    same = [TokenFileSource(str(tmp_path / "a.txt"), "text", "bytes", seq_len=8, seed=0) for _ in range(2)]
    other = TokenFileSource(str(tmp_path / "a.txt"), "text", "bytes", seq_len=8, seed=1)
    n = same[0].n_windows                              # 50 windows: equal orders by chance 1 in 50!
    first, again, reseeded = (src.get(list(range(n))) for src in (*same, other))
    assert torch.equal(first, again)
    assert not torch.equal(first, reseeded)
    assert sorted(map(tuple, reseeded.tolist())) == sorted(map(tuple, first.tolist()))

def test_jsonl_reads_the_named_field_and_names_the_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "abcdefgh"}) + "\n\n" + json.dumps({"body": "ij"}) + "\n")
    src = TokenFileSource(str(path), "jsonl", "bytes", seq_len=4, seed=0, field="body")
    assert src.tokens.tolist() == list(b"abcdefgh") + [256] + list(b"ij") + [256]
    path.write_text(json.dumps({"body": "ok"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: the JSON object has no field 'body' \\(its "
                                         f"fields: 'text'; \\[data\\] jsonl_field names the one"):
        TokenFileSource(str(path), "jsonl", "bytes", seq_len=1, seed=0, field="body")
    # A byte-order mark opening the file (as some editors write it) is not part of the data.
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"body": "abc"}).encode() + b"\r\n")
    src = TokenFileSource(str(path), "jsonl", "bytes", seq_len=1, seed=0, field="body")
    assert src.tokens.tolist() == list(b"abc") + [256]


def test_jsonl_that_is_not_utf8_is_named_and_a_lone_surrogate_is_replaced(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "abcd"}\n{"text": "caf\xe9 au lait"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not UTF-8 \\(byte 13 of the line"):
        TokenFileSource(str(path), "jsonl", "bytes", seq_len=1, seed=0)
    path.write_text('{"text": "ab\\ud800cd"}\n')   # valid JSON, but no UTF-8 for \ud800
    src = TokenFileSource(str(path), "jsonl", "bytes", seq_len=1, seed=0)
    assert src.tokens.tolist() == list(b"ab?cd") + [256]


def test_a_file_named_with_glob_characters_is_read_and_overlapping_globs_list_files_once(tmp_path):
    named = tmp_path / "data[1].txt"
    named.write_text("abcdefgh")
    assert list_files(str(named)) == [str(named)]
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.txt").write_text("x")
    assert list_files(str(tmp_path / "**" / "**" / "*.txt")) == sorted(
        [str(named), str(tmp_path / "s" / "a.txt")])


def test_a_file_reached_by_a_symbolic_or_hard_link_too_is_read_once_and_a_folder_gets_a_hint(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").symlink_to(tmp_path / "a.txt")
    (tmp_path / "c.txt").hardlink_to(tmp_path / "a.txt")
    assert list_files(str(tmp_path / "*.txt")) == [str(tmp_path / "a.txt")]
    assert TokenFileSource(str(tmp_path / "*.txt"), "text", "bytes", 1, 0).tokens.tolist() == (
        list(b"abc") + [256])
    with pytest.raises(ValueError, match=f"data path '{tmp_path}' is a folder: give its files as a glob, "
                                         rf"e.g. '{tmp_path}/\*\*/\*.txt'"):
        list_files(str(tmp_path))


def test_byte_order_marks_and_empty_documents_add_no_tokens(tmp_path):
    text = tmp_path / "a.txt"
    text.write_bytes(b"\xef\xbb\xbfabcd")
    assert TokenFileSource(str(text), "text", "bytes", seq_len=1, seed=0).tokens.tolist() == list(b"abcd") + [256]
    lines = tmp_path / "d.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf\n" + b'{"text": ""}\n{"text": "ab"}\n{"text": ""}\n')
    assert TokenFileSource(str(lines), "jsonl", "bytes", seq_len=1, seed=0).tokens.tolist() == list(b"ab") + [256]
    # Byte positions in errors count the mark, as an editor would (0-based, as for any line).
    lines.write_bytes(b'\xef\xbb\xbf{"text": "a\xff"}\n')
    with pytest.raises(ValueError, match=f"{lines}:1: not UTF-8 \\(byte 14 of the line"):
        TokenFileSource(str(lines), "jsonl", "bytes", seq_len=1, seed=0)


def test_broken_json_and_an_unreadable_file_are_named(tmp_path, monkeypatch):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ab"}\n{"text": "cd"\n')
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON \\(Expecting ',' delimiter at column 14\\)"):
        TokenFileSource(str(path), "jsonl", "bytes", seq_len=1, seed=0)
    path.write_text('{"text": "abcdef"}\n')
    real_open = open

    def failing_open(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(ValueError, match=f"{path}: cannot be read \\(Permission denied\\)"):
        TokenFileSource(str(path), "jsonl", "bytes", seq_len=1, seed=0)


def test_too_little_text_and_no_match_are_errors(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenFileSource(str(tmp_path / "a.txt"), "text", "bytes", seq_len=8, seed=0)
    with pytest.raises(ValueError, match="matches no file"):
        list_files(str(tmp_path / "*.md"))


def test_byte_tokenizer_round_trip_and_json_tokenizer_errors(tmp_path):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("größe")) == "größe" and tok.vocab_size == 257
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        (tmp_path / "tokenizer.json").write_text("{}")
        with pytest.raises(ValueError, match="needs the 'tokenizers' package"):
            load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_an_unreadable_tokenizer_file_is_a_value_error_naming_it(tmp_path, monkeypatch):
    class Tokenizer:   # stands in for the tokenizers package, which raises a bare Exception
        @staticmethod
        def from_file(path):
            raise Exception("expected ',' or '}' at line 1 column 7")

    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=Tokenizer))
    path = tmp_path / "tokenizer.json"
    path.write_text("{ bad")
    with pytest.raises(ValueError, match=r"tokenizer file .*tokenizer.json' could not be read: expected"):
        load_tokenizer(str(path))


def test_a_tokenizer_json_encodes_whole_documents_despite_a_saved_truncation(word_tokenizer, tmp_path):
    vocab = {"a": 0, "b": 1, "<|endoftext|>": 2}
    (tmp_path / "doc.txt").write_text("a b " * 50)
    src = TokenFileSource(str(tmp_path / "doc.txt"), "text", word_tokenizer(vocab, truncation=8),
                          seq_len=16, seed=0)
    assert src.tokens.tolist() == [0, 1] * 50 + [2] and src.note == ""


def test_a_tokenizer_json_vocab_size_is_its_largest_id_plus_one(word_tokenizer):
    tok = load_tokenizer(word_tokenizer({"a": 0, "b": 1, "<|endoftext|>": 40000}))
    assert tok.vocab_size == 40001 and tok.eos_id == 40000   # 3 tokens, but ids up to 40000


def test_the_end_of_document_token_comes_from_tokenizer_config_then_known_names(word_tokenizer, tmp_path):
    vocab = {"a": 0, "</s>": 1, "<|im_end|>": 2, "<\uff5cend\u2581of\u2581sentence\uff5c>": 3}
    assert load_tokenizer(word_tokenizer(vocab, eos_token={"content": "<|im_end|>"})).eos_id == 2
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert load_tokenizer(str(tmp_path / "tok" / "tokenizer.json")).eos_id == 2
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<absent>"}))
    assert load_tokenizer(str(tmp_path / "tok" / "tokenizer.json")).eos_id == 1   # not in vocab: names
    (tmp_path / "tok" / "tokenizer_config.json").write_text("[not an object]")
    assert load_tokenizer(str(tmp_path / "tok" / "tokenizer.json")).eos_id == 1
    (tmp_path / "tok" / "tokenizer_config.json").unlink()
    del vocab["</s>"]   # DeepSeek's end-of-sentence token is a known name too
    assert load_tokenizer(word_tokenizer(vocab)).eos_id == 3


def test_a_tokenizer_without_an_end_of_document_token_says_so(word_tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("a b a b a b")
    (tmp_path / "b.txt").write_text("b a b a b a")
    path = word_tokenizer({"a": 0, "b": 1})
    src = TokenFileSource(str(tmp_path / "*.txt"), "text", path, seq_len=4, seed=0)
    assert src.tokens.tolist() == [0, 1] * 3 + [1, 0] * 3   # joined without a separator
    assert "has no end-of-document token" in src.note and path in src.note


def test_an_empty_vocabulary_or_text_it_cannot_encode_is_a_value_error(word_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="has an empty vocabulary"):
        load_tokenizer(word_tokenizer({}))
    (tmp_path / "doc.txt").write_text("a b unknown")   # the stand-in, like a WordLevel model
    with pytest.raises(ValueError, match=r"tokenizer .*tokenizer.json' cannot encode the text"):   # without [UNK], fails
        TokenFileSource(str(tmp_path / "doc.txt"), "text", word_tokenizer({"a": 0, "b": 1}), seq_len=1, seed=0)


def test_a_document_the_tokenizer_cannot_encode_is_named_by_file_and_line(tmp_path, monkeypatch):
    import ep_fp8.train.data as data

    class Picky(ByteTokenizer):
        def encode_tensor(self, doc, dtype):
            if b"zzz" in doc:
                raise ValueError("tokenizer 'picky' cannot encode the text: 'zzz'")
            return super().encode_tensor(doc, dtype)

    monkeypatch.setattr(data, "load_tokenizer", lambda name: Picky())
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": "zzz"}\n')
    with pytest.raises(ValueError, match=f"^{tmp_path}/a.jsonl:2: tokenizer 'picky' cannot encode"):
        TokenFileSource(str(tmp_path / "a.jsonl"), "jsonl", "picky", seq_len=1, seed=0)
    (tmp_path / "a.jsonl").unlink()
    (tmp_path / "b.txt").write_text("zzz")
    with pytest.raises(ValueError, match=f"^{tmp_path}/b.txt: tokenizer 'picky' cannot encode"):
        TokenFileSource(str(tmp_path / "*"), "text", "picky", seq_len=1, seed=0)


def test_the_fingerprint_changes_with_the_documents_seq_len_and_seed(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefgh" * 4)
    (tmp_path / "b.txt").write_text("ijklmnop" * 4)
    glob_ = str(tmp_path / "*.txt")
    base = TokenFileSource(glob_, "text", "bytes", seq_len=4, seed=0).fingerprint
    assert base == TokenFileSource(glob_, "text", "bytes", seq_len=4, seed=0).fingerprint
    assert base.startswith("66 tokens (documents' hash ") and base.endswith("seq_len 4, seed 0 (rng v2)")
    assert base != TokenFileSource(glob_, "text", "bytes", seq_len=8, seed=0).fingerprint
    assert base != TokenFileSource(glob_, "text", "bytes", seq_len=4, seed=1).fingerprint
    (tmp_path / "b.txt").write_text("ijklmnoq" * 4)            # same length, one byte changed
    changed = TokenFileSource(glob_, "text", "bytes", seq_len=4, seed=0).fingerprint
    assert base != changed
    # The documents' bounds count: the same bytes split otherwise are other documents.
    (tmp_path / "a.txt").write_text("abcdefgh" * 4 + "i")
    (tmp_path / "b.txt").write_text("jklmnoq" + "ijklmnoq" * 3)
    assert changed != TokenFileSource(glob_, "text", "bytes", seq_len=4, seed=0).fingerprint


def test_a_position_saved_with_other_data_is_loaded_with_a_note(tmp_path):
    saved = DataLoader(MarkovSource(16, 2, 4, seed=0), batch_size=2, rank=0, world=1)
    saved.next()
    state = saved.state_dict()
    assert state == {"samples_seen": 2, "source": "synthetic vocab 16 branching 2, seq_len 4, seed 0 (rng v2)"}
    same = DataLoader(MarkovSource(16, 2, 4, seed=0), batch_size=2, rank=0, world=1)
    same.load_state_dict(state)
    assert same.samples_seen == 2 and same.resume_note == ""
    other = DataLoader(MarkovSource(16, 2, 4, seed=1), batch_size=2, rank=0, world=1)
    other.load_state_dict(state)
    assert other.samples_seen == 2
    assert other.resume_note.startswith("[data] differs from the checkpoint's (saved with "
                                        "synthetic vocab 16 branching 2, seq_len 4, seed 0 (rng v2); now "
                                        "synthetic vocab 16 branching 2, seq_len 4, seed 1 (rng v2))")
    older = DataLoader(MarkovSource(16, 2, 4, seed=1), batch_size=2, rank=0, world=1)
    older.load_state_dict({"samples_seen": 6})                    # saved before fingerprints
    assert older.samples_seen == 6 and older.resume_note == ""
    # Saved while seed 0 drew other samples (generator seeds seed * 1_000_003 + index).
    v1 = DataLoader(MarkovSource(16, 2, 4, seed=0), batch_size=2, rank=0, world=1)
    v1.load_state_dict({"samples_seen": 2, "source": "synthetic vocab 16 branching 2, seq_len 4, seed 0"})
    assert "another sample order" in v1.resume_note


def test_a_tokenizer_json_encodes_documents_in_batches_and_names_the_one_that_fails(
        word_tokenizer, tmp_path, monkeypatch):
    import ep_fp8.train.data as data

    monkeypatch.setattr(data, "_BATCH_DOCS", 4)
    g = torch.Generator().manual_seed(0)
    words = ["a", "b", "c"]
    lines = [" ".join(words[int(i)] for i in torch.randint(3, (5 + j,), generator=g)) for j in range(10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    tok = word_tokenizer({"a": 0, "b": 1, "c": 2, "<|endoftext|>": 3})
    src = TokenFileSource(str(tmp_path / "d.jsonl"), "jsonl", tok, seq_len=4, seed=0)
    expected = [i for t in lines for i in [words.index(w) for w in t.split()] + [3]]
    assert src.tokens.tolist() == expected
    assert src.tokenizer._tok.batches == 3                   # 10 documents, 4 per batch
    lines[6] = "a b unknown"
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    with pytest.raises(ValueError, match=f"^{tmp_path}/d.jsonl:7: tokenizer .* cannot encode"):
        TokenFileSource(str(tmp_path / "d.jsonl"), "jsonl", tok, seq_len=4, seed=0)
