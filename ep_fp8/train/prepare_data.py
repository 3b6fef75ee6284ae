"""Tokenize text or JSONL files once into a token file that training maps:

    python -m ep_fp8.train.prepare_data --source jsonl --path 'data/train/*.jsonl' \\
        --tokenizer tokenizer.json --out data/train.tokens

then train with `[data] source = "tokens"` and `path = "data/train.tokens"`. The samples
are those the same documents give with source = "text" / "jsonl" at start-up (the same
fingerprint: a run may switch between the two and resume), but no rank tokenizes or holds
the whole stream. Held-out files for [validation] are prepared the same way, with the
same tokenizer.
"""

from __future__ import annotations

import argparse
import signal
import sys

from ep_fp8.train.data import file_identity
from ep_fp8.train.token_file import write_token_file


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
    args = parser.parse_args(argv)
    if args.source != "jsonl" and args.jsonl_field != "text":
        parser.error("--jsonl-field is read only with --source jsonl")
    before = _identity(args.out)
    stop = _stop_on_signals()
    try:
        write_token_file(args.path, args.source, args.tokenizer, args.out, args.jsonl_field,
                         overwrite=args.overwrite, progress=lambda line: print(line, flush=True))
    except ValueError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        name = signal.Signals(stop.signum).name
        state = ("was written before it stopped" if _identity(args.out) != before
                 else "is as it was")
        print(f"prepare_data: stopped by {name}; {args.out} {state}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        stop.restore()
    return 0


def _identity(path: str):
    """file_identity of `path`, None when there is no file: a file renamed over it (as
    write_token_file does) has another."""
    try:
        return file_identity(path)
    except OSError:
        return None


class _stop_on_signals:
    """SIGTERM and SIGHUP (a scheduler's cancel, a closed terminal) stop the preparation as
    Ctrl-C does, so that its temporary file is removed on the way out."""

    def __init__(self):
        self.signum = signal.SIGINT
        self._before = {}
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                self._before[sig] = signal.signal(sig, self._raise)

    def _raise(self, signum, frame):
        self.signum = signum
        raise KeyboardInterrupt

    def restore(self):
        for sig, handler in self._before.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
