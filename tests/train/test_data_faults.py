"""Behaviours of the data pipeline (ep_fp8.train.data, token_file and tokenizer) that the
other data tests leave open: the file fingerprint's tail; JSONL fields that are not strings
and byte-order marks past the first line; the first-tokens hash of a stream in parts; a
blend corpus's own order after drawing; a batch that fails to encode as a whole; int16
tokens up to 32768 ids; the documents' hash of the same bytes cut elsewhere and of two
token files; blend_counts' rounding and its refusal just under one sample per block; each
corpus of an uneven blend walking its samples in order; the data seed in a blend's
interleaving; a failing blend corpus named blend[i]; a tokenizer.json adding no special
tokens; and a folder given as a tokenizer."""

import hashlib
import json
import sys
import types

import pytest
import torch

from ep_fp8.train import data
from ep_fp8.train.data import (BLEND_BLOCK, BlendedSource, MarkovSource, TokenFileSource,
                               build_source,
                               _TokenWindows, blend_counts, file_fingerprint, token_dtype,
                               tokenize_documents)
from ep_fp8.train.token_file import combined_header, write_token_file
from ep_fp8.train.tokenizer import ByteTokenizer, load_tokenizer
from tests.train.conftest import _WordTokenizer
from tests.train.test_data_blend import _blend


def test_the_file_fingerprint_reads_the_last_4_kib_of_a_long_file(tmp_path):
    """Files of one size and the same first 8 KiB that differ only near their end are not
    copies: the fingerprint's tail is the file's last 4 KiB, not the bytes after its head."""
    g = torch.Generator().manual_seed(0)
    body = bytes(torch.randint(97, 123, (20000,), generator=g, dtype=torch.uint8).tolist())
    (tmp_path / "a.txt").write_bytes(body)
    (tmp_path / "b.txt").write_bytes(body[:-10] + b"0123456789")
    (tmp_path / "c.txt").write_bytes(body)
    a, b, c = (file_fingerprint(str(tmp_path / n)) for n in ("a.txt", "b.txt", "c.txt"))
    assert a != b and a == c


def test_a_jsonl_field_that_is_not_a_string_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": 5}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: field 'text' is not a string"):
        TokenFileSource(str(path), "jsonl", "bytes", seq_len=1, seed=0)


def test_a_byte_order_mark_is_skipped_only_at_the_start_of_a_jsonl_file(tmp_path):
    """A BOM opens a file (some editors write one); on a later line it is not JSON, and
    the error names that line."""
    path = tmp_path / "d.jsonl"
    bom = b"\xef\xbb\xbf"
    path.write_bytes(bom + b'{"text": "ab"}\n' + bom + b'{"text": "cd"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        TokenFileSource(str(path), "jsonl", "bytes", seq_len=1, seed=0)


def test_the_first_tokens_hash_of_a_stream_in_parts_stops_at_its_first_tokens(monkeypatch):
    """The fingerprint hashes the stream's first _FINGERPRINT_TOKENS tokens, counted across
    its parts (shards): tokens past them, in a later part, do not change it."""
    monkeypatch.setattr(data, "_FINGERPRINT_TOKENS", 4)
    a = torch.arange(10, dtype=torch.int16)
    b = a.clone()
    b[6:] = 0
    one = _TokenWindows([a[:3], a[3:]], "d", "x", seq_len=2, seed=0)
    two = _TokenWindows([b[:3], b[3:]], "d", "x", seq_len=2, seed=0)
    assert one.fingerprint == two.fingerprint
    b[3] = 9   # the 4th token: inside the hashed head
    assert _TokenWindows([b[:3], b[3:]], "d", "x", seq_len=2, seed=0).fingerprint != one.fingerprint


def test_a_corpus_made_part_of_a_blend_after_drawing_takes_the_blend_order(tmp_path):
    """as_blend_corpus gives the windows an order of their own even when the corpus has
    already drawn (and cached) an epoch's order as a lone corpus."""
    (tmp_path / "a.txt").write_text("abcdefghijklmnopqrstuvwxyz" * 8)
    pattern = str(tmp_path / "*.txt")
    used = TokenFileSource(pattern, "text", "bytes", seq_len=4, seed=0)
    alone = used.get(list(range(used.n_windows)))
    used.as_blend_corpus(1)
    fresh = TokenFileSource(pattern, "text", "bytes", seq_len=4, seed=0)
    fresh.as_blend_corpus(1)
    n = fresh.n_windows
    assert not torch.equal(fresh.get(list(range(n))), alone)
    assert torch.equal(used.get(list(range(n))), fresh.get(list(range(n))))


class _FailsOnBatches(ByteTokenizer):
    """Encodes one document at a time, fails on a batch of several."""

    def encode_tensors(self, docs, dtype):
        if len(docs) > 1:
            raise ValueError("cannot encode a batch")
        return super().encode_tensors(docs, dtype)


def test_a_batch_that_fails_although_each_document_encodes_is_an_error_not_dropped(tmp_path):
    """When a batch of documents cannot be encoded but no single one fails, the error
    stands: the batch's documents are not silently left out of the stream."""
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document {i}")
    files = sorted(str(p) for p in tmp_path.glob("*.txt"))
    with pytest.raises(ValueError, match="cannot encode a batch"):
        list(tokenize_documents(files, "text", _FailsOnBatches(), "text", hashlib.blake2b()))


def test_token_ids_up_to_32768_are_held_in_two_bytes():
    """2 bytes per token up to a vocabulary of 32768 ids (0 .. 32767 fit int16), 4 above."""
    assert token_dtype(257) == token_dtype(2**15) == torch.int16
    assert token_dtype(2**15 + 1) == torch.int32


def test_the_documents_hash_tells_the_same_bytes_cut_into_other_documents(tmp_path):
    """A token file's documents' hash (header "hash", which the held-out checks and the
    fingerprint use) counts where each document ends, not only the bytes read end to end."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    (tmp_path / "one" / "a.txt").write_text("abcdefgh")
    (tmp_path / "one" / "b.txt").write_text("ijklmnop")
    (tmp_path / "two" / "a.txt").write_text("abcdefghi")
    (tmp_path / "two" / "b.txt").write_text("jklmnop")
    one, two = (write_token_file(str(tmp_path / d / "*.txt"), "text", "bytes",
                                 str(tmp_path / f"{d}.tokens"), progress=lambda line: None)
                for d in ("one", "two"))
    assert one["tokens"] == two["tokens"] and one["hash"] != two["hash"]


@pytest.mark.parametrize("weights, counts", [
    ([5, 3, 2], [2048, 1229, 819]),         # quotas 2048, 1228.8, 819.2: the largest remainder
    ([1, 1, 1], [1366, 1365, 1365]),        # three remainders of 1/3: the first on ties
])
def test_blend_counts_give_the_spare_samples_to_the_largest_remainders_first_on_ties(
        weights, counts):
    assert blend_counts(weights) == counts


def test_each_corpus_of_an_uneven_blend_walks_its_samples_in_order_across_blocks():
    """Over several blocks of a [3, 1] blend, the samples drawn from each corpus are its
    samples 0, 1, 2, ... in order: none repeated, none skipped at a block's start."""
    sources = [MarkovSource(16, 2, 4, seed=s) for s in (0, 1)]
    blend = BlendedSource(sources, [3, 1], seed=5)
    drawn = [[], []]
    for g in range(3 * BLEND_BLOCK):
        c, k = blend.locate(g)
        drawn[c].append(k)
    assert [len(d) for d in drawn] == [3 * n for n in blend.counts] == [9216, 3072]
    assert drawn == [list(range(9216)), list(range(3072))]


class _AddsStartToken(_WordTokenizer):
    """A tokenizer.json with a post-processor: asked for special tokens, it opens every
    text with <s> (id 0), as Llama's does."""

    def encode(self, text, add_special_tokens=True):
        out = super().encode(text)
        return types.SimpleNamespace(ids=[0] * add_special_tokens + out.ids)

    def encode_batch(self, texts, add_special_tokens=True):
        return [self.encode(t, add_special_tokens) for t in texts]


def test_a_tokenizer_json_adds_no_special_tokens_to_a_document(tmp_path, monkeypatch):
    """Documents are encoded without the tokenizer's special tokens (a start token on each
    document would be trained on as text), one at a time or in batches."""
    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=_AddsStartToken))
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"vocab": {"<s>": 0, "a": 1, "b": 2, "</s>": 3}}))
    tok = load_tokenizer(str(path))
    assert tok.encode("a b a") == [1, 2, 1]
    assert tok.encode_tensor("b a", torch.int16).tolist() == [2, 1]
    assert [t.tolist() for t in tok.encode_tensors(["a", "b b"], torch.int16)] == [[1], [2, 2]]


def test_a_folder_given_as_tokenizer_is_named_as_no_tokenizer_file(tmp_path, monkeypatch):
    """A folder (a model's, say) is not a tokenizer.json: the error says so, rather than
    asking for the `tokenizers` package or reading the folder as a file."""
    monkeypatch.setitem(sys.modules, "tokenizers", None)   # not installed: import fails
    with pytest.raises(ValueError, match=f"tokenizer file '{tmp_path}' does not exist"):
        load_tokenizer(str(tmp_path))


def test_the_data_seed_sets_the_blend_s_interleaving(tmp_path):
    """[data] seed shuffles the blend's blocks too: which corpus each sample comes from."""
    def corpora(seed):
        cfg = _blend(tmp_path, (1, 1))
        cfg.data.seed = seed
        source = build_source(cfg)
        return [source.locate(g)[0] for g in range(256)]
    assert corpora(1) != corpora(2) and corpora(1) == corpora(1)


def test_a_blend_corpus_that_cannot_be_read_at_start_up_is_named_by_its_index(tmp_path):
    """A corpus that passed the config's checks but holds too few tokens when the source
    is built (its files changed meanwhile) is named as blend[i]."""
    cfg = _blend(tmp_path, (1, 1))
    for f in (tmp_path / "b").glob("*.txt"):
        f.write_text("")
    (tmp_path / "b" / "0.txt").write_text("bb")
    with pytest.raises(ValueError, match=r"^blend\[1\]: data path .* holds 3 tokens, fewer than"):
        build_source(cfg)


def test_the_documents_hash_of_two_token_files_is_of_both():
    """The documents' hash of token files read end to end is a hash of every file's, in
    order: another second file is another corpus, even with as many tokens."""
    first, second, other = ({"hash": h, "tokens": 10, "tokenizer": "bytes", "vocab_size": 257,
                             "eos_id": 256, "dtype": "int16"} for h in ("a" * 16, "b" * 16, "c" * 16))
    assert combined_header([first])["hash"] == first["hash"]
    two = combined_header([first, second])
    assert two["tokens"] == 20 and two["hash"] not in (first["hash"], second["hash"])
    assert combined_header([first, other])["hash"] != two["hash"]
    assert combined_header([second, first])["hash"] != two["hash"]


def test_a_weight_just_below_one_block_sample_is_refused():
    """A corpus whose quota is under 1 sample per block (here 4096/4097) is refused, not
    drawn 0 or 1 times per block by rounding."""
    with pytest.raises(ValueError, match=r"blend_weights\[1\] = 1 is below 1/4096"):
        blend_counts([BLEND_BLOCK, 1])
    assert blend_counts([BLEND_BLOCK - 1, 1]) == [BLEND_BLOCK - 1, 1]
