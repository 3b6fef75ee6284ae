"""Runs inside each rank of a gloo process group started by test_train_distributed.py.

One spawn per world size runs a list of training runs one after another (the process group
is created once, which is where most of the time of a small run goes). Each run's
`train()` result is written to <root>/<run>/result-rank<r>.json; the metrics JSONL is in
the run folder as usual. The test then asserts on those files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import threading
import time
import traceback

import torch.distributed as dist

from ep_fp8.train.config import load_config
from ep_fp8.train.loop import NonFiniteLossError, train

# Small and deterministic: fp32 on the CPU, fixed seeds, a log line every step.
BASE = [
    "--training.steps=20", "--training.batch_size=4", "--training.seq_len=32",
    "--training.device=cpu", "--training.dtype=float32", "--optimizer.lr=3e-3",
    "--lr_schedule.warmup_steps=2", "--metrics.log_every=1", "--metrics.tensorboard=false",
    "--float8.enabled=false",
]


def _sigterm_after(path: str, step: int) -> None:
    """Send SIGTERM to this process once the metrics file at `path` has logged `step`."""
    def watch():
        while True:
            try:
                with open(path) as f:
                    if any(json.loads(ln).get("step", 0) >= step for ln in f if ln.strip()):
                        os.kill(os.getpid(), signal.SIGTERM)
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
    threading.Thread(target=watch, daemon=True).start()


def _copy_checkpoint(root: str, src_run: str, step: int, dst_run: str) -> None:
    if dist.get_rank() == 0:
        src = os.path.join(root, src_run, "checkpoints", f"step-{step}")
        shutil.copytree(src, os.path.join(root, dst_run, "checkpoints", f"step-{step}"))
    dist.barrier()


def run_plan(rank: int, world: int, root: str, plan: list[dict]) -> None:
    """`plan`: [{"name", "overrides", optional "resume_from": [run, step],
    optional "sigterm_after": step, optional "checkpoint_listing_on_rank": {r: "none" or
    "unreadable"} (rank r lists no checkpoint, or cannot list them), optional "home_text": text that each rank writes to
    ~/data.txt of a HOME of its own (rank r: text * (r + 1)), optional "capture": keep
    what rank 0 prints in the result}]. Runs in a process group made by
    tests._dist.run_ranks (which also sets torchrun's environment variables and leaves
    with os._exit)."""
    for run in plan:
        name = run["name"]
        if "home_text" in run:   # as node-local files behind one path: each rank its own
            os.environ["HOME"] = os.path.join(root, f"{name}-home-{rank}")
            os.makedirs(os.environ["HOME"], exist_ok=True)
            with open(os.path.join(os.environ["HOME"], "data.txt"), "w") as f:
                f.write(run["home_text"] * (rank + 1))
        cfg = load_config(None, BASE + [f"--job.output_dir={root}", f"--job.name={name}"]
                          + run["overrides"], world_size=world)
        os.makedirs(os.path.join(root, name), exist_ok=True)
        if "resume_from" in run:
            _copy_checkpoint(root, *run["resume_from"], name)
        if rank == 0 and "sigterm_after" in run:
            _sigterm_after(os.path.join(root, name, "metrics.jsonl"), run["sigterm_after"])
        held = None
        if rank == 0 and run.get("locked_by_another_run"):   # as a live run's rank 0 holds it
            import fcntl

            held = os.open(os.path.join(root, name, ".lock"), os.O_RDWR | os.O_CREAT)
            os.write(held, b"host elsewhere pid 4242")
            fcntl.flock(held, fcntl.LOCK_EX)
        printed = io.StringIO()
        hidden = contextlib.nullcontext()
        listing = run.get("checkpoint_listing_on_rank", {}).get(rank)
        if listing is not None:   # what this rank's listing of the checkpoints gives
            from unittest import mock

            from ep_fp8.train import checkpoint

            def listed(folder):
                if listing == "unreadable":
                    raise PermissionError(13, "Permission denied", folder)
                return []
            hidden = mock.patch.object(checkpoint, "complete_checkpoints", listed)
        try:
            with contextlib.redirect_stdout(printed) if run.get("capture") else contextlib.nullcontext(), hidden:
                out = train(cfg)
            result = {"step": out["step"], "stopped": out["stopped"],
                      "checkpoint": out["checkpoint"], "validation": out["validation"]}
            if run.get("capture"):
                result["printed"] = printed.getvalue()
        except NonFiniteLossError as e:
            result = {"error": str(e)}
        except Exception:
            # Recorded for the test that needs this run; the next runs still go (a
            # failure that hits every rank alike leaves the process group usable).
            result = {"error": traceback.format_exc()}
        if held is not None:
            os.close(held)
        with open(os.path.join(root, name, f"result-rank{rank}.json"), "w") as f:
            json.dump(result, f)
