"""Fixtures shared by the training tests."""

import json
import sys
import types

import pytest


class _WordTokenizer:
    """Stands in for tokenizers.Tokenizer (not a dependency): one id per word, and the
    truncation to `max_length` that a saved tokenizer.json can carry."""

    def __init__(self, vocab, max_length=None):
        self.vocab, self.max_length = vocab, max_length

    @classmethod
    def from_file(cls, path):
        spec = json.loads(open(path).read())
        return cls(spec["vocab"], spec.get("truncation"))

    def no_truncation(self):
        self.max_length = None

    def no_padding(self):
        pass

    def get_vocab(self, with_added_tokens=True):
        return dict(self.vocab)

    def get_vocab_size(self, with_added_tokens=True):
        return len(self.vocab)

    def token_to_id(self, token):
        return self.vocab.get(token)

    def encode(self, text, add_special_tokens=False):
        ids = [self.vocab[w] for w in text.split()]
        return types.SimpleNamespace(ids=ids[:self.max_length] if self.max_length else ids)

    def decode(self, ids):
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids)

    def encode_batch(self, texts, add_special_tokens=False):
        self.batches = getattr(self, "batches", 0) + 1
        return [self.encode(t, add_special_tokens) for t in texts]


@pytest.fixture
def word_tokenizer(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", types.SimpleNamespace(Tokenizer=_WordTokenizer))

    def write(vocab, truncation=None, eos_token=None):
        path = tmp_path / "tok" / "tokenizer.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"vocab": vocab, "truncation": truncation}))
        if eos_token is not None:
            (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos_token}))
        return str(path)
    return write


@pytest.fixture
def tensorboard(monkeypatch):
    """torch.utils.tensorboard.SummaryWriter replaced by a recorder: the list it returns
    gets ("open", log_dir, purge_step), (tag, value, step) and ("close",)."""
    log = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            log.append(("open", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            log.append((tag, value, step))

        def close(self):
            log.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=Writer))
    return log
