"""Prepared token files: documents tokenized once, ahead of training, into one file that
every rank maps instead of tokenizing the text itself at start-up.

Layout: a header of HEADER_BYTES bytes (MAGIC, then a JSON object, padded with spaces),
then the token stream as little-endian int16 (up to 32768 token ids) or int32. The JSON
names the dtype, the token count, the documents' hash (the same hash TokenFileSource
computes, so both sources give a run the same samples and fingerprint) and the tokenizer.

A file is written under a temporary name in the same folder and renamed into place only
once complete and flushed to disk: an interrupted or failed preparation leaves the
destination as it was. Readers check the header and the file's size against it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import time

import torch

from ep_fp8.train.data import file_identity, list_files, token_chunks, token_dtype
from ep_fp8.train.tokenizer import load_tokenizer

MAGIC = b"EPFP8TOK"
HEADER_BYTES = 4096
VERSION = 1
_DTYPES = {"int16": torch.int16, "int32": torch.int32}
_WRITE_TOKENS = 1 << 22   # tokens gathered before each write (token_chunks)
_KEYS = {"version": int, "dtype": str, "tokens": int, "documents": int, "files": int,
         "hash": str, "tokenizer": str, "vocab_size": int, "source": str}


def _as_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a contiguous CPU tensor, copied once (in the machine's byte order:
    little-endian on the x86-64 and Arm hosts of GPUs)."""
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def token_file_path(pattern: str) -> str:
    """The one file that `pattern` ([data] or [validation] path: a file, or a glob or ~
    path that matches exactly one file) names. Raises ValueError otherwise."""
    files = list_files(pattern)
    if len(files) != 1:
        raise ValueError(f"path {pattern!r} matches {len(files)} files; source = \"tokens\" "
                         f"reads one token file (python -m ep_fp8.train.prepare_data writes it)")
    return files[0]


def write_token_file(pattern: str, source: str, tokenizer: str, out: str, field: str = "text",
                     overwrite: bool = False, progress=print, every_s: float = 10.0) -> dict:
    """Tokenizes the documents of `pattern` ("text": each file is a document; "jsonl": each
    line's `field`) with `tokenizer` ("bytes" or a tokenizer.json path) into the token file
    `out` (a symbolic link is followed: its target is written), and returns its header.
    Calls `progress` with a line of counts every `every_s` seconds and once at the end;
    makes `out`'s folder if needed. Holds at most a few million tokens and a batch of
    documents (16 MB, or one larger document), whatever the corpus. `out` appears only once
    complete: under a temporary name in its folder until then, and without `overwrite`
    never over a file that appeared meanwhile. Raises ValueError, before tokenizing, when `out` exists (unless
    `overwrite`), is a folder or one of the input files, or cannot be written, or when the
    files or the tokenizer cannot be found; and, leaving `out` as it was, naming the file
    (and line) that cannot be read, parsed or tokenized, when the documents hold no token,
    or when writing fails (a full disk, say)."""
    if source not in ("text", "jsonl"):
        raise ValueError(f"source must be \"text\" or \"jsonl\", got {source!r}")
    if not os.path.basename(out):
        raise ValueError(f"output {out!r} must name a file, not a folder")
    target = os.path.realpath(os.path.expanduser(out))
    if os.path.isdir(target):
        raise ValueError(f"output {out!r} is a folder: give the token file's path")
    if os.path.exists(target) and not overwrite:
        raise ValueError(f"output {out!r} exists: remove it or pass --overwrite")
    files = list_files(pattern)
    if os.path.exists(target) and file_identity(target) in {file_identity(p) for p in files}:
        raise ValueError(f"output {out!r} is one of the files of {pattern!r}: write it elsewhere")
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)

    def describe(tokens: int, documents: int, digest: str) -> dict:
        header = {"version": VERSION, "dtype": str(dtype).removeprefix("torch."),
                  "tokens": tokens, "documents": documents, "files": len(files), "hash": digest,
                  "tokenizer": tokenizer, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                  "source": source}
        return header | ({"jsonl_field": field} if source == "jsonl" else {})

    _header_bytes(describe(2**63, 2**63, "0" * 16), out)   # fits, whatever the counts: else now
    folder = os.path.dirname(target)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output {out!r}: its folder cannot be made ({e.strerror or e})") from None
    tmp = os.path.join(folder, f".{os.path.basename(target)}.tmp-{os.getpid()}")
    try:
        f = open(tmp, "wb")
    except OSError as e:
        raise ValueError(f"output {out!r} cannot be written in {folder!r} ({e.strerror or e})") from None
    digest = hashlib.blake2b(digest_size=8)
    tokens = documents = 0
    start = last = time.monotonic()
    try:
        with f:
            f.write(bytes(HEADER_BYTES))   # the header is written last, once counts are known
            for chunk, n_documents in token_chunks(files, source, tok, field, digest, _WRITE_TOKENS):
                f.write(_as_bytes(chunk))
                tokens += chunk.numel()
                documents += n_documents
                now = time.monotonic()
                if now - last >= every_s:
                    last = now
                    progress(f"[prepare] {documents:,} documents, {tokens:,} tokens so far "
                             f"({tokens / (now - start):,.0f} tokens/s)")
            if tokens == 0:
                raise ValueError(f"data path {pattern!r}: its {len(files)} file(s) hold no "
                                 f"token (only empty documents); {out!r} not written")
            header = describe(tokens, documents, digest.hexdigest())
            f.seek(0)
            f.write(_header_bytes(header, out))
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, target, out, overwrite)
    except OSError as e:
        raise ValueError(f"output {out!r} could not be written ({e.strerror or e})") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _fsync_folder(folder)
    progress(f"[prepare] wrote {out}: {tokens:,} tokens, {documents:,} documents from "
             f"{len(files):,} file(s) in {time.monotonic() - start:.1f} s ({header['dtype']}, "
             f"tokenizer {tokenizer!r}, vocab_size {tok.vocab_size})")
    return header


def _publish(tmp: str, target: str, out: str, overwrite: bool) -> None:
    """Gives the complete file at `tmp` its name `target`: with `overwrite` by a rename
    over whatever is there; else by a hard link, which fails rather than replace a file
    that appeared while this one was written (a rename where links are not supported)."""
    if not overwrite:
        try:
            os.link(tmp, target)
            return
        except FileExistsError:
            raise ValueError(f"output {out!r} appeared while it was being prepared (another "
                             f"run?); it was left as it is: remove it or pass --overwrite") from None
        except OSError:   # a file system without hard links
            if os.path.exists(target):
                raise ValueError(f"output {out!r} appeared while it was being prepared; it "
                                 f"was left as it is: remove it or pass --overwrite") from None
    os.replace(tmp, target)


def _header_bytes(header: dict, out: str) -> bytes:
    text = json.dumps(header, sort_keys=True).encode("utf-8")
    if len(MAGIC) + len(text) + 1 > HEADER_BYTES:
        raise ValueError(f"output {out!r}: the header does not fit in {HEADER_BYTES} bytes "
                         f"(the tokenizer path and the JSONL field name take "
                         f"{len(header['tokenizer']) + len(header.get('jsonl_field', ''))} "
                         f"characters of it)")
    return (MAGIC + text + b"\n").ljust(HEADER_BYTES, b" ")


def _fsync_folder(folder: str) -> None:
    """Makes a rename in `folder` durable where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_header(path: str) -> dict:
    """The header of the token file at `path`, checked: its magic, its keys and their
    types, and the file's size against its token count (a file cut short by a failed copy
    is refused). Raises ValueError naming the file and what is wrong."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise ValueError(f"token file {path!r} cannot be read ({e.strerror or e})") from None
    return _parse_header(head, size, path)


def _parse_header(head: bytes, size: int, path: str) -> dict:
    if not head.startswith(MAGIC) or len(head) < HEADER_BYTES:
        raise ValueError(f"{path!r} is not a token file (written by python -m "
                         f"ep_fp8.train.prepare_data): its first bytes are not {MAGIC.decode()}")
    try:
        header = json.loads(head[len(MAGIC):].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"token file {path!r}: its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"token file {path!r}: its header is not a JSON object")
    if header.get("version") != VERSION:
        raise ValueError(f"token file {path!r} has format version {header.get('version')!r}; "
                         f"this ep_fp8 reads version {VERSION}: prepare it again")
    for key, kind in _KEYS.items():
        if not isinstance(header.get(key), kind) or isinstance(header.get(key), bool):
            raise ValueError(f"token file {path!r}: header key {key!r} is missing or not "
                             f"{kind.__name__}")
    eos = header.get("eos_id")
    if header["dtype"] not in _DTYPES or not (eos is None or (isinstance(eos, int)
                                                              and not isinstance(eos, bool))):
        raise ValueError(f"token file {path!r}: header has dtype {header['dtype']!r} "
                         f"(int16 or int32) and eos_id {eos!r} (an int or null)")
    expected = HEADER_BYTES + header["tokens"] * _DTYPES[header["dtype"]].itemsize
    if size != expected:
        raise ValueError(f"token file {path!r} has {size:,} bytes, but its header says "
                         f"{header['tokens']:,} {header['dtype']} tokens ({expected:,} bytes): "
                         f"a partial copy? Copy or prepare it again")
    return header


def map_token_file(path: str) -> tuple[torch.Tensor, dict]:
    """(tokens, header) of the token file at `path` (after ~ expansion): the tokens as a
    1-D int16 or int32 tensor (the header's dtype) mapped from the file, copy-on-write
    (pages are read when touched and shared with every process that maps the file; a
    write to the tensor never reaches the file). The header is read from the mapping
    itself, so a file replaced meanwhile (renamed over) cannot pair one file's header
    with another's tokens; a file rewritten in place while mapped changes under the run,
    which is why prepare_data renames. Raises ValueError as read_header does."""
    path = os.path.expanduser(path)
    header = read_header(path)   # a clear error before mapping anything
    try:
        raw = torch.from_file(path, shared=False, size=os.path.getsize(path), dtype=torch.uint8)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"token file {path!r} cannot be mapped ({e})") from None
    header = _parse_header(_as_bytes(raw[:HEADER_BYTES]), raw.numel(), path)
    return raw[HEADER_BYTES:].view(_DTYPES[header["dtype"]]), header
