"""Training data: a synthetic Markov chain with a known entropy, local text / JSONL, or a
token file prepared from them (ep_fp8.train.token_file); or a blend of several such corpora
in fixed proportions (BlendedSource).

Every source is a list of samples addressed by a global index g = 0, 1, 2, ...; a sample
is seq_len + 1 tokens (inputs are the first seq_len, targets the last seq_len). Step after
step the loader walks that list, one global batch (world_size * batch_size samples) at a
time, and rank r reads only its own rows r*B .. (r+1)*B - 1 of each global batch. Its one
piece of state is the number of samples consumed globally, which does not depend on the
world size: a run resumed on a different number of ranks continues the same sample
sequence, and with the same global batch it sees exactly the same batches.
"""

from __future__ import annotations

import bisect
import collections
import glob
import hashlib
import itertools
import json
import math
import os
import time

import torch

from ep_fp8 import rng
from ep_fp8.train.tokenizer import load_tokenizer


def file_identity(path: str) -> tuple[int, int]:
    """(device, inode) of the file at `path`, following symbolic links: equal for every
    name of one file (hard links too). Raises OSError when it cannot be read."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


_FINGERPRINT_SAMPLE = 4096   # bytes read from each end of a file by file_fingerprint
_FINGERPRINT_TOKENS = 1 << 20   # tokens hashed into a token stream's fingerprint


def file_fingerprint(path: str) -> bytes:
    """A hash of the file at `path` by content: its size and its first and last 4 KiB.
    Equal for copies of a file anywhere; reads at most 8 KiB. Raises ValueError naming the
    file when it cannot be read."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_FINGERPRINT_SAMPLE)
            f.seek(max(size - _FINGERPRINT_SAMPLE, len(head)))
            tail = f.read(_FINGERPRINT_SAMPLE)
    except OSError as e:
        raise ValueError(f"file {path!r} cannot be read ({e.strerror or e})") from None
    return hashlib.blake2b(f"{size}\0".encode() + head + b"\0" + tail, digest_size=16).digest()


def list_files(pattern: str) -> list[str]:
    """Files matching `pattern` (a path or a glob; `**` recurses), sorted and each once (a
    file reached twice, by a symbolic or hard link or by two names, is read at its first
    name), so every rank and every run sees the same order. An existing file is taken as
    it is named, even when its name holds glob characters ([, *, ?). Raises ValueError when
    nothing matches, or when `pattern` is a folder."""
    path = os.path.expanduser(pattern)
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        raise ValueError(f"data path {pattern!r} is a folder: give its files as a glob, e.g. "
                         f"'{pattern.rstrip('/')}/**/*.txt'")
    first: dict[tuple[int, int], str] = {}
    for p in sorted(glob.glob(path, recursive=True)):
        if os.path.isfile(p):
            first.setdefault(file_identity(p), p)
    if not first:
        raise ValueError(f"data path {pattern!r} matches no file")
    return sorted(first.values())


def _generator(seed: int, index: int) -> torch.Generator:
    # One generator per (seed, index) makes a sample independent of which rank or which
    # batch asks for it. Generator seeds are 32 bits (ep_fp8.rng), so indices 2^32 apart
    # share a generator: training's samples count up from 0, the chain is drawn at -1 and
    # held-out samples count down from -2, so training sample j meets held-out sample i
    # only at j = 2^32 - 2 - i, past 4 billion samples.
    return rng.generator(seed, "data", index)


class MarkovSource:
    """A seeded first-order Markov chain over `vocab` tokens. From every token the next is
    drawn uniformly among `branching` distinct successors, so every row of the transition
    matrix has entropy ln(branching) and so does the chain: `entropy` is the lowest mean
    cross-entropy (nats per token) any model can reach on it.

    Successors of token s are (r_s + c_j) mod vocab, j < branching, with c distinct random
    offsets shared by all rows and r_s a random shift per row: distinct by construction,
    and O(vocab * branching) to build. `held_out` draws the samples of the same chain from
    indices that training does not reach in its first 4 billion samples (validation data).
    """

    note = ""  # nothing to say at start-up (TokenFileSource may have)

    def __init__(self, vocab: int, branching: int, seq_len: int, seed: int, held_out: bool = False):
        if not 1 <= branching <= vocab:
            raise ValueError(f"synthetic_branching must be in [1, synthetic_vocab={vocab}], "
                             f"got {branching}")
        g = _generator(seed, -1)
        offsets_K = torch.randperm(vocab, generator=g)[:branching]
        shift_V = torch.randint(vocab, (vocab, 1), generator=g)
        self.successors_VK = (shift_V + offsets_K[None, :]) % vocab   # (V, K)
        self.vocab, self.branching, self.seq_len, self.seed = vocab, branching, seq_len, seed
        self.entropy = math.log(branching)
        self.held_out = held_out
        # What fixes the sample sequence; a resume compares it with the checkpoint's.
        self.fingerprint = (f"synthetic vocab {vocab} branching {branching}, seq_len {seq_len}, "
                            f"seed {seed} (rng v{rng.VERSION})" + (", held out" if held_out else ""))

    def get(self, indices: list[int]) -> torch.Tensor:
        """Samples `indices` as a (len(indices), seq_len + 1) int64 tensor."""
        first_B = torch.empty(len(indices), dtype=torch.int64)
        choice_BL = torch.empty(len(indices), self.seq_len, dtype=torch.int64)
        for i, index in enumerate(indices):
            # Held-out sample i at index -2 - i (see _generator).
            g = _generator(self.seed, -2 - index if self.held_out else index)
            first_B[i] = torch.randint(self.vocab, (1,), generator=g)
            choice_BL[i] = torch.randint(self.branching, (self.seq_len,), generator=g)
        tokens = [first_B]
        for t in range(self.seq_len):
            tokens.append(self.successors_VK[tokens[-1], choice_BL[:, t]])
        return torch.stack(tokens, dim=1)


TOKEN_FILE_MAGIC = b"EPFP8TOK"   # a token file's first bytes (ep_fp8.train.token_file)
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark, which some editors put at a file's start


def _documents(files: list[str], source: str, field: str):
    """Yields (where, document as bytes) for each document: a whole file ("text", where is
    its path), or the `field` string of each line of a JSONL file ("jsonl", where is
    path:line). A byte-order mark at the start of a file is skipped. Raises ValueError
    naming the file (and line) that cannot be read or parsed."""
    for path in files:
        try:
            with open(path, "rb") as f:
                if f.read(len(TOKEN_FILE_MAGIC)) == TOKEN_FILE_MAGIC:
                    raise ValueError(f"{path}: is a token file (prepare_data wrote it), not "
                                     f"{source}: read it with source = \"tokens\", or give a "
                                     f"path that does not match it")
                f.seek(0)
                if source == "text":
                    yield path, f.read().removeprefix(_BOM)
                    continue
                yield from _jsonl_texts(f, path, field)
        except OSError as e:
            raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None


def _jsonl_texts(f, path: str, field: str):
    for lineno, line in enumerate(f, 1):
        skipped = len(_BOM) if lineno == 1 and line.startswith(_BOM) else 0
        line = line[skipped:]
        if not line.strip():
            continue
        try:
            line = line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {e.start + skipped} of the "
                             f"line: {e.reason})") from None
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column "
                             f"{e.colno + (skipped > 0)})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path}:{lineno}: not a JSON object with a string field {field!r}")
        if field not in doc:
            keys = ", ".join(repr(k) for k in list(doc)[:8]) + (", ..." if len(doc) > 8 else "")
            raise ValueError(f"{path}:{lineno}: the JSON object has no field {field!r} (its "
                             f"fields: {keys or 'none'}; [data] jsonl_field names the one to "
                             f"train on)")
        if not isinstance(doc[field], str):
            raise ValueError(f"{path}:{lineno}: field {field!r} is not a string")
        # JSON may escape lone surrogates (\ud800), which UTF-8 cannot hold.
        yield f"{path}:{lineno}", doc[field].encode("utf-8", errors="replace")


class _TokenWindows:
    """Windows of seq_len + 1 tokens over one token stream, held as `parts` (1-D tensors
    read end to end: the token files of a glob, or one tensor), starting every seq_len
    tokens (window w is tokens w*seq_len .. (w+1)*seq_len, so each token is a target once
    per epoch; a window may span two parts). The last (tokens - 1) % seq_len tokens of the
    stream fill no window and are never trained on. Each epoch visits every window once, in
    an order shuffled by (seed, epoch). `fingerprint` names the stream (its length,
    `digest`, a hash of the documents, and a hash of its first 2^20 tokens, which tells
    tokenizers apart), seq_len and seed, which fix the sample sequence:
    the same documents give the same samples whether tokenized at start-up or prepared in
    a file."""

    def __init__(self, parts: list[torch.Tensor], digest: str, where: str, seq_len: int,
                 seed: int, note: str = ""):
        self.parts, self.seq_len, self.seed, self.note = parts, seq_len, seed, note
        self._starts = list(itertools.accumulate((p.numel() for p in parts), initial=0))
        n_tokens = self._starts[-1]
        self.n_windows = (n_tokens - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"data path {where!r} holds {n_tokens} tokens, "
                             f"fewer than seq_len + 1 = {seq_len + 1}")
        # The documents' hash does not see the tokenizer: the hash of the first tokens does
        # (two tokenizers that give as many tokens would otherwise look alike on a resume).
        head, taken = hashlib.blake2b(digest_size=8), 0
        for part in parts:
            piece = part[:_FINGERPRINT_TOKENS - taken]
            head.update(piece.to(torch.int64).numpy().tobytes())
            taken += piece.numel()
        rest = f"seq_len {seq_len}, seed {seed} (rng v{rng.VERSION})"
        self.fingerprint = (f"{n_tokens} tokens (documents' hash {digest}, first tokens' hash "
                            f"{head.hexdigest()}), {rest}")
        # as checkpoints of earlier releases saved it, without the tokens' hash
        self.earlier_fingerprint = f"{n_tokens} tokens (documents' hash {digest}), {rest}"
        self._epoch, self._order, self._stream = -1, None, "data"

    def as_blend_corpus(self, i: int) -> None:
        """Make this corpus i of a blend: its windows in an order of its own (two corpora of
        as many windows would otherwise share one), named in the fingerprint."""
        self._stream, self._epoch = f"data/blend{i}", -1
        self.fingerprint += f", corpus {i} of a blend"

    @property
    def tokens(self) -> torch.Tensor:
        """The whole stream as one tensor (a copy when it is held in several parts)."""
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)

    def _window(self, index: int) -> int:
        epoch, pos = divmod(index, self.n_windows)
        if epoch != self._epoch:
            self._order = torch.randperm(self.n_windows,
                                         generator=rng.generator(self.seed, self._stream, epoch))
            self._epoch = epoch
        return int(self._order[pos])

    def _span(self, a: int, b: int) -> torch.Tensor:
        """Tokens a .. b - 1 of the stream."""
        i = bisect.bisect_right(self._starts, a) - 1
        if b <= self._starts[i + 1]:
            return self.parts[i][a - self._starts[i]: b - self._starts[i]]
        pieces = []
        while a < b:
            while self._starts[i + 1] <= a:   # skips empty parts
                i += 1
            end = min(b, self._starts[i + 1])
            pieces.append(self.parts[i][a - self._starts[i]: end - self._starts[i]])
            a = end
        return torch.cat(pieces)

    def get(self, indices: list[int]) -> torch.Tensor:
        """Samples `indices` as a (len(indices), seq_len + 1) int64 tensor."""
        L = self.seq_len
        rows = [self._span(w * L, w * L + L + 1) for w in map(self._window, indices)]
        return torch.stack(rows).to(torch.int64)


def token_dtype(vocab_size: int) -> torch.dtype:
    """The dtype a token stream is held in: 2 bytes per token up to 32768 ids, else 4."""
    return torch.int16 if vocab_size <= 2**15 else torch.int32


def no_eos_note(tokenizer: str) -> str:
    """What a run says at start-up when `tokenizer` has no end-of-document token."""
    return (f"[data] tokenizer {tokenizer!r} has no end-of-document token: documents are "
            "joined without a separator")


def tokenize_documents(files: list[str], source: str, tokenizer, field: str, digest):
    """Yields, for each non-empty document of `files` ("text" or "jsonl", see _documents)
    in order, its tokens and `tokenizer`'s end-of-document token (empty when it has none),
    two tensors of token_dtype(tokenizer.vocab_size); `digest` (a hashlib object) is
    updated with every document, empty ones too, for the fingerprint. Documents are encoded
    in batches (up to _BATCH_DOCS documents or _BATCH_BYTES bytes), which a tokenizer.json
    encodes on several threads. Raises ValueError naming the file (and line) that cannot be
    read, parsed or tokenized."""
    dtype = token_dtype(tokenizer.vocab_size)
    eos = torch.tensor([] if tokenizer.eos_id is None else [tokenizer.eos_id], dtype=dtype)
    batch, size = [], 0
    for where, doc in _documents(files, source, field):
        digest.update(len(doc).to_bytes(8, "little") + doc)
        if doc:  # an empty document adds nothing, not even its end token
            batch.append((where, doc))
            size += len(doc)
        del doc   # a large file's bytes are held only as long as its batch
        if len(batch) >= _BATCH_DOCS or size >= _BATCH_BYTES:
            yield from _encode(tokenizer, batch, dtype, eos)
            batch, size = [], 0
    yield from _encode(tokenizer, batch, dtype, eos)


_BATCH_DOCS, _BATCH_BYTES = 1024, 1 << 24


def token_chunks(files: list[str], source: str, tokenizer, field: str, digest,
                 max_tokens: int = 1 << 22):
    """The token stream of tokenize_documents(files, source, tokenizer, field, digest) as
    contiguous 1-D chunks of token_dtype(tokenizer.vocab_size), each yielded with the number
    of documents it holds once it reaches `max_tokens` tokens or 4096 documents (two small
    tensors per document add up), so that at most one chunk's pieces are held. Raises
    ValueError as tokenize_documents does."""
    dtype = token_dtype(tokenizer.vocab_size)
    pieces, tokens, documents = [], 0, 0
    for document in tokenize_documents(files, source, tokenizer, field, digest):
        pieces += document
        tokens += sum(p.numel() for p in document)
        documents += 1
        if tokens >= max_tokens or len(pieces) >= 8192:
            yield _join(pieces, dtype), documents
            tokens = documents = 0
    if pieces:
        yield _join(pieces, dtype), documents


def _encode(tokenizer, batch: list[tuple[str, bytes]], dtype: torch.dtype, eos: torch.Tensor):
    if not batch:
        return
    try:
        pieces = tokenizer.encode_tensors([doc for _, doc in batch], dtype)
    except ValueError:
        for where, doc in batch:   # the document that fails, to name it
            try:
                tokenizer.encode_tensors([doc], dtype)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        raise
    batch.clear()
    for piece in pieces:
        yield piece, eos


class TokenFileSource(_TokenWindows):
    """Local text or JSONL files, tokenized at start-up into one token stream (documents
    joined by the tokenizer's end-of-document token; empty documents left out) and cut into
    windows as _TokenWindows says. `note` is what to say at start-up ('' or that the
    tokenizer has no end-of-document token). Every rank holds the whole stream (2 bytes per
    token up to 32768 ids, else 4); loading it takes about twice that at its peak, plus a
    batch of documents read as bytes (16 MB, or one larger document; PreparedTokenSource
    maps a file prepared once instead). Raises ValueError naming the file (and line) that
    cannot be read, parsed or tokenized, or when the stream holds fewer than seq_len + 1
    tokens."""

    def __init__(self, pattern: str, source: str, tokenizer: str, seq_len: int, seed: int,
                 field: str = "text"):
        started = time.monotonic()
        self.tokenizer = load_tokenizer(tokenizer)
        dtype = token_dtype(self.tokenizer.vocab_size)
        digest = hashlib.blake2b(digest_size=8)   # of the documents read, for `fingerprint`
        chunks = [chunk for chunk, _ in token_chunks(list_files(pattern), source, self.tokenizer,
                                                     field, digest)]
        super().__init__([_join(chunks, dtype)], digest.hexdigest(), pattern, seq_len,
                         seed, "" if self.tokenizer.eos_id is not None else no_eos_note(tokenizer))
        self.seconds = time.monotonic() - started   # to read and tokenize, on this rank


class PreparedTokenSource(_TokenWindows):
    """The token files that `path` names (a file, or a glob: files read in sorted order as
    one stream, such as the shards of prepare_data --shards), written by `python -m
    ep_fp8.train.prepare_data` (ep_fp8.train.token_file), mapped rather than read: the
    ranks of a node share their pages through the page cache and a rank's memory holds
    only the windows it draws. Its samples are those of TokenFileSource over the same
    documents and tokenizer, with the same fingerprint for one file (for several, the
    documents' hash is a hash of theirs). `header` is token_file.combined_header's. Raises
    ValueError naming the file when it is not a complete token file, when the files differ
    in tokenizer or miss a shard of their corpus, or when they hold fewer than seq_len + 1
    tokens."""

    def __init__(self, path: str, seq_len: int, seed: int):
        from ep_fp8.train.token_file import combined_header, map_token_files

        parts, headers = map_token_files(path)
        self.header = combined_header(headers)
        super().__init__(parts, self.header["hash"], path, seq_len, seed,
                         "" if self.header["eos_id"] is not None
                         else no_eos_note(self.header["tokenizer"]))


def _join(pieces: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """torch.cat(pieces), emptying `pieces` as it copies them, so that at most one copy
    of the tokens exists besides the result."""
    out = torch.empty(sum(p.numel() for p in pieces), dtype=dtype)
    at = 0
    pieces.reverse()
    while pieces:
        piece = pieces.pop()
        out[at: at + piece.numel()] = piece
        at += piece.numel()
    return out


BLEND_BLOCK = 4096   # samples per block of a blend, each block holding fixed counts per corpus


def blend_counts(weights: list[float], block: int = BLEND_BLOCK) -> list[int]:
    """How many of each `block` consecutive samples of a blend come from each corpus:
    weights / sum(weights) * block, rounded down, plus one for each of the corpora with the
    largest remainders (the first on ties) until they add up to `block`. Raises ValueError
    when a weight is not finite and positive, or is below 1/`block` of their sum."""
    if not weights or not all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0
                              for w in weights):
        raise ValueError(f"blend_weights must be finite and > 0, got {list(weights)}")
    try:
        total = math.fsum(weights)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        raise ValueError(f"blend_weights must add up to a finite number, got {list(weights)}")
    quotas = [w / total * block for w in weights]
    for c, q in enumerate(quotas):
        if q < 1:
            raise ValueError(f"blend_weights[{c}] = {weights[c]:g} is below 1/{block} of the "
                             f"weights' sum {total:g}: that corpus would hardly be drawn")
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda c: (counts[c] - quotas[c], c))
    for c in by_remainder[:block - sum(counts)]:
        counts[c] += 1
    return counts


class _BlendOrder:
    """Which corpus each sample of a blend comes from, and which of that corpus's samples
    it is: from sample `base` on, blocks of BLEND_BLOCK samples each holding `counts[c]`
    samples of corpus c in an order shuffled by (seed, block), and corpus c's samples
    numbered on from offsets[c] (the samples it gave before `base`, under other counts)."""

    def __init__(self, counts: list[int], seed: int, base: int = 0, offsets: list[int] | None = None):
        self.counts, self.seed, self.base = counts, seed, base
        self.offsets = [0] * len(counts) if offsets is None else list(offsets)
        self._labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        self._first = torch.tensor(list(itertools.accumulate(counts, initial=0))[:-1])
        self._block, self._corpus, self._rank = -1, None, None

    def _place(self, block: int) -> None:
        """The corpus of each position of `block` and its rank among that corpus's."""
        if block == self._block:
            return
        perm = torch.randperm(BLEND_BLOCK, generator=rng.generator(self.seed, "blend", block))
        corpus = self._labels[perm]
        # A position's rank among its corpus's positions: sorted by corpus, positions stay
        # in order within each corpus (a stable sort), so the rank is the offset in its run.
        rank = torch.empty(BLEND_BLOCK, dtype=torch.int64)
        order = torch.argsort(corpus, stable=True)
        rank[order] = torch.arange(BLEND_BLOCK) - self._first[corpus[order]]
        self._block, self._corpus, self._rank = block, corpus.tolist(), rank.tolist()

    def locate(self, index: int) -> tuple[int, int]:
        if index < self.base:
            raise ValueError(f"sample {index} precedes sample {self.base}, where the blend's "
                             f"current counts begin")
        block, pos = divmod(index - self.base, BLEND_BLOCK)
        self._place(block)
        c = self._corpus[pos]
        return c, self.offsets[c] + block * self.counts[c] + self._rank[pos]

    def drawn_before(self, index: int) -> list[int]:
        """How many samples of each corpus samples 0 .. index - 1 hold (index >= base)."""
        block, pos = divmod(index - self.base, BLEND_BLOCK)
        self._place(block)
        partial = collections.Counter(self._corpus[:pos])
        return [o + block * n + partial[c] for c, (o, n) in enumerate(zip(self.offsets, self.counts))]


class BlendedSource:
    """Several corpora (sources of their own) drawn in proportion to `weights`. Sample g of
    the run lies in block g // BLEND_BLOCK; every block holds blend_counts(weights) samples
    of each corpus, in an order shuffled by (seed, block), so a prefix of n samples holds
    each corpus's share to within one block's rounding, and every global batch a mix. The
    k-th sample drawn from corpus c is that corpus's own sample k: each corpus walks its
    windows epoch after epoch (build_source gives each an order of its own), so one whose
    weight exceeds its share of the tokens is repeated (more epochs of it) and one below it
    is seen in part. `fingerprint` names the corpora's fingerprints, their counts per block
    and the block rule.

    A run resumed with other weights (resume(): the same corpora, in the same order, and
    seed) continues each corpus at its next sample: from the resumed position on, blocks of
    the new counts begin (counted from that position), and corpus c's samples continue
    from the number it gave before. `position_state()` holds what that needs.
    Raises ValueError when `sources` and `weights` differ in length or are empty, or as
    blend_counts does; `get` and `locate` on a negative index, or one before the position
    where the current counts began."""

    def __init__(self, sources: list, weights: list[float], seed: int):
        if len(sources) != len(weights) or not sources:
            raise ValueError(f"a blend needs one weight per corpus, got {len(sources)} "
                             f"corpora and {len(weights)} weights")
        self.sources, self.weights, self.seed = sources, list(weights), seed
        self.counts = blend_counts(self.weights)
        self.note = "\n".join(dict.fromkeys(s.note for s in sources if s.note))
        tokenized = [s.seconds for s in sources if hasattr(s, "seconds")]   # text read at start-up
        self.seconds = sum(tokenized) if tokenized else None
        # The counts, not the weights, fix the samples ([3, 1] and [6, 2] draw alike).
        parts = "; ".join(f"{n} per block: {s.fingerprint}" for n, s in zip(self.counts, sources))
        self.fingerprint = (f"blend of {len(sources)} corpora, blocks of {BLEND_BLOCK} samples "
                            f"(rng v{rng.VERSION}, seed {seed}): {parts}")
        self._corpora = [f"rng v{rng.VERSION}, seed {seed}"] + [s.fingerprint for s in sources]
        self._order = _BlendOrder(self.counts, seed)

    def locate(self, index: int) -> tuple[int, int]:
        """(corpus, that corpus's sample index) of sample `index` (>= 0) of the run."""
        if index < 0:
            raise ValueError(f"sample index must be >= 0, got {index}")
        return self._order.locate(index)

    def get(self, indices: list[int]) -> torch.Tensor:
        """Samples `indices` as a (len(indices), seq_len + 1) int64 tensor."""
        wanted: list[list[tuple[int, int]]] = [[] for _ in self.sources]
        for row, index in enumerate(indices):
            c, k = self.locate(index)
            wanted[c].append((row, k))
        out = torch.empty((len(indices), self.sources[0].seq_len + 1), dtype=torch.int64)
        for source, rows in zip(self.sources, wanted):
            if rows:
                out[[row for row, _ in rows]] = source.get([k for _, k in rows])
        return out

    def position_state(self) -> dict:
        """The entries of a DataLoader's state that let resume() continue every corpus."""
        o = self._order
        return {"blend_corpora": list(self._corpora), "blend_counts": list(o.counts),
                "blend_base": o.base, "blend_offsets": list(o.offsets)}

    def resume(self, state: dict, samples_seen: int) -> str | None:
        """Continue from `state` (a DataLoader's, saved with `samples_seen` samples drawn):
        its blend position where it holds these corpora (returns '' for the same counts,
        else a note that each corpus continues at its next sample); None, changing
        nothing, where it holds no blend position (a checkpoint of another source or of
        an earlier release) or another blend's."""
        if state.get("blend_corpora") != self._corpora:
            return None
        saved = _BlendOrder(list(state["blend_counts"]), self.seed, int(state["blend_base"]),
                            list(state["blend_offsets"]))
        if saved.counts == self.counts:
            self._order = saved
            return ""
        drawn = saved.drawn_before(samples_seen)
        self._order = _BlendOrder(self.counts, self.seed, samples_seen, drawn)
        return (f"[data] blend counts per block {saved.counts} -> {self.counts} from sample "
                f"{samples_seen}: each corpus continues at its next sample (drawn so far: "
                f"{drawn})")


def _corpus(d, path: str, seq_len: int) -> TokenFileSource | PreparedTokenSource:
    """The files of `path` read as `d` (a DataConfig, not synthetic) says."""
    if d.source == "tokens":
        return PreparedTokenSource(path, seq_len, d.seed)
    return TokenFileSource(path, d.source, d.tokenizer, seq_len, d.seed, d.jsonl_field)


def build_source(cfg) -> MarkovSource | TokenFileSource | PreparedTokenSource | BlendedSource:
    """The data source that `cfg.data` (a DataConfig) names, for `cfg.training.seq_len`: a
    blend of its `blend` corpora when it has two or more (one is that corpus alone, the
    same samples as `path` would give). Raises ValueError naming the corpus whose file
    cannot be read or which holds too few tokens."""
    d, seq_len = cfg.data, cfg.training.seq_len
    if d.source == "synthetic":
        return MarkovSource(d.synthetic_vocab, d.synthetic_branching, seq_len, d.seed)
    if len(d.paths) == 1:
        return _corpus(d, d.paths[0], seq_len)
    sources = []
    for i, path in enumerate(d.blend):
        try:
            sources.append(_corpus(d, path, seq_len))
        except ValueError as e:
            raise ValueError(f"blend[{i}]: {e}") from None
        sources[-1].as_blend_corpus(i)
    return BlendedSource(sources, d.blend_weights, d.seed)


def build_validation_source(cfg) -> MarkovSource | TokenFileSource | PreparedTokenSource:
    """The held-out data of `cfg.validation`: for synthetic data, samples of the training
    chain that training does not draw (in its first 4 billion samples); else the files of
    [validation] path, read like [data] path (same source type, tokenizer, field and
    seq_len). Raises ValueError as build_source does, naming the file that cannot be read,
    parsed or tokenized, or that holds fewer than seq_len + 1 tokens."""
    d, seq_len = cfg.data, cfg.training.seq_len
    if d.source == "synthetic":
        return MarkovSource(d.synthetic_vocab, d.synthetic_branching, seq_len, d.seed, held_out=True)
    return _corpus(d, cfg.validation.path, seq_len)


class DataLoader:
    """This rank's batches: rank r of `world` reads rows r*B .. (r+1)*B - 1 of every global
    batch of world * B samples. `state_dict()` / `load_state_dict()` carry the position
    (samples consumed globally), which is all a resumed run needs, and the source's
    fingerprint (for a blend also its position_state): after loading a position saved with
    other data (files, seq_len or seed), `resume_note` says so, since the position then
    continues another sample order; a blend resumed with other weights continues each
    corpus at its next sample and says that instead (BlendedSource.resume)."""

    def __init__(self, source, batch_size: int, rank: int, world: int):
        self.source, self.batch_size, self.rank, self.world = source, batch_size, rank, world
        self.samples_seen = 0
        self.resume_note = ""
        self._ready: list[tuple[torch.Tensor, torch.Tensor]] = []   # drawn by prefetch

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs (B, seq_len), targets (B, seq_len)) int64, on the CPU."""
        if not self._ready:
            self.prefetch(1)
        self.samples_seen += self.world * self.batch_size
        return self._ready.pop(0)

    def prefetch(self, n: int, ahead: int = 0) -> None:
        """Make sure the next `n` batches are drawn; when some are missing, draw up to
        max(n, ahead) of them in one call of the source (the synthetic chain costs the
        same per call for 16 samples as for 128: most of it is per position). The loop
        calls it before its host read, so that the host draws while the device computes.
        `next` returns the batches in order; the position (`samples_seen`, the state
        dict) counts only the batches `next` has returned."""
        if len(self._ready) >= n:
            return
        B, step = self.batch_size, self.world * self.batch_size
        first, count = self.samples_seen + len(self._ready) * step, max(n, ahead) - len(self._ready)
        indices = [first + j * step + self.rank * B + i for j in range(count) for i in range(B)]
        tokens_NL1 = self.source.get(indices)
        for j in range(count):
            rows = tokens_NL1[j * B:(j + 1) * B]
            self._ready.append((rows[:, :-1], rows[:, 1:]))

    def state_dict(self) -> dict:
        state = {"samples_seen": self.samples_seen, "source": self.source.fingerprint}
        if isinstance(self.source, BlendedSource):
            state.update(self.source.position_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        self._ready.clear()
        self.samples_seen = int(state["samples_seen"])
        if isinstance(self.source, BlendedSource):
            note = self.source.resume(state, self.samples_seen)
            if note is not None:
                self.resume_note = note
                return
        saved = state.get("source", self.source.fingerprint)   # absent from older checkpoints
        same = (self.source.fingerprint, getattr(self.source, "earlier_fingerprint", None))
        self.resume_note = "" if saved in same else (
            f"[data] differs from the checkpoint's (saved with {saved}; now "
            f"{self.source.fingerprint}): its position, {self.samples_seen} samples, "
            f"continues in another sample order, so samples of this epoch may repeat or be "
            f"skipped")
