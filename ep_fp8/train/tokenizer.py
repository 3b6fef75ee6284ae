"""Tokenizers for local text: raw bytes (no files, no packages), or a `tokenizer.json`
through the `tokenizers` package when it is installed."""

from __future__ import annotations

import json
import os
import warnings

import torch

# Tokens that mark the end of a document in common tokenizer.json vocabularies (GPT-2 and
# Qwen, Llama 2 and Mistral, Gemma, Llama 3, BERT, DeepSeek), used when no
# tokenizer_config.json beside the file names its eos_token.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]",
              "<｜end▁of▁sentence｜>")


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
        with warnings.catch_warnings():   # read only: .to(dtype) copies (no bytearray copy)
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return torch.frombuffer(raw, dtype=torch.uint8).to(dtype, copy=True)

    def encode_tensors(self, docs: list[bytes | str], dtype: torch.dtype) -> list[torch.Tensor]:
        return [self.encode_tensor(d, dtype) for d in docs]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class JsonTokenizer:
    """A `tokenizer.json` (Hugging Face `tokenizers` format), encoding whole documents: the
    truncation and padding a file may carry are turned off. The end-of-document token is
    the `eos_token` of a `tokenizer_config.json` in the same folder when the vocabulary has
    it, else the first of _EOS_NAMES in the vocabulary, else none (`eos_id` None: documents
    are then simply concatenated). `vocab_size` is the largest id + 1, so that every id the
    tokenizer can give fits an embedding of that size."""

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
        self._tok.no_truncation()  # a saved max_length would cut every document short
        self._tok.no_padding()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise ValueError(f"tokenizer file {path!r} has an empty vocabulary")
        self.path, self.vocab_size = path, max(vocab.values()) + 1
        names = (configured_eos(path), *_EOS_NAMES)
        self.eos_id = next((vocab[n] for n in names if n in vocab), None)

    def encode(self, data: bytes | str) -> list[int]:
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except Exception as e:   # the tokenizers package raises a bare Exception
            raise ValueError(f"tokenizer {self.path!r} cannot encode the text: {e}") from None

    def encode_tensor(self, data: bytes | str, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(self.encode(data), dtype=dtype)

    def encode_tensors(self, docs: list[bytes | str], dtype: torch.dtype) -> list[torch.Tensor]:
        """Each document encoded as encode_tensor does, the batch on the `tokenizers`
        package's threads (encode_batch). Raises ValueError when one cannot be encoded."""
        texts = [d.decode("utf-8", errors="replace") if isinstance(d, bytes) else d for d in docs]
        try:
            encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        except Exception as e:   # the tokenizers package raises a bare Exception
            raise ValueError(f"tokenizer {self.path!r} cannot encode the text: {e}") from None
        return [torch.tensor(e.ids, dtype=dtype) for e in encodings]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def configured_eos(path: str) -> str | None:
    """The eos_token named by tokenizer_config.json beside `path` (a string, or a dict with
    its "content"), or None where there is no such file or key."""
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
    try:
        with open(config, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError, AttributeError):  # missing, unreadable, or not a JSON object
        return None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return eos if isinstance(eos, str) else None


def load_tokenizer(spec: str) -> ByteTokenizer | JsonTokenizer:
    """`spec` is "bytes" or the path of a tokenizer.json (~ expanded). Raises ValueError
    for a missing or unreadable file or a missing `tokenizers` package."""
    if spec == "bytes":
        return ByteTokenizer()
    path = os.path.expanduser(spec)   # ~ as in [data] path and output_dir
    if not os.path.isfile(path):
        raise ValueError(f"tokenizer file {spec!r} does not exist (or use \"bytes\")")
    return JsonTokenizer(path)
