"""Tokenizers for local text: raw bytes (no files, no packages), or a `tokenizer.json`
through the `tokenizers` package when it is installed."""

from __future__ import annotations

import os

import torch

# Tokens that mark the end of a document in common tokenizer.json vocabularies.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, and 256 as the end-of-document token."""

    vocab_size = 257
    eos_id = 256

    def encode(self, data: bytes | str) -> list[int]:
        return list(data.encode("utf-8") if isinstance(data, str) else data)

    def encode_tensor(self, data: bytes | str, dtype: torch.dtype) -> torch.Tensor:
        """(n,) tensor of `dtype`; no Python int per byte, so 100 MB of text stays cheap."""
        raw = data.encode("utf-8") if isinstance(data, str) else data
        if not raw:
            return torch.empty(0, dtype=dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(dtype)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A `tokenizer.json` (Hugging Face `tokenizers` format). The end-of-document token is
    the first of <|endoftext|>, </s>, <eos>, <|end_of_text|>, [SEP] in its vocabulary, or
    none (documents are then simply concatenated)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ValueError(f"tokenizer {path!r} needs the 'tokenizers' package "
                             "(pip install tokenizers), or use tokenizer = \"bytes\"") from None
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:   # the tokenizers package raises a bare Exception on a bad file
            raise ValueError(f"tokenizer file {path!r} could not be read: {e}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = next((i for i in map(self._tok.token_to_id, _EOS_NAMES) if i is not None),
                           None)

    def encode(self, data: bytes | str) -> list[int]:
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_tensor(self, data: bytes | str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(self.encode(data), dtype=dtype)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(spec: str) -> ByteTokenizer | JsonTokenizer:
    """`spec` is "bytes" or the path of a tokenizer.json. Raises ValueError for a missing
    or unreadable file or a missing `tokenizers` package."""
    if spec == "bytes":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise ValueError(f"tokenizer file {spec!r} does not exist (or use \"bytes\")")
    return JsonTokenizer(spec)
