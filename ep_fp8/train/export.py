"""Export a trained model from a run's checkpoint into one file, and load it back.

    python -m ep_fp8.train.export RUN_FOLDER --out model.pt [--step N] [--dtype bfloat16]

reads RUN_FOLDER/config.toml (which the run saved), takes the newest complete checkpoint
in its checkpoint folder (or step N), and writes the model's weights, unsharded, with
what is needed to rebuild it: the model's sizes (ModelArgs), the step, the tokenizer the
run read its data with, and the run's config. The checkpoint may come from any number of
ranks and any EP degree (DCP reassembles the sharded tensors); no process group is
needed. The file is an ordinary `torch.save` of plain types and tensors: `load_exported`
(or `torch.load(path, weights_only=True)`) reads it. It is written under a temporary
name and renamed into place once complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import signal
import sys
import tempfile

import torch

from ep_fp8.paths import new_file, output_path_problem
from ep_fp8.train.prepare_data import StopOnSignals

FORMAT = "ep_fp8.model"
VERSION = 2   # 1: the experts' w1 and w3 as two tensors (load_exported fuses them into w13)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def find_checkpoint(run: str, step: int | None = None):
    """(config, step, path) of run folder `run`'s newest complete checkpoint (or of `step`).
    Raises ValueError naming what is missing: the folder, its config.toml, any complete
    checkpoint, or the step asked for (listing those there are)."""
    from ep_fp8.train.checkpoint import complete_checkpoints
    from ep_fp8.train.config import read_config, resolve_model_args

    run = os.path.expanduser(run)
    config = os.path.join(run, "config.toml")
    if not os.path.isdir(run):
        raise ValueError(f"run folder {run!r} does not exist")
    if not os.path.isfile(config):
        from ep_fp8.train.checkpoint import MARKER

        hint = (": it is a checkpoint; give its run's folder, and --step for another than the "
                "newest" if os.path.isfile(os.path.join(run, MARKER)) else
                " (a run writes it at its start)")
        raise ValueError(f"{run!r} is not a run folder: it has no config.toml{hint}")
    try:   # its data may be gone: only the model and the checkpoint folder are needed
        cfg = read_config(config)
        resolve_model_args(cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the run's config cannot be read: {e}") from None
    folder = os.path.join(run, os.path.expanduser(cfg.checkpoint.folder))   # unless absolute
    found = complete_checkpoints(folder)
    if not found:
        why = ("" if cfg.checkpoint.enabled else
               " (its config has [checkpoint] enabled = false: it saved none)")
        raise ValueError(f"run {run!r} has no complete checkpoint in {folder!r}{why}")
    if step is None:
        return (cfg, *found[-1])
    paths = dict(found)
    if step not in paths:
        raise ValueError(f"run {run!r} has no complete checkpoint of step {step} in {folder!r}; "
                         f"steps there: {', '.join(str(s) for s, _ in found)}")
    return cfg, step, paths[step]


def _tokenizer(cfg, given: str | None, progress) -> dict:
    """The model file's tokenizer entries: `tokenizer`, the name ('bytes', a tokenizer.json
    path, or None), and for a tokenizer.json found here `tokenizer_json` (its text) and
    `tokenizer_eos` (its end-of-document token, or None), so that the file carries it.
    `given` replaces the run's; a tokenizer that cannot be found is said, not fatal."""
    from ep_fp8.train.tokenizer import configured_eos

    name = given
    if name is None and cfg.data.source in ("text", "jsonl"):
        name = cfg.data.tokenizer
    elif name is None and cfg.data.source == "tokens":
        from ep_fp8.train.token_file import read_token_files
        problems = []
        for path in cfg.data.paths:   # any corpus of a blend tells it
            try:
                name = read_token_files(path)[1][0]["tokenizer"]
                break
            except ValueError as e:
                problems.append(str(e))
        else:
            progress(f"[export] warning: the run's token files cannot be read here "
                     f"({'; '.join(problems)}), so its tokenizer is unknown: pass --tokenizer "
                     f"to record it")
    if name is None or name == "bytes":
        return {"tokenizer": name}
    try:   # as it is: no need for the tokenizers package here
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError) as e:
        progress(f"[export] warning: tokenizer {name!r} cannot be read here ({e}); the file "
                 f"records its name only: pass --tokenizer to embed it")
        return {"tokenizer": name}
    # The end-of-document token that a tokenizer_config.json beside it names (else None:
    # the same default names apply when the embedded copy is loaded).
    return {"tokenizer": os.path.abspath(name), "tokenizer_json": text,
            "tokenizer_eos": configured_eos(name)}


def export_model(run: str, out: str, step: int | None = None, dtype: str | None = None,
                 overwrite: bool = False, progress=print, tokenizer: str | None = None) -> dict:
    """Write run `run`'s checkpoint (the newest, or `step`) as the model file `out`; returns
    the file's contents less the weights. `dtype` ("float32" | "bfloat16") casts the
    parameters (buffers, such as the routers' biases, stay as saved); None keeps them as
    saved. Raises ValueError, before reading any weight, when the checkpoint cannot be
    found, `out` exists (unless `overwrite`) or cannot be written, or `dtype` is unknown,
    or the checkpoint does not hold exactly the tensors of the run's model; and, leaving
    `out` as it was, when the checkpoint is damaged, the file cannot be written, or a file
    appeared at `out` meanwhile (unless `overwrite`). `tokenizer` ('bytes' or a
    tokenizer.json) replaces the one the run used; a tokenizer.json is embedded."""
    from ep_fp8.model import Transformer
    from ep_fp8.train.checkpoint import (CheckpointDamagedError, _check_model_keys, _load, _saved_keys,
                                         complete_checkpoints)
    from ep_fp8.train.config import resolve_model_args, to_toml

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = os.path.expanduser(out)
    if problem := output_path_problem(out):
        raise ValueError(f"output {out!r} {problem}")
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"output {out!r} exists: remove it or pass --overwrite")
    cfg, step, path = find_checkpoint(run, step)
    args = resolve_model_args(cfg)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    into = f"the model of {run!r}'s config.toml"
    try:
        saved = _saved_keys(path)
        _check_model_keys(path, saved, state["model"], into)
        progress(f"[export] reading step {step} of {run!r} ({path})")
        _load(path, state, saved, into, lambda: None)   # a Ctrl-C or SIGTERM in it stays one
    except CheckpointDamagedError as e:
        earlier = [s for s, _ in complete_checkpoints(os.path.dirname(path)) if s < step]
        hint = f"; --step {earlier[-1]} exports the one before it" if earlier else ""
        raise CheckpointDamagedError(f"{e}{hint}") from None
    weights = state.pop("model")
    params = {name for name, _ in model.named_parameters()}
    del model   # then each float32 tensor is freed as its cast replaces it
    if dtype is not None:   # the parameters; buffers (the routers' biases) stay as they are
        for k in params:
            weights[k] = weights[k].to(DTYPES[dtype])
    meta = {"format": FORMAT, "version": VERSION, "model_args": dataclasses.asdict(args),
            "step": step, **_tokenizer(cfg, tokenizer, progress),
            "checkpoint": os.path.abspath(path), "config": to_toml(cfg, resolve_model=True)}
    target = os.path.realpath(out)   # a symbolic link: its target is written
    try:   # never over a file that appeared meanwhile (unless overwrite)
        with new_file(target, out, overwrite) as f:
            torch.save({**meta, "state_dict": weights}, f)
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as RuntimeError
        raise ValueError(f"output {out!r} could not be written ({e})") from None
    n = sum(v.numel() for v in weights.values())
    progress(f"[export] wrote {out}: {n:,} weights ({os.path.getsize(out) / 2**20:,.1f} MiB), "
             f"step {step}, " + (f"tokenizer {meta['tokenizer']!r}" if meta["tokenizer"] else
                                 "no tokenizer (sample it with --prompt-ids)"))
    return meta


def load_exported(path: str, device: str | torch.device = "cpu"):
    """(model, meta) from a file of export_model: an ep_fp8.model.Transformer in eval mode
    on `device` holding the exported weights (in their dtype), and the file's other
    entries. A file of version 1 (written before the experts' w1 and w3 were one w13
    parameter) loads as well. Raises ValueError when the file is not such a file or its
    weights do not fit its ModelArgs."""
    from ep_fp8.model import ModelArgs, Transformer

    try:
        data = torch.load(os.path.expanduser(path), map_location="cpu", weights_only=True)
    except OSError as e:
        raise ValueError(f"model file {path!r} cannot be read ({e.strerror or e})") from None
    except Exception:   # noqa: BLE001 - torch.load's errors for a file of another kind vary
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a model file of python -m ep_fp8.train.export")
    if data.get("version") not in (1, VERSION):
        raise ValueError(f"model file {path!r} has format version {data.get('version')!r}; "
                         f"this ep_fp8 reads versions 1 and {VERSION}: export it again")
    try:
        args = ModelArgs(**data["model_args"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"model file {path!r}: its model_args are not valid ({e})") from None
    with torch.device("meta"):
        model = Transformer(args)
    weights = data.pop("state_dict")
    try:   # the file's tensors become the parameters, in their dtype
        if data["version"] == 1:
            _fuse_w1_w3(weights, model.state_dict())
        model.load_state_dict(weights, assign=True)
    except RuntimeError as e:
        raise ValueError(f"model file {path!r}: its weights do not fit its model_args ({e})") from None
    for module in model.modules():   # buffers not saved (routing counts) start at zero
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                module.register_buffer(name, torch.zeros_like(buf, device="cpu"), persistent=False)
    return model.to(device).eval(), data


def _fuse_w1_w3(weights: dict, wanted) -> None:
    """Weights written before the experts' w1 and w3 were one w13 parameter (format
    version 1), in place: each `<prefix>.w1` and `<prefix>.w3` where the model (its
    state-dict keys `wanted`) has `<prefix>.w13` become torch.cat([w1, w3], dim=1)."""
    for key in wanted:
        p = key[:-len(".w13")]
        if key.endswith(".w13") and key not in weights and {f"{p}.w1", f"{p}.w3"} <= weights.keys():
            weights[key] = torch.cat([weights.pop(f"{p}.w1"), weights.pop(f"{p}.w3")], dim=1)


def exported_tokenizer(meta: dict, given: str | None = None):
    """The tokenizer of a model file's entries `meta` (or `given`, 'bytes' or a
    tokenizer.json, in its place): the one embedded in the file, else the one it names;
    None when it names none. Raises ValueError when a named file cannot be loaded."""
    from ep_fp8.train.tokenizer import load_tokenizer

    if given is not None:
        return load_tokenizer(given)
    if meta.get("tokenizer_json") is None:
        return load_tokenizer(meta["tokenizer"]) if meta.get("tokenizer") else None
    try:   # named here, not by the temporary path below
        importlib.import_module("tokenizers")
    except ImportError:
        raise ValueError("the model file embeds its tokenizer.json, which needs the 'tokenizers' "
                         "package (pip install tokenizers)") from None
    with tempfile.TemporaryDirectory() as folder:   # as written: tokenizer.json + its eos
        with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(meta["tokenizer_json"])
        if meta.get("tokenizer_eos") is not None:
            with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump({"eos_token": meta["tokenizer_eos"]}, f)
        return load_tokenizer(os.path.join(folder, "tokenizer.json"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ep_fp8.train.export",
        description="Write a run's checkpoint as one model file (weights unsharded, with "
                    "the model's sizes, step and tokenizer).")
    parser.add_argument("run", help="the run folder (holds config.toml and the checkpoints)")
    parser.add_argument("--out", required=True, help="the model file to write")
    parser.add_argument("--step", type=int, default=None,
                        help="the checkpoint's step (default: the newest complete one)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights (default: as saved, float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--tokenizer", default=None,
                        help="'bytes' or a tokenizer.json to record (default: the run's)")
    ns = parser.parse_args(argv)
    stop = StopOnSignals()   # a signal ends the export with its temporary file removed
    try:
        export_model(ns.run, ns.out, ns.step, ns.dtype, ns.overwrite,
                     progress=lambda line: print(line, flush=True), tokenizer=ns.tokenizer)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"export: stopped by {signal.Signals(stop.signum).name}; {ns.out} is whole or as "
              f"it was, and no temporary file is left", file=sys.stderr)
        return 128 + stop.signum
    finally:
        stop.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
