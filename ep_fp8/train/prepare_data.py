"""Tokenize text or JSONL files once into a token file that training maps:

    python -m ep_fp8.train.prepare_data --source jsonl --path 'data/train/*.jsonl' \\
        --tokenizer tokenizer.json --out data/train.tokens

then train with `[data] source = "tokens"` and `path = "data/train.tokens"`. The samples
are those the same documents give with source = "text" / "jsonl" at start-up (the same
fingerprint: a run may switch between the two and resume), but no rank tokenizes or holds
the whole stream. Held-out files for [validation] are prepared the same way, with the
same tokenizer.

A large corpus can be prepared in shards: `--shards 16` cuts the sorted files into 16
contiguous runs of about equal bytes and writes data/train-00000-of-00016.tokens and so
on, on `--workers` processes of this machine (default: one per core it may use, at most
16), or one shard per job with `--shard I` (a SLURM array over many machines, which is
what shards are for: on one machine a single process was at least as fast,
docs/getting_started.md). Train
on them with `path = "data/train-*-of-00016.tokens"`: read in order, the shards hold the
tokens that one file would, and a run refuses a glob that misses one. Run again after a
stop, it keeps the shards that are complete and prepares the others.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time

from ep_fp8.train.data import file_identity
from ep_fp8.train.token_file import (check_shards, read_header, shard_glob, shard_path,
                                     write_token_file)


def _usable_cores() -> int:
    """The cores this process may run on (a SLURM allocation or taskset may give fewer
    than the machine has), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):   # no affinity on this platform
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ep_fp8.train.prepare_data",
        description="Tokenize text or JSONL files into a token file for [data] source = \"tokens\".")
    parser.add_argument("--source", required=True, choices=("text", "jsonl"),
                        help="text: each file is a document; jsonl: each line's --jsonl-field is")
    parser.add_argument("--path", required=True,
                        help="file or glob of the documents (** recurses), read as [data] path is")
    parser.add_argument("--out", required=True, help="the token file to write")
    parser.add_argument("--tokenizer", default="bytes",
                        help="\"bytes\" (default) or the path of a tokenizer.json")
    parser.add_argument("--jsonl-field", default="text",
                        help="the string field of each JSONL object (default: text)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists (it is replaced only once the new "
                             "file is complete)")
    parser.add_argument("--shards", type=int, default=1,
                        help="cut the files into this many token files, --out with "
                             "-NNNNN-of-NNNNN before its extension (default: 1, --out itself)")
    parser.add_argument("--shard", type=int, default=None,
                        help="write only this shard (0 .. --shards - 1), e.g. one per job of "
                             "an array; default: all of them")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes writing shards at once (default: one per usable core, at "
                             "most --shards)")
    args = parser.parse_args(argv)
    # Every use of --out below (the shards' names read back, the identity before and after)
    # must name the file written, which is expanded: a quoted or --out=~/... keeps its ~.
    args.out = os.path.expanduser(args.out)
    if args.source != "jsonl" and args.jsonl_field != "text":
        parser.error("--jsonl-field is read only with --source jsonl")
    if args.shards < 1:
        parser.error(f"--shards must be at least 1, got {args.shards}")
    if args.shard is not None and not 0 <= args.shard < args.shards:
        parser.error(f"--shard must be in [0, --shards {args.shards}), got {args.shard}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.shards > 1 and args.shard is None:
        return _all_shards(args, argv if argv is not None else sys.argv[1:])
    shard = None if args.shard is None else (args.shard, args.shards)
    out = args.out if shard is None else shard_path(args.out, *shard)
    before = _identity(out)
    stop = StopOnSignals()
    try:
        write_token_file(args.path, args.source, args.tokenizer, args.out, args.jsonl_field,
                         overwrite=args.overwrite, progress=lambda line: print(line, flush=True),
                         shard=shard)
    except ValueError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        name = signal.Signals(stop.signum).name
        state = "was written before it stopped" if _identity(out) != before else "is as it was"
        print(f"prepare_data: stopped by {name}; {out} {state}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        stop.restore()
    return 0


def _all_shards(args, argv: list[str]) -> int:
    """Writes every shard, each by a child `prepare_data ... --shard I` (its own signal
    handling and temporary file), at most --workers at once, after checking every output
    first. On the first failure or a stop, starts no more and stops the running ones; what
    is complete stays."""
    n = args.shards
    try:   # before any child starts: the files, the tokenizer and every output
        kept = check_shards(args.path, args.source, args.tokenizer, args.out, args.jsonl_field,
                            args.overwrite, n)
    except ValueError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return 2
    pending = [i for i in range(n) if i not in kept]
    cores = _usable_cores()
    workers = min(args.workers or cores, max(len(pending), 1))
    env = dict(os.environ)
    # torch's and a tokenizer.json's thread pools, one each per process: share the cores
    # among the workers (with a pool of every core in each, they would spin against each
    # other).
    for pool in ("OMP_NUM_THREADS", "RAYON_NUM_THREADS"):
        env.setdefault(pool, str(max(1, cores // workers)))
    command = [sys.executable, "-m", "ep_fp8.train.prepare_data", *argv]
    print(f"[prepare] {n} shards of {args.path!r}: {len(kept)} already complete, "
          f"{len(pending)} to write" + (f" on {workers} worker(s)" if pending else ""), flush=True)
    running, done, failed = {}, list(kept), []
    stop = StopOnSignals()
    try:
        while (pending and not failed) or running:
            while pending and not failed and len(running) < workers:
                with stop.held():   # a signal here waits until the child is in `running`
                    i = pending.pop(0)
                    running[i] = subprocess.Popen(command + ["--shard", str(i)], env=env)
            _reap(running, done, failed)
            if failed:
                _terminate(running)
            time.sleep(0.05)
    except KeyboardInterrupt:
        _terminate(running)
        for child in running.values():
            child.wait()
        _reap(running, done, failed)
        print(f"prepare_data: stopped by {signal.Signals(stop.signum).name}; "
              f"{_shards_state(args, done)}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        stop.restore()
    if failed:
        i, code = failed[0]
        why = ("failed (its error is above)" if code > 0 else
               f"was killed by {signal.Signals(-code).name}" if -code in signal.valid_signals()
               else f"exited with {code}")
        print(f"prepare_data: shard {i} of {n} {why}; {_shards_state(args, done)}",
              file=sys.stderr)
        return 2
    headers = [read_header(shard_path(args.out, i, n)) for i in range(n)]
    tokens = sum(h["tokens"] for h in headers)
    if tokens == 0:
        print(f"prepare_data: data path {args.path!r}: its files hold no token (only empty "
              f"documents); its {n} shards are empty", file=sys.stderr)
        return 2
    print(f"[prepare] all {n} shards complete: {tokens:,} tokens, "
          f"{sum(h['documents'] for h in headers):,} documents; train on path = "
          f"{shard_glob(args.out, n)!r}", flush=True)
    return 0


def _reap(running: dict, done: list, failed: list) -> None:
    """Moves the children of `running` that have exited to `done` (by shard) or `failed`
    (shard, return code)."""
    for i, child in list(running.items()):
        if child.poll() is not None:
            del running[i]
            if child.returncode == 0:
                done.append(i)
            else:
                failed.append((i, child.returncode))


def _terminate(running: dict) -> None:
    """SIGTERM, once, to each child still running (a second signal could cut its clean-up
    short)."""
    for child in running.values():
        if child.poll() is None and not getattr(child, "terminated", False):
            child.terminate()
            child.terminated = True


def _shards_state(args, done: list[int]) -> str:
    again = ("run it again without --overwrite to keep the complete shards and prepare the "
             "others" if args.overwrite else
             "the same command run again keeps the complete shards and prepares the others")
    return f"{len(done)} of {args.shards} shards complete; {again}"


def _identity(path: str):
    """file_identity of `path`, None when there is no file: a file renamed over it (as
    write_token_file does) has another."""
    try:
        return file_identity(path)
    except OSError:
        return None


class StopOnSignals:
    """SIGINT, SIGTERM and SIGHUP (Ctrl-C, a scheduler's cancel, a closed terminal) stop the
    preparation with a KeyboardInterrupt, so that its temporary file is removed on the way
    out; signals after the first are ignored, so as not to cut that clean-up short."""

    def __init__(self):
        self.signum = signal.SIGINT
        self._stopping = self._holding = self._pending = False
        self._before = {}
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            # One ignored when the process started (nohup, a background job) stays ignored.
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                self._before[sig] = signal.signal(sig, self._raise)

    def _raise(self, signum, frame):
        if self._stopping:
            return
        self._stopping = True
        self.signum = signum
        if self._holding:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        """A signal inside the block stops the preparation at its end, not in it."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            if self._pending:
                self._pending = False
                raise KeyboardInterrupt

    def restore(self):
        for sig, handler in self._before.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
