"""Checks of a Config's values and combinations, run by `load_config` before any process
group exists and before any file is written. Each failure is a ConfigError naming the
config source and the key(s) involved."""

from __future__ import annotations

import math
import os

import torch

from ep_fp8.paths import output_path_problem
from ep_fp8.train.config import (CheckpointConfig, Config, ConfigError, checkpoint_dir,
                                 resolve_model_args, run_dir, tomllib)


def _check(ok: bool, cfg: Config, message: str) -> None:
    if not ok:
        raise ConfigError(f"{cfg.source}: {message}")


def _ranges(cfg: Config) -> None:
    """Each value on its own."""
    t, o, s, c, m = cfg.training, cfg.optimizer, cfg.lr_schedule, cfg.checkpoint, cfg.metrics
    positive = {
        "[training] steps": t.steps, "[training] batch_size": t.batch_size,
        "[training] seq_len": t.seq_len, "[training] grad_accum": t.grad_accum,
        "[parallel] dp_replicate": cfg.parallel.dp_replicate,
        "[checkpoint] interval": c.interval, "[metrics] log_every": m.log_every,
        "[validation] interval": cfg.validation.interval,
        "[validation] batches": cfg.validation.batches,
        "[optimizer] lr": o.lr, "[optimizer] eps": o.eps,
    }
    for key, value in positive.items():
        _check(value > 0 and math.isfinite(value), cfg, f"{key} must be finite and > 0, got {value}")
    non_negative = {
        "[job] seed": cfg.job.seed, "[parallel] ep": cfg.parallel.ep, "[data] seed": cfg.data.seed,
        "[training] max_norm": t.max_norm, "[optimizer] weight_decay": o.weight_decay,
        "[lr_schedule] warmup_steps": s.warmup_steps, "[checkpoint] keep_last": c.keep_last,
        "[router] bias_update_rate": cfg.router.bias_update_rate,
        "[metrics] peak_flops": m.peak_flops,
    }
    for key, value in non_negative.items():
        _check(value >= 0 and math.isfinite(value), cfg, f"{key} must be finite and >= 0, got {value}")
    for key, value in {"[job] seed": cfg.job.seed, "[data] seed": cfg.data.seed}.items():
        _check(value < 2**63, cfg, f"{key} must be below 2**63 (a TOML integer), got {value}")
    _check(0.0 <= s.min_lr_ratio <= 1.0, cfg,
           f"[lr_schedule] min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
    _check(all(0.0 <= b < 1.0 for b in o.betas), cfg,
           f"[optimizer] betas must be in [0, 1), got {list(o.betas)}")
    name = cfg.job.name
    _check(bool(name) and "/" not in name and "\0" not in name and name not in (".", ".."),
           cfg, f"[job] name must be a non-empty folder name without '/', got {name!r}")
    _check(bool(c.folder), cfg, "[checkpoint] folder must not be empty")


def _device(cfg: Config) -> None:
    cuda = torch.cuda.is_available()
    _check(cfg.training.device != "cuda" or cuda, cfg,
           "[training] device = \"cuda\" but no CUDA device is available")
    on_cuda = cfg.training.device == "cuda" or (cfg.training.device == "auto" and cuda)
    _check(cfg.float8.backend != "cuda" or on_cuda, cfg,
           "[float8] backend = \"cuda\" needs a CUDA device (use \"auto\" or \"emulated\")")


def _float8_backend(cfg: Config, args) -> None:
    """backend = "cuda" must run on this machine's GPU for both expert GEMM shapes (compute
    capability 9.0/10.0, in and out features multiples of 16, fewer than 1024 local
    experts once ep is known): say so now, not at the first forward after the process
    group exists."""
    if not (cfg.float8.enabled and cfg.float8.backend == "cuda" and torch.cuda.is_available()):
        return
    from ep_fp8.ops import resolve_backend

    device = torch.device("cuda", torch.cuda.current_device())
    ep = cfg.parallel.ep
    local = args.n_experts // ep if ep > 0 and args.n_experts else None
    try:
        for K, N in ((args.dim, 2 * args.expert_hidden_dim), (args.expert_hidden_dim, args.dim)):
            resolve_backend("cuda", device, K, N, G=local)
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: [float8] backend = \"cuda\" with [model] dim = "
                          f"{args.dim}, expert_hidden_dim = {args.expert_hidden_dim}, "
                          f"n_experts = {args.n_experts} ({local or 'ep not yet known'} per "
                          f"rank): {e} (use \"auto\" or \"emulated\")") from None


def resolve_ep(ep: int, n_experts: int, world_size: int, dp_replicate: int) -> int:
    """The EP degree: `ep`, or for ep = 0 the largest degree that divides both n_experts
    and the ranks of one replica (world_size / dp_replicate)."""
    return ep or math.gcd(n_experts, max(world_size // dp_replicate, 1))


def _parallel(cfg: Config, n_experts: int, world_size: int | None) -> None:
    from ep_fp8.moe import check_ep_divides

    ep, rep = cfg.parallel.ep, cfg.parallel.dp_replicate
    if ep > 0 and n_experts > 0:   # ep 0 is chosen later to divide n_experts (resolve_ep)
        try:
            check_ep_divides(ep, n_experts)
        except ValueError as e:
            raise ConfigError(f"{cfg.source}: [parallel] {e}") from None
    if world_size is None:
        return
    _check(world_size % rep == 0, cfg,
           f"[parallel] dp_replicate = {rep} must divide the world size {world_size}")
    _check((world_size // rep) % max(ep, 1) == 0, cfg,
           f"[parallel] ep = {ep} must divide the world size {world_size} "
           f"/ [parallel] dp_replicate {rep} = {world_size // rep} (--parallel.ep=0 picks the "
           f"largest that fits)")


# The share of a file set's bytes in copies of training files that makes a config error:
# of held-out files, or of a corpus of a blend (copies of another corpus's files).
COPIED_SHARE = 0.1


def _corpus_name(d, i: int) -> str:
    """How messages name training corpus i: [data] path 'x' or [data] blend[i] 'x'."""
    return f"[data] blend[{i}] {d.blend[i]!r}" if d.blend else f"[data] path {d.path!r}"


def _training_name(d) -> str:
    return f"[data] blend {list(d.blend)!r}" if d.blend else f"[data] path {d.path!r}"


def _data(cfg: Config, vocab_size: int) -> None:
    from ep_fp8.train.data import blend_counts, file_identity, list_files
    from ep_fp8.train.token_file import combined_header
    from ep_fp8.train.tokenizer import load_tokenizer

    d = cfg.data
    if d.source == "synthetic":   # reads no files: a path or tokenizer set here is a slip
        for key, value, default in (("path", d.path, ""), ("blend", d.blend, []),
                                    ("blend_weights", d.blend_weights, []),
                                    ("tokenizer", d.tokenizer, "bytes"),
                                    ("jsonl_field", d.jsonl_field, "text")):
            _check(value == default, cfg,
                   f"[data] {key} = {value!r} is set, but [data] source = \"synthetic\" reads "
                   f"no files: set source = \"text\" or \"jsonl\" to train on them")
        _check(2 <= d.synthetic_vocab <= vocab_size, cfg,
               f"[data] synthetic_vocab must be in [2, model vocab_size = {vocab_size}], "
               f"got {d.synthetic_vocab}")
        _check(1 <= d.synthetic_branching <= d.synthetic_vocab, cfg,
               f"[data] synthetic_branching must be in [1, synthetic_vocab = "
               f"{d.synthetic_vocab}], got {d.synthetic_branching}")
        return
    _check(not (d.path and d.blend), cfg,
           f"[data] path = {d.path!r} and [data] blend = {list(d.blend)!r} are both set: path "
           f"names one corpus, blend several (with blend_weights); keep one of them")
    _check(bool(d.path or d.blend), cfg,
           f"[data] source = {d.source!r} needs [data] path (a file or glob), or [data] blend "
           f"and blend_weights (several, drawn in proportion)")
    _check(len(d.blend_weights) == len(d.blend), cfg,
           f"[data] blend_weights needs one weight per [data] blend entry: got "
           f"{len(d.blend_weights)} weight(s) for {len(d.blend)} entries")
    if d.blend:
        _check(all(d.blend), cfg, f"[data] blend = {list(d.blend)!r} holds an empty path")
        try:
            blend_counts(d.blend_weights)
        except ValueError as e:
            raise ConfigError(f"{cfg.source}: [data] {e}") from None
    _check(d.source == "jsonl" or d.jsonl_field == "text", cfg,
           f"[data] jsonl_field = {d.jsonl_field!r} is set, but [data] source = {d.source!r}: "
           f"it is read only with source = \"jsonl\"")
    files: list[list[str]] = []   # each corpus's files
    hashes: list[dict[str, str]] = []   # each corpus's {token file: documents' hash}
    inputs: list[set[str]] = []   # each token corpus's headers' `inputs` (its input files)
    if d.source == "tokens":
        _check(d.tokenizer == "bytes", cfg,
               f"[data] tokenizer = {d.tokenizer!r} is set, but [data] source = \"tokens\" "
               f"reads token files, which record the tokenizer they were prepared with")
        seq_len, first = cfg.training.seq_len, None
        for i, path in enumerate(d.paths):
            where = _corpus_name(d, i)
            paths, headers = _token_files(cfg, f"[data] blend[{i}]:" if d.blend else "[data]", path)
            inputs.append({h["inputs"] for h in headers if h.get("inputs")})
            header = combined_header(headers)
            files.append(paths)
            hashes.append({p: h["hash"] for p, h in zip(paths, headers) if h["tokens"]})
            name = f"token file(s) {path!r} (tokenizer {header['tokenizer']!r})"
            _check(header["tokens"] >= seq_len + 1, cfg,
                   f"{where}: {name} holds {header['tokens']} tokens, fewer than [training] "
                   f"seq_len + 1 = {seq_len + 1}")
            if first is None:
                first, vocab, first_name = header, header["vocab_size"], name
            _check((header["vocab_size"], header["eos_id"]) == (first["vocab_size"], first["eos_id"]),
                   cfg, f"{where}: {name} has {header['vocab_size']} tokens and end of document "
                   f"{header['eos_id']}, {_corpus_name(d, 0)} {first['vocab_size']} and "
                   f"{first['eos_id']}: prepare every corpus of a blend with the same tokenizer")
        name = first_name
    else:
        try:
            for i, path in enumerate(d.paths):
                try:
                    files.append(list_files(path))
                except ValueError as e:
                    raise ValueError(f"blend[{i}]: {e}" if d.blend else str(e)) from None
            tokenizer = load_tokenizer(d.tokenizer)
        except ValueError as e:
            raise ConfigError(f"{cfg.source}: [data] {e}") from None
        name, vocab = f"tokenizer {d.tokenizer!r}", tokenizer.vocab_size
    seen: dict[tuple[int, int], int] = {}
    for i, corpus_files in enumerate(files):
        for p in corpus_files:
            j = seen.setdefault(file_identity(p), i)
            _check(j == i, cfg,
                   f"{_corpus_name(d, i)} and {_corpus_name(d, j)} both hold {p!r}: a file may be "
                   f"in one corpus of a blend only (raise that corpus's weight instead)")
    if len(files) > 1:
        _no_copies_across_corpora(cfg, files, hashes)
        _no_corpus_prepared_twice(cfg, inputs)
    _check(vocab <= vocab_size, cfg,
           f"[data] {name} has {vocab} tokens, more than the model's vocab_size = "
           f"{vocab_size} ([model] vocab_size)")


def _fingerprints(files: list[str]) -> dict[str, bytes]:
    """{file: data.file_fingerprint (size and first and last 4 KiB)} of the non-empty `files`.
    Raises OSError or ValueError as reading them does."""
    from ep_fp8.train.data import file_fingerprint

    return {p: file_fingerprint(p) for p in files if os.path.getsize(p)}


def _copies(files: list[str], prints: dict, originals: dict) -> tuple[list[tuple], float]:
    """([(file, original)], share): the files whose key in `prints` ({file: key}) is a key of
    `originals` ({key: its original}), and their share of the bytes of `files`."""
    copies = [(p, originals[key]) for p, key in prints.items() if key in originals]
    total = sum(os.path.getsize(p) for p in files)
    return copies, sum(os.path.getsize(p) for p, _ in copies) / max(1, total)


def _no_corpus_prepared_twice(cfg: Config, inputs: list[set[str]]) -> None:
    """ConfigError when two token corpora of the blend were prepared from the same input
    files (their headers' `inputs`; one as a whole file and one as shards, or in two shard
    counts): every document would be in both."""
    first: dict[str, int] = {}
    for i, ids in enumerate(inputs):
        for one in ids:
            j = first.setdefault(one, i)
            _check(j == i, cfg,
                   f"{_corpus_name(cfg.data, i)} and {_corpus_name(cfg.data, j)} were prepared "
                   f"from the same input files (one as a whole file, the other as shards, or in "
                   f"other shard counts): a document may be in one corpus of a blend only (raise "
                   f"that corpus's weight instead)")


def _no_copies_across_corpora(cfg: Config, files: list[list[str]],
                              hashes: list[dict[str, str]]) -> None:
    """ConfigError when a corpus of the blend holds copies of an earlier corpus's files: a
    token file with another's documents' hash (`hashes`, empty for text), or text / JSONL
    files of the same size and first and last 4 KiB that make a tenth of its bytes or more
    (a shared licence or __init__.py is no mistake)."""
    d = cfg.data
    text = not hashes
    originals: dict = {}   # {key: (corpus, file)}, the first file of each key
    for i, corpus_files in enumerate(files):
        try:
            prints = _fingerprints(corpus_files) if text else hashes[i]
            copies, share = _copies(corpus_files, prints, originals)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{cfg.source}: [data] {e}") from None
        if copies:
            p, (j, q) = copies[0]
            _check(text and share < COPIED_SHARE, cfg,
                   f"{_corpus_name(d, i)} holds copies of files of {_corpus_name(d, j)} ({p!r} of "
                   f"{q!r}" + (f"; {len(copies)} file(s), {share:.0%} of its bytes" if text else "")
                   + "): a document may be in one corpus of a blend only (raise that corpus's "
                   "weight instead)")
        for p, key in prints.items():
            originals.setdefault(key, (i, p))


def _token_files(cfg: Config, where: str, path: str) -> tuple[list[str], list[dict]]:
    """The paths and checked headers of the token files that `path` names; ConfigError
    after `where` ("[data]", "[data] blend[1]:") when they cannot be read."""
    from ep_fp8.train.token_file import read_token_files

    try:
        return read_token_files(path)
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: {where} {e}") from None


def _token_file_headers(cfg: Config, section: str, path: str) -> list[dict]:
    """The checked headers of the token files that [section] path names."""
    return _token_files(cfg, f"[{section}]", path)[1]


def _validation(cfg: Config) -> None:
    """Held-out data: synthetic runs validate on samples of the same chain that training
    does not draw; text and JSONL runs on the files of [validation] path, none of which may
    be a training file or a copy of one; token runs on token files of the same vocabulary,
    prepared from other input files than the training files."""
    from ep_fp8.train.data import file_identity, list_files
    from ep_fp8.train.token_file import combined_header

    v, d = cfg.validation, cfg.data
    if not v.enabled:
        return
    if d.source == "synthetic":
        _check(not v.path, cfg,
               f"[validation] path = {v.path!r} is set, but [data] source = \"synthetic\" "
               f"validates on held-out samples of its own chain: leave path empty")
        return
    _check(bool(v.path), cfg,
           f"[validation] enabled = true with [data] source = {d.source!r} needs [validation] "
           f"path: held-out files (a file or glob) read like [data] path")
    try:
        held_out = list_files(v.path)
    except ValueError as e:
        raise ConfigError(f"{cfg.source}: [validation] {e}") from None
    training_files = [p for path in d.paths for p in list_files(path)]
    training = {file_identity(p) for p in training_files}   # every name of a file alike
    shared = [p for p in held_out if file_identity(p) in training]
    _check(not shared, cfg,
           f"[validation] path {v.path!r} and {_training_name(d)} share {len(shared)} "
           f"file(s) ({shared[0] if shared else ''}): validation data must be held out of "
           f"training")
    if d.source != "tokens":   # copies: the same contents under another name
        try:
            training = {key: p for p, key in _fingerprints(training_files).items()}
            copies, share = _copies(held_out, _fingerprints(held_out), training)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{cfg.source}: [validation] {e}") from None
        # A few shared boilerplate files (an empty __init__.py, a licence) are no mistake;
        # a tenth of the held-out bytes is.
        _check(share < COPIED_SHARE, cfg,
               f"[validation] path {v.path!r}: {len(copies)} file(s), {share:.0%} of its bytes, "
               f"are copies of files of {_training_name(d)} (by size and first and last 4 KiB; "
               f"{copies[0][0] if copies else ''!r} of {copies[0][1] if copies else ''!r}): "
               f"validation data must be held out of training")
    if d.source == "tokens":
        held_files = _token_file_headers(cfg, "validation", v.path)
        trained_files = [h for path in d.paths for h in _token_file_headers(cfg, "data", path)]
        held, trained = combined_header(held_files), combined_header(trained_files)
        _check((held["vocab_size"], held["eos_id"]) == (trained["vocab_size"], trained["eos_id"]),
               cfg, f"[validation] token file(s) {v.path!r} were prepared with tokenizer "
               f"{held['tokenizer']!r} ({held['vocab_size']} tokens, end of document "
               f"{held['eos_id']}), {_training_name(d)} with {trained['tokenizer']!r} "
               f"({trained['vocab_size']} tokens, end of document {trained['eos_id']}): prepare both "
               f"with the same tokenizer")
        same = ({h["hash"] for h in held_files if h["tokens"]}
                & {h["hash"] for h in trained_files if h["tokens"]})
        _check(not same, cfg,
               f"[validation] token file(s) {v.path!r} hold the same documents as a file of "
               f"{_training_name(d)} (documents' hash {min(same) if same else ''}): validation "
               f"data must be held out of training")
        same = ({h.get("inputs") for h in held_files} & {h.get("inputs") for h in trained_files}
                - {None})
        _check(not same, cfg,
               f"[validation] token file(s) {v.path!r} were prepared from the same input files as "
               f"{_training_name(d)} (inputs {min(same) if same else ''}), in another cut "
               f"(one file or other shards): validation data must be held out of training")


def validate(cfg: Config, world_size: int | None = None, run_folder: bool = True) -> None:
    """Raise ConfigError for a value out of range or an impossible combination; with
    `world_size`, also check the parallel degrees against it and resolve `ep = 0` (auto)
    to its value. Reads the data files' names and the tokenizer file, and (unless
    `run_folder` is False) checks that the run's and the checkpoints' folders can be
    written and hold no earlier run's checkpoints that this run would mix with; writes
    nothing."""
    _ranges(cfg)
    _device(cfg)
    try:
        args = resolve_model_args(cfg)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # ModelArgs rejecting a combination of its fields
        raise ConfigError(f"{cfg.source}: [model] {e}") from None
    _check(cfg.training.seq_len <= args.max_seq_len, cfg,
           f"[training] seq_len = {cfg.training.seq_len} exceeds the model's max_seq_len = "
           f"{args.max_seq_len} ([model] max_seq_len)")
    _parallel(cfg, args.n_experts, world_size)
    if world_size is not None:
        cfg.parallel.ep = resolve_ep(cfg.parallel.ep, args.n_experts, world_size,
                                     cfg.parallel.dp_replicate)
    _float8_backend(cfg, args)
    _data(cfg, args.vocab_size)
    _validation(cfg)
    _initial_load(cfg)
    if not run_folder:
        return
    _can_create_folder(cfg, run_dir(cfg), "the run's folder ([job] output_dir / name)")
    for name in ("config.toml",) + (("metrics.jsonl",) if cfg.metrics.jsonl else ()):
        path = os.path.join(run_dir(cfg), name)
        problem = output_path_problem(path)
        _check(not problem, cfg, f"the run's {name} {path!r} {problem}")
    _checkpoint_folder(cfg)


def _can_create_folder(cfg: Config, folder: str, what: str) -> None:
    """`folder` exists as a folder this process may write in, or can be made: its nearest
    existing ancestor is a writable folder. Checked here so that a run does not fail at its
    first write (the config file, or a checkpoint after `interval` steps)."""
    problem = output_path_problem(folder, folder=True)
    _check(not problem, cfg, f"{what} {folder!r} {problem}")


# Where a run that starts from step 0 keeps the files an earlier run left in its folder.
EARLIER_RUNS = "earlier-runs"
# What the run itself writes in its folder; the checkpoint folder must not be one of them.
RUN_FILES = ("config.toml", "metrics.jsonl", ".lock", "tb", EARLIER_RUNS)


def _earlier_checkpoint_folders(cfg: Config) -> list[str]:
    """Where an earlier run in this run folder kept checkpoints: this config's folder, the
    default one, and the one its saved config.toml names."""
    folders = [checkpoint_dir(cfg), checkpoint_dir(cfg, CheckpointConfig.folder)]
    try:
        with open(os.path.join(run_dir(cfg), "config.toml"), "rb") as f:
            saved = tomllib.load(f).get("checkpoint", {}).get("folder")
        if isinstance(saved, str) and saved:
            folders.append(checkpoint_dir(cfg, saved))
    except (OSError, ValueError, AttributeError):   # none, or not ours: nothing more to look at
        pass
    return list(dict.fromkeys(os.path.normpath(f) for f in folders))


def _initial_load(cfg: Config) -> None:
    """[checkpoint] initial_load names a complete checkpoint (a step-N folder), unless the
    run resumes from its own checkpoints, which already hold the weights (by then the
    source checkpoint may have been pruned or moved)."""
    from ep_fp8.train.checkpoint import MARKER, complete_checkpoints

    c, path = cfg.checkpoint, os.path.expanduser(cfg.checkpoint.initial_load)
    if not path or (c.enabled and c.resume and complete_checkpoints(checkpoint_dir(cfg))):
        return
    _check(os.path.isdir(path), cfg, f"[checkpoint] initial_load {path!r} is not a folder: give "
           f"a checkpoint's step-N folder (in a run's checkpoints/)")
    _check(os.path.isfile(os.path.join(path, MARKER)), cfg,
           f"[checkpoint] initial_load {path!r} is not a complete checkpoint (no {MARKER} "
           f"marker): give a checkpoint's step-N folder (in a run's checkpoints/)")


def _checkpoint_folder(cfg: Config) -> None:
    """A run that does not resume (resume = false, or checkpoints off) must not start in a
    run folder that holds an earlier run's checkpoints (in this config's checkpoint folder,
    the default one, or the one the folder's config.toml names): pruning keeps the highest
    steps, so theirs could outlive its own and a later resume load them; and it would
    replace that run's config.toml and metrics.jsonl, so a later resume would join two
    runs' curves in one file."""
    from ep_fp8.train.checkpoint import complete_checkpoints

    c, folder = cfg.checkpoint, checkpoint_dir(cfg)
    if c.enabled:
        # Not one of them, nor inside one (a file cannot hold it, and tb/ moves aside).
        where = os.path.normpath(folder)
        own = {name: os.path.normpath(os.path.join(run_dir(cfg), name)) for name in RUN_FILES}
        clash = next((name for name, p in own.items()
                      if where == p or where.startswith(p + os.sep)), None)
        inside = "inside " if clash is not None and where != own[clash] else ""
        _check(clash is None, cfg, f"[checkpoint] folder {c.folder!r} is {inside}the run's own "
               f"{clash!r}: choose another name")
        _can_create_folder(cfg, folder, "[checkpoint] folder")
        if c.resume:
            return
    setting = "resume = false" if c.enabled else "enabled = false"
    fix = ("Set [checkpoint] resume = true to continue that run" if c.enabled else
           "Set [checkpoint] enabled = true (with resume = true) to continue that run")
    for earlier in _earlier_checkpoint_folders(cfg):
        found = complete_checkpoints(earlier)
        _check(not found, cfg,
               f"[checkpoint] {setting}, but the run folder {run_dir(cfg)!r} ([job] name "
               f"{cfg.job.name!r}) holds {len(found)} complete checkpoint(s) of an earlier "
               f"run in {earlier!r} (newest: step {found[-1][0] if found else 0}). {fix}, or "
               f"choose another [job] name (or delete the old checkpoints)")
