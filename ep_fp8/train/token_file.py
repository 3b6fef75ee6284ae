"""Prepared token files: documents tokenized once, ahead of training, into a file (or
several shards of one corpus) that every rank maps instead of tokenizing the text itself at
start-up.

Layout: a header of HEADER_BYTES bytes (MAGIC, then a JSON object, padded with spaces),
then the token stream as little-endian int16 (up to 32768 token ids) or int32. The JSON
names the dtype, the token count, the documents' hash (the same hash TokenFileSource
computes, so both sources give a run the same samples and fingerprint) and the tokenizer.
A shard (prepare_data --shards N) also names its index, N and its corpus (a hash of the
names and sizes of all the corpus's files), so that a run can tell that a glob of shards
holds each of the N exactly once. Every file also names its inputs: a hash of the contents
of all the files it was prepared from (in shards, of the whole corpus), so that held-out
data prepared from the training corpus in another cut is recognised. Shard i holds the
i-th of N contiguous runs of the sorted input files, so the shards read in order of their
names hold the tokens one file prepared from all the inputs would.

A file is written under a temporary name in the same folder and renamed into place only
once complete and flushed to disk: an interrupted or failed preparation leaves the
destination as it was. Readers check the header and the file's size against it.
"""

from __future__ import annotations

import bisect
import ctypes
import fnmatch
import functools
import hashlib
import itertools
import json
import os
import time
from typing import NamedTuple

import torch

from ep_fp8.paths import new_file
from ep_fp8.train.data import (TOKEN_FILE_MAGIC, file_fingerprint, file_identity, list_files,
                               token_chunks, token_dtype)
from ep_fp8.train.tokenizer import load_tokenizer

MAGIC = TOKEN_FILE_MAGIC
HEADER_BYTES = 4096
VERSION = 1
_DTYPES = {"int16": torch.int16, "int32": torch.int32}
_WRITE_TOKENS = 1 << 22   # tokens gathered before each write (token_chunks)
_KEYS = {"version": int, "dtype": str, "tokens": int, "documents": int, "files": int,
         "hash": str, "tokenizer": str, "vocab_size": int, "source": str}
_SHARD_KEYS = {"shard": int, "shards": int, "corpus": str}   # present in shards only


def _as_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a contiguous CPU tensor, copied once (in the machine's byte order:
    little-endian on the x86-64 and Arm hosts of GPUs)."""
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def shard_path(out: str, shard: int, shards: int) -> str:
    """The name of shard `shard` of `shards` for --out `out`: `-00003-of-00016` before its
    extension (data/train.tokens -> data/train-00003-of-00016.tokens), both numbers with
    as many digits (at least 5), so that a glob of the shards lists them in order."""
    root, ext = os.path.splitext(out)
    width = max(5, len(str(shards)))
    return f"{root}-{shard:0{width}d}-of-{shards:0{width}d}{ext}"


def shard_glob(out: str, shards: int) -> str:
    """The glob that names all `shards` shards of --out `out` (for [data] path)."""
    root, ext = os.path.splitext(out)
    return f"{root}-*-of-{shards:0{max(5, len(str(shards)))}d}{ext}"


def split_files(files: list[str], shards: int) -> list[list[str]]:
    """`files` (sorted) cut into `shards` contiguous, non-empty runs of about equal bytes: run
    i ends at the file boundary nearest to i / shards of the bytes (a file is never split).
    The same files of the same sizes give the same runs on every machine. Raises ValueError
    when there are fewer files than shards."""
    if not 1 <= shards <= len(files):
        raise ValueError(f"--shards {shards}: must be in [1, {len(files)}], the number of input "
                         f"files (a file is never split across shards)")
    starts = list(itertools.accumulate((os.path.getsize(p) for p in files), initial=0))
    bounds = [0]
    for i in range(1, shards):
        target = i * starts[-1] / shards
        at = bisect.bisect_left(starts, target)
        if at > 0 and target - starts[at - 1] <= starts[at] - target:
            at -= 1   # the boundary below is as near
        bounds.append(min(max(at, bounds[-1] + 1), len(files) - (shards - i)))
    bounds.append(len(files))
    return [files[a:b] for a, b in zip(bounds, bounds[1:])]


def corpus_id(files: list[str], source: str, field: str, tokenizer: str, shards: int) -> str:
    """A hash of how a corpus is cut into shards and tokenized: the files' names (relative
    to the folder they share) and sizes, the source, the JSONL field, the tokenizer (as
    named) and the number of shards. Shards prepared on different machines agree on it if
    they see the same files and name the tokenizer alike."""
    folder = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in files])
    digest = hashlib.blake2b(digest_size=8)
    for part in [source, field, tokenizer, str(shards)] + [
            f"{os.path.relpath(os.path.abspath(p), folder)}\0{os.path.getsize(p)}" for p in files]:
        digest.update(part.encode("utf-8", errors="surrogateescape") + b"\0")
    return digest.hexdigest()


def inputs_id(files: list[str], source: str, field: str) -> str:
    """A hash of what the documents of `files` are, wherever the files lie and whatever the
    tokenizer: the files' fingerprints (data.file_fingerprint: size, first and last 4 KiB;
    in any order of the files), the source and the JSONL field. Two preparations of one
    corpus agree on it, in one file or in any number of shards, from its folder or from a
    copy. Raises ValueError naming a file that cannot be read."""
    digest = hashlib.blake2b(f"{source}\0{field}\0".encode("utf-8", errors="surrogateescape"),
                             digest_size=8)
    for one in sorted(file_fingerprint(p) for p in files):
        digest.update(one)
    return digest.hexdigest()


def read_token_files(pattern: str) -> tuple[list[str], list[dict]]:
    """(paths, headers) of the token files of `pattern` ([data] or [validation] path: a
    file, a glob, a ~ path; in list_files's order, sorted), each header checked by
    read_header and all of them by check_token_files. Raises ValueError naming the file and
    what is wrong."""
    paths = list_files(pattern)
    headers = [read_header(p) for p in paths]
    check_token_files(pattern, paths, headers)
    return paths, headers


def check_token_files(pattern: str, paths: list[str], headers: list[dict]) -> None:
    """Checks that the token files `paths` (of `pattern`), with their `headers`, make one
    stream: one tokenizer vocabulary (vocab_size, end-of-document id and dtype alike),
    every corpus that a shard names present whole, each of its shards exactly once, and no
    input files prepared twice (one corpus as a whole file and as shards, or in two shard
    counts: every document would be read twice). Raises ValueError naming the files and
    what is wrong."""
    first = headers[0]
    for path, h in zip(paths, headers):
        if (h["vocab_size"], h["eos_id"], h["dtype"]) != (first["vocab_size"], first["eos_id"],
                                                          first["dtype"]):
            raise ValueError(
                f"token files of {pattern!r} were prepared with different tokenizers: "
                f"{paths[0]!r} with {first['tokenizer']!r} ({first['vocab_size']} tokens, end of "
                f"document {first['eos_id']}), {path!r} with {h['tokenizer']!r} "
                f"({h['vocab_size']} tokens, end of document {h['eos_id']})")
    corpora: dict[str, dict[int, str]] = {}
    for path, h in zip(paths, headers):
        if "corpus" not in h:
            continue
        seen = corpora.setdefault(h["corpus"], {})
        if h["shard"] in seen:
            raise ValueError(f"token files of {pattern!r}: {seen[h['shard']]!r} and {path!r} are "
                             f"both shard {h['shard']} of {h['shards']} of one corpus: keep one")
        seen[h["shard"]] = path
    for corpus, seen in corpora.items():
        one = next(iter(seen.values()))
        shards = headers[paths.index(one)]["shards"]
        missing = sorted(set(range(shards)) - set(seen))
        if not missing:
            continue
        listed = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        advice = (f"Prepare them (prepare_data --shards {shards} keeps the shards already "
                  f"complete) or widen the glob")
        if len(corpora) > 1:
            advice = (f"The glob holds shards of {len(corpora)} preparations (of other files, "
                      f"file sizes, tokenizers or shard counts): remove those of the older "
                      f"one, or prepare again with --overwrite")
        raise ValueError(f"token files of {pattern!r}: {len(missing)} of the {shards} shards of "
                         f"corpus {corpus} ({one!r} is one) are missing: shard(s) {listed}. "
                         f"{advice}")
    # Every corpus whole: now no input files may have been prepared twice.
    cuts: dict[str, tuple[str, str]] = {}   # inputs -> (its preparation, a file of it)
    for path, h in zip(paths, headers):
        if not h.get("inputs"):   # absent in files of earlier releases
            continue
        cut, first_path = cuts.setdefault(h["inputs"], (h.get("corpus", path), path))
        if cut != h.get("corpus", path):
            raise ValueError(
                f"token files of {pattern!r}: {first_path!r} and {path!r} were prepared from the "
                f"same input files (as one file and as shards, or in other shard counts): the "
                f"stream would hold every document twice. Keep one preparation")


def combined_header(headers: list[dict]) -> dict:
    """What a run needs of token files read end to end: their `tokens` summed, the
    `tokenizer`, `vocab_size`, `eos_id` and `dtype` of the first, and a `hash`: the file's
    own for one file, else a hash of all the files' hashes in order."""
    first = headers[0]
    digest = first["hash"]
    if len(headers) > 1:
        digest = hashlib.blake2b("|".join(h["hash"] for h in headers).encode(),
                                 digest_size=8).hexdigest()
    return {"tokens": sum(h["tokens"] for h in headers), "hash": digest,
            **{key: first[key] for key in ("tokenizer", "vocab_size", "eos_id", "dtype")}}


class _Plan(NamedTuple):
    out: str            # the name written (shard_path's for a shard)
    target: str         # its real path
    files: list[str]    # the input files it holds
    inputs: list[str]   # all the input files (of the whole corpus, for a shard)
    extra: dict         # the shard's header keys (empty for no shard)
    tag: str            # progress lines' prefix
    done: dict | None   # the header of the complete shard already there, kept


def _plan(pattern: str, source: str, tokenizer: str, out: str, field: str, overwrite: bool,
          shard: tuple[int, int] | None, layout: tuple[list[str], str, list] | None = None) -> _Plan:
    """What write_token_file writes, checked before anything is tokenized (see there).
    `layout`: (the input files, the corpus id, split_files's runs) when already known."""
    if source not in ("text", "jsonl"):
        raise ValueError(f"source must be \"text\" or \"jsonl\", got {source!r}")
    if not os.path.basename(out):
        raise ValueError(f"output {out!r} must name a file, not a folder")
    if shard is not None and not 0 <= shard[0] < shard[1]:
        raise ValueError(f"--shard {shard[0]}: must be in [0, --shards {shard[1]})")
    if layout is None:
        inputs = list_files(pattern)
        layout = (inputs, "", [inputs]) if shard is None else (
            inputs, corpus_id(inputs, source, field, tokenizer, shard[1]),
            split_files(inputs, shard[1]))
    inputs, corpus, runs = layout
    files, extra, tag = inputs, {}, "[prepare]"
    if shard is not None:
        i, n = shard
        extra = {"shard": i, "shards": n, "corpus": corpus}
        out, files, tag = shard_path(out, i, n), runs[i], f"[prepare shard {i}/{n}]"
    target = os.path.realpath(os.path.expanduser(out))
    if os.path.isdir(target):
        raise ValueError(f"output {out!r} is a folder: give the token file's path")
    if shard is not None and _matches([os.path.abspath(os.path.expanduser(out)), target], pattern):
        raise ValueError(f"output {out!r} would match --path {pattern!r}: shards written "
                         f"first would be read as documents by the others; write them elsewhere")
    if os.path.exists(target) and not overwrite:
        done = _complete_shard(target, extra)
        if done is None:
            raise ValueError(f"output {out!r} exists: remove it or pass --overwrite")
        return _Plan(out, target, files, inputs, extra, tag, done)
    if os.path.exists(target) and file_identity(target) in {file_identity(p) for p in inputs}:
        raise ValueError(f"output {out!r} is one of the files of {pattern!r}: write it elsewhere")
    return _Plan(out, target, files, inputs, extra, tag, None)


def _glob_match(path: str, pattern: str) -> bool:
    """Whether glob.glob(`pattern`, recursive=True) would list `path` (both absolute), were
    it there: name by name, `**` standing for any number of folders (none included) and
    each other name matched by fnmatch, whose `*`, `?` and `[...]` then stay within that
    name. Unlike glob, a `*` also matches names that begin with a dot: it errs towards yes."""
    names, parts = path.strip(os.sep).split(os.sep), pattern.strip(os.sep).split(os.sep)

    @functools.cache
    def match(i: int, j: int) -> bool:
        if j == len(parts):
            return i == len(names)
        if parts[j] == "**":
            return any(match(k, j + 1) for k in range(i, len(names) + 1))
        return i < len(names) and fnmatch.fnmatchcase(names[i], parts[j]) and match(i + 1, j + 1)
    return match(0, 0)


def _matches(paths: list[str], pattern: str) -> bool:
    """Whether a file at one of `paths` (absolute) would be one of list_files(pattern)'s,
    were it there (_glob_match). The pattern's folders before its first wildcard are also
    tried with their symbolic links resolved, as `paths` may name the output's real
    folder."""
    pattern = os.path.abspath(os.path.expanduser(pattern))
    head, rest = pattern, ""
    while any(c in head for c in "*?["):
        head, part = os.path.split(head)
        rest = os.path.join(part, rest) if rest else part
    patterns = {pattern, os.path.join(os.path.realpath(head), rest) if rest else os.path.realpath(head)}
    return any(_glob_match(path, p) for path in paths for p in patterns)


def check_shards(pattern: str, source: str, tokenizer: str, out: str, field: str,
                 overwrite: bool, shards: int) -> list[int]:
    """Checks, before any shard is written, what write_token_file checks for each of the
    `shards` shards (every output, not only the first) and that the tokenizer loads;
    returns the shards already complete (kept unless `overwrite`). Raises ValueError as
    write_token_file does."""
    inputs = list_files(pattern)
    layout = (inputs, corpus_id(inputs, source, field, tokenizer, shards),
              split_files(inputs, shards))
    plans = [_plan(pattern, source, tokenizer, out, field, overwrite, (i, shards), layout)
             for i in range(shards)]
    load_tokenizer(tokenizer)
    return [i for i, plan in enumerate(plans) if plan.done is not None]


def write_token_file(pattern: str, source: str, tokenizer: str, out: str, field: str = "text",
                     overwrite: bool = False, progress=print, every_s: float = 10.0,
                     shard: tuple[int, int] | None = None) -> dict:
    """Tokenizes the documents of `pattern` ("text": each file is a document; "jsonl": each
    line's `field`) with `tokenizer` ("bytes" or a tokenizer.json path) into the token file
    `out` (a symbolic link is followed: its target is written), and returns its header.
    With `shard` = (i, n), writes only shard i of n instead: the i-th run of
    split_files(files, n), to shard_path(out, i, n) (below, `out` means that name); a
    complete shard i of the same corpus already there is kept and its header returned
    (unless `overwrite`), so that a preparation stopped midway can be run again.
    Calls `progress` with a line of counts every `every_s` seconds and once at the end;
    makes `out`'s folder if needed. Holds at most a few million tokens and a batch of
    documents (16 MB, or one larger document), whatever the corpus. `out` appears only once
    complete: under a temporary name in its folder until then, and without `overwrite`
    never over a file that appeared meanwhile. Raises ValueError, before tokenizing, when
    `out` exists (unless `overwrite`), is a folder or one of the input files, or cannot be
    written, when the files or the tokenizer cannot be found, or when there are fewer files
    than shards; and, leaving `out` as it was, naming the file (and line) that cannot be
    read, parsed or tokenized, when the documents hold no token (an empty shard is written:
    its corpus stays whole), or when writing fails (a full disk, say). For a shard, it also
    refuses an `out` that `pattern` would match, and a complete shard counts as kept only
    when prepared from the same files (names and sizes) with the same tokenizer name."""
    plan = _plan(pattern, source, tokenizer, out, field, overwrite, shard)
    out, target, files, extra, tag = plan.out, plan.target, plan.files, plan.extra, plan.tag
    if plan.done is not None:
        progress(f"{tag} {out} is already complete ({plan.done['tokens']:,} tokens), kept")
        return plan.done
    tok = load_tokenizer(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    inputs = inputs_id(plan.inputs, source, field)

    def describe(tokens: int, documents: int, digest: str) -> dict:
        header = {"version": VERSION, "dtype": str(dtype).removeprefix("torch."),
                  "tokens": tokens, "documents": documents, "files": len(files), "hash": digest,
                  "tokenizer": tokenizer, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                  "source": source, "inputs": inputs}
        return header | ({"jsonl_field": field} if source == "jsonl" else {}) | extra

    _header_bytes(describe(2**63, 2**63, "0" * 16), out)   # fits, whatever the counts: else now
    digest = hashlib.blake2b(digest_size=8)
    tokens = documents = 0
    start = last = time.monotonic()
    try:
        with new_file(target, out, overwrite) as f:
            f.write(bytes(HEADER_BYTES))   # the header is written last, once counts are known
            for chunk, n_documents in token_chunks(files, source, tok, field, digest, _WRITE_TOKENS):
                f.write(_as_bytes(chunk))
                tokens += chunk.numel()
                documents += n_documents
                now = time.monotonic()
                if now - last >= every_s:
                    last = now
                    progress(f"{tag} {documents:,} documents, {tokens:,} tokens so far "
                             f"({tokens / (now - start):,.0f} tokens/s)")
            if tokens == 0 and shard is None:   # an empty shard keeps its corpus whole
                raise ValueError(f"data path {pattern!r}: its {len(files)} file(s) hold no "
                                 f"token (only empty documents); {out!r} not written")
            header = describe(tokens, documents, digest.hexdigest())
            f.seek(0)
            f.write(_header_bytes(header, out))
    except OSError as e:
        raise ValueError(f"output {out!r} could not be written ({e.strerror or e})") from None
    progress(f"{tag} wrote {out}: {tokens:,} tokens, {documents:,} documents from "
             f"{len(files):,} file(s) in {time.monotonic() - start:.1f} s ({header['dtype']}, "
             f"tokenizer {tokenizer!r}, vocab_size {tok.vocab_size})")
    return header


def _complete_shard(path: str, shard: dict) -> dict | None:
    """The header of the file at `path` when it is a complete token file and the very shard
    that `shard` ({"shard", "shards", "corpus"}, empty for no shard) describes; else None."""
    if not shard:
        return None
    try:
        header = read_header(path)
    except ValueError:
        return None
    return header if all(header.get(key) == value for key, value in shard.items()) else None


def _header_bytes(header: dict, out: str) -> bytes:
    text = json.dumps(header, sort_keys=True).encode("utf-8")
    if len(MAGIC) + len(text) + 1 > HEADER_BYTES:
        raise ValueError(f"output {out!r}: the header does not fit in {HEADER_BYTES} bytes "
                         f"(the tokenizer path and the JSONL field name take "
                         f"{len(header['tokenizer']) + len(header.get('jsonl_field', ''))} "
                         f"characters of it)")
    return (MAGIC + text + b"\n").ljust(HEADER_BYTES, b" ")


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
    if any(key in header for key in _SHARD_KEYS) and not (
            all(type(header.get(key)) is kind for key, kind in _SHARD_KEYS.items())
            and 0 <= header["shard"] < header["shards"]):
        raise ValueError(f"token file {path!r}: header keys shard {header.get('shard')!r}, "
                         f"shards {header.get('shards')!r} and corpus {header.get('corpus')!r} "
                         f"are not an index below a count and a string")
    if not isinstance(header.get("inputs", ""), str):   # absent in files of earlier releases
        raise ValueError(f"token file {path!r}: header key 'inputs' is not str")
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


def map_token_files(pattern: str) -> tuple[list[torch.Tensor], list[dict]]:
    """(tokens, headers) of the token files of `pattern`, each mapped by map_token_file
    and all checked together by check_token_files (on the headers read from the mappings).
    Raises ValueError as those do."""
    paths = list_files(pattern)
    mapped = [map_token_file(p) for p in paths]
    check_token_files(pattern, paths, [header for _, header in mapped])
    return [tokens for tokens, _ in mapped], [header for _, header in mapped]
