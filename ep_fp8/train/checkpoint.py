"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

A save writes `step-N.tmp/` (DCP shards of model and optimizer; step, scheduler and data
position; each rank's RNG state), waits for every rank, then rank 0 writes the marker file
`COMPLETE` into it, syncs the marker and the folder's entries to disk, renames it to
`step-N/` and syncs the rename. A crash, kill or power cut at any point before the
rename leaves only a `.tmp` folder, which `latest()` ignores and the next save removes, so
the newest complete checkpoint stays usable. A save that fails on any rank (a full disk,
say) is removed and raised on every rank as CheckpointSaveError, which names the folder,
its free space and the newest complete checkpoint. Saving a step that already has a
checkpoint (a redone step) first renames the old one to `step-N.old/` and deletes it only
after the rename of the new one, so a crash in between leaves `step-N.old/`, which counts
as step N until a `step-N/` exists again. Model and optimizer are saved as sharded
DTensors, so a run may resume on another world size or EP degree (DCP reshards on load).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pickle
import re
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor import empty as dtensor_empty

from ep_fp8.parallel.agree import first_problem
from ep_fp8.paths import fsync_folder

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_OLD_DIR = re.compile(r"^step-(\d+)\.old$")   # a step's previous save, set aside by _commit


def _single() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet_single_process():
    # Without a process group DCP warns on every call that it assumes one process, which
    # is exactly what is meant here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def complete_checkpoints(folder: str) -> list[tuple[int, str]]:
    """[(step, path)] of the complete checkpoints in `folder` (those with the marker),
    oldest first, one per step: `step-N/`, else a `step-N.old/` left by a crash while
    `step-N/` was being replaced; [] when the folder does not exist."""
    if not os.path.isdir(folder):
        return []
    found: dict[int, str] = {}
    for name in sorted(os.listdir(folder), key=lambda n: n.endswith(".old")):  # step-N first
        m = _STEP_DIR.match(name) or _OLD_DIR.match(name)
        if m and os.path.isfile(os.path.join(folder, name, MARKER)):
            found.setdefault(int(m.group(1)), os.path.join(folder, name))
    return sorted(found.items())


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class Checkpointer:
    """Saves to and resumes from `folder`, keeping the newest `keep_last` checkpoints
    (0: keep all). Call `save` and `load` on every rank: both are collective."""

    def __init__(self, folder: str, keep_last: int = 3):
        self.folder, self.keep_last = folder, keep_last

    def latest(self) -> tuple[int, str] | None:
        """(step, path) of the newest complete checkpoint, or None."""
        found = complete_checkpoints(self.folder)
        return found[-1] if found else None

    @staticmethod
    def _state(model, optimizer, scheduler, loader, step: int) -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optimizer": optim_sd,
                "train": {"step": step, "scheduler": scheduler.state_dict(),
                          "data": loader.state_dict()}}

    def save(self, step: int, model, optimizer, scheduler, loader) -> str:
        """Write checkpoint `step`; returns its final path. Collective."""
        rank, world = _rank_world()
        final = os.path.join(self.folder, f"step-{step}")
        tmp = final + ".tmp"
        problem = ""
        if rank == 0:
            try:
                os.makedirs(self.folder, exist_ok=True)
            except OSError as e:   # a file in its place, say, or no permission
                problem = f"rank 0: {_first_failure(e)}"
            shutil.rmtree(tmp, ignore_errors=True)   # left by a crashed save of this step
        # Every rank learns whether the folder is there (this is also the barrier before
        # the shards are written), so that none waits alone in DCP's collectives.
        problem = first_problem(problem)
        if problem:
            raise CheckpointSaveError(self._save_failed(step, problem))
        try:
            with _quiet_single_process():
                dcp.save(self._state(model, optimizer, scheduler, loader, step),
                         checkpoint_id=tmp, no_dist=_single())
            with open(os.path.join(tmp, f"rng-rank{rank}.pt"), "wb") as f:
                torch.save(_rng_state(), f)
                f.flush()
                os.fsync(f.fileno())   # on disk before the commit, as DCP's shards are
        except (CheckpointException, OSError, RuntimeError) as e:   # a full disk, say
            problem = f"rank {rank}: {_first_failure(e)}"
        # Every rank learns of any rank's failure (this is also the barrier before the
        # commit), so that none waits in a collective the failed ones never reach.
        problem = first_problem(problem)
        if not problem and rank == 0:
            try:
                self._commit(tmp, final, step, world)
            except OSError as e:
                problem = f"rank 0: {_first_failure(e)}"
            else:
                self._prune(keep=final)
        problem = first_problem(problem)
        if problem:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)   # frees what the failed save took
            raise CheckpointSaveError(self._save_failed(step, problem))
        return final

    def _save_failed(self, step: int, problem: str) -> str:
        try:
            free = f"{shutil.disk_usage(self.folder).free / 2**30:.1f} GiB free there"
        except OSError:
            free = "its free space unknown"
        newest = self.latest()
        return (f"could not save step {step} to {self.folder} ({free}): {problem}. "
                f"Nothing of this save was kept; the newest complete checkpoint is "
                f"{newest[1] if newest else 'none'}.")

    def _commit(self, tmp: str, final: str, step: int, world: int) -> None:
        marker = os.path.join(tmp, MARKER)
        with open(marker, "w") as f:
            json.dump({"step": step, "world_size": world,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}, f)
            f.flush()
            os.fsync(f.fileno())
        # An older save of the same step (a redone step) is set aside, not deleted, until
        # the new one is in place: a crash in between still leaves a step-N checkpoint.
        # The shards' and the marker's names in the folder reach the disk before it is
        # renamed, and the rename itself after: a power cut leaves a checkpoint or none.
        fsync_folder(tmp)
        old = final + ".old"
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_folder(self.folder)
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self, keep: str) -> None:
        """Removes stale .tmp/.old folders and all but the newest `keep_last` checkpoints.
        A folder that cannot be removed is a warning, not an error: the save is complete."""
        for name in os.listdir(self.folder):
            stale_old = _OLD_DIR.match(name) and os.path.exists(
                os.path.join(self.folder, name[:-4]))
            if (name.endswith(".tmp") and _STEP_DIR.match(name[:-4])) or stale_old:
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)
        if self.keep_last > 0:
            for _, path in complete_checkpoints(self.folder)[:-self.keep_last]:
                if path != keep:
                    # Renamed first (atomic), so that a crash during the deletion leaves a
                    # step-N.tmp the next save sweeps away, not a step-N missing shards.
                    doomed = re.sub(r"(\.old)?$", ".tmp", path, count=1)
                    try:
                        shutil.rmtree(doomed, ignore_errors=True)
                        os.rename(path, doomed)
                    except OSError as e:
                        warnings.warn(f"could not remove the old checkpoint {path}: {e}",
                                      stacklevel=2)
                        continue
                    shutil.rmtree(doomed, ignore_errors=True)

    def load(self, path: str, model, optimizer, scheduler, loader) -> int:
        """Restore everything saved in checkpoint `path` in place; returns its step.
        Model and optimizer are resharded to the current layout. RNG states are restored
        when the world size matches the saved one (else the caller's seeding stands).
        The hyperparameters stay those `optimizer` and `scheduler` were built with (see
        _schedule_from_config). Raises ValueError when `path` is not a complete
        checkpoint, CheckpointMismatchError (on every rank) when its tensors do not fit
        the model or optimizer (another size, a missing key, or model tensors the model
        does not have). Collective."""
        _check_complete(path)
        saved_world = _agree(_read_marker, path)
        state = self._state(model, optimizer, scheduler, loader, step=0)
        # DCP loads the keys the model asks for and ignores the rest: a checkpoint of a
        # model with more layers or experts would load into a smaller one without a word.
        saved = _agree(_saved_keys, path)
        _check_model_keys(path, saved, state["model"], "this model and optimizer")
        # The data state gained entries over time; a checkpoint without one loads without it.
        state["train"]["data"] = {k: v for k, v in state["train"]["data"].items()
                                  if f"train.data.{k}" in saved}
        # The param groups stay the optimizer's own, not loaded: their hyperparameters come
        # from the config (_schedule_from_config), and code that groups parameters otherwise
        # than the code that saved (DCP would want as many groups) still loads the moments.
        groups = state["optimizer"].pop("param_groups")
        _load(path, state, saved, "this model and optimizer", lambda: set_state_dict(
            model, optimizer, model_state_dict=state["model"],
            optim_state_dict={**state["optimizer"], "param_groups": groups}))
        scheduler.load_state_dict(state["train"]["scheduler"])
        _schedule_from_config(optimizer, scheduler)
        loader.load_state_dict(state["train"]["data"])
        rank, world = _rank_world()
        if saved_world == world:
            rng = _agree(_read_rng, path, rank)   # every rank its own file: all succeed or none
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return int(state["train"]["step"])


def load_weights(path: str, model) -> int:
    """Load only the model weights of the complete checkpoint `path` into `model`
    (resharded to its layout, as `Checkpointer.load` does); returns the checkpoint's step.
    Optimizer, schedule, data position and RNG are left as they are. Raises ValueError
    when `path` is not a complete checkpoint, CheckpointMismatchError (on every rank) when
    its model tensors are not exactly this model's, CheckpointDamagedError when its files
    are missing or unreadable. Collective."""
    _check_complete(path)
    _agree(_read_marker, path)
    state = {"model": get_model_state_dict(model), "train": {"step": 0}}
    saved = _agree(_saved_keys, path)
    _check_model_keys(path, saved, state["model"], "this model")
    _load(path, state, saved, "this model", lambda: set_model_state_dict(model, state["model"]))
    return int(state["train"]["step"])


def _check_model_keys(path: str, saved: set[str], model_state: dict, into: str) -> None:
    """CheckpointMismatchError when checkpoint `path` (its keys `saved`) holds model tensors
    that `model_state` lacks (DCP loads the keys the model asks for and ignores the rest, so
    a checkpoint of a model with more layers or experts would load into a smaller one
    without a word), or lacks some of `model_state`'s (named here rather than in DCP's
    words). A checkpoint saved before the experts' w1 and w3 were one w13 parameter fits
    (see _legacy_experts)."""
    held = {k[len("model."):] for k in saved if k.startswith("model.")}
    for experts in _legacy_experts(saved, model_state):
        held = held - {f"{experts}.w1", f"{experts}.w3"} | {f"{experts}.w13"}
    extra = sorted(held - set(model_state))
    missing = sorted(set(model_state) - held)
    for names, what in ((extra, "it holds model tensors this model does not have"),
                        (missing, "it lacks tensors of this model")):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise CheckpointMismatchError(f"{path} could not be loaded into {into}: {what}: {shown}")


def _load(path: str, state: dict, saved: set[str], into: str, apply) -> None:
    """dcp.load of `state` from checkpoint `path` (its keys `saved`; experts saved as w1 and
    w3 load into w13, see _legacy_experts), then apply(); its failures raised as
    CheckpointDamagedError (a file missing, unreadable or cut short: _is_damage) or
    CheckpointMismatchError (naming `into`), and a Ctrl-C during it as KeyboardInterrupt."""
    try:
        with _quiet_single_process(), _fused_on_load(state, _legacy_experts(saved, state["model"])):
            dcp.load(state, checkpoint_id=path, no_dist=_single())
        apply()
    except (CheckpointException, ValueError, RuntimeError, KeyError, OSError) as e:
        failures = _failures(e) if isinstance(e, CheckpointException) else [e]
        if any(isinstance(failure, KeyboardInterrupt) for failure in failures):
            raise KeyboardInterrupt from None  # Ctrl-C during the load, not a misfit
        if any(_is_damage(failure) for failure in failures):   # a file missing or cut short
            raise CheckpointDamagedError(f"{path} is damaged: {_first_failure(e)}") from None
        raise CheckpointMismatchError(f"{path} could not be loaded into {into}: "
                                      f"{_first_failure(e)}") from None


def _is_damage(failure: BaseException) -> bool:
    """Whether `failure`, raised reading a checkpoint's shards, means that its files are
    damaged rather than that its tensors do not fit: a file missing or unreadable (OSError),
    cut short (EOFError, or torch's reader not finding the end of a tensor's archive) or
    overwritten with other bytes (not a pickle, or a pickle of something else)."""
    return (isinstance(failure, (OSError, EOFError, pickle.UnpicklingError))
            or isinstance(failure, RuntimeError)
            and str(failure).startswith("PytorchStreamReader failed"))


def _legacy_experts(saved: set[str], model_state: dict) -> list[str]:
    """The experts (FQN prefixes) saved before the experts' w1 and w3 were one w13
    parameter: those whose `<prefix>.w13` (E, 2H, D) the model has while checkpoint keys
    `saved` hold `<prefix>.w1` and `<prefix>.w3` (E, H, D) instead, and with them their
    optimizer state. w13 is torch.cat([w1, w3], dim=1)."""
    wanted = (k[:-len(".w13")] for k in model_state if k.endswith(".w13"))
    return [p for p in wanted if f"model.{p}.w13" not in saved
            and {f"model.{p}.w1", f"model.{p}.w3"} <= saved]


@contextlib.contextmanager
def _fused_on_load(state: dict, legacy: list[str]):
    """Around a dcp.load of `state` from a checkpoint whose experts `legacy` hold w1 and w3
    (_legacy_experts): the `<prefix>.w13` entries of the model and of the optimizer's
    state give way to `<prefix>.w1` and `<prefix>.w3` entries of half the rows, which DCP
    fills; after it, w13 is their concatenation again, in its own layout."""
    # Not restored if dcp.load raises: the caller then drops `state` (and rebuilding w13
    # would run collectives that the other ranks may not reach).
    optim = state.get("optimizer", {"state": {}})
    tables = []   # (a table, its keys in order, {prefix: its w13 entry})
    for table in (state["model"], optim["state"]):
        keys = list(table)
        fused = {p: table.pop(f"{p}.w13") for p in legacy if f"{p}.w13" in table}
        for p, like in fused.items():
            table[f"{p}.w1"], table[f"{p}.w3"] = _half_rows(like), _half_rows(like)
        tables.append((table, keys, fused))
    yield
    for table, keys, fused in tables:
        for p, like in fused.items():
            table[f"{p}.w13"] = _cat_rows(table.pop(f"{p}.w1"), table.pop(f"{p}.w3"), like)
        ordered = {k: table[k] for k in keys}
        table.clear()
        table.update(ordered)


def _half_rows(like):
    """An empty `like` of half its rows (dim 1), a DTensor on its mesh and placements; for
    an optimizer's state, its entries so (a scalar, AdamW's step, stays whole)."""
    if isinstance(like, dict):
        return {k: _half_rows(v) for k, v in like.items()}
    if not isinstance(like, torch.Tensor):
        return like
    if like.dim() == 0:
        return like.clone()
    shape = (like.shape[0], like.shape[1] // 2, *like.shape[2:])
    if isinstance(like, DTensor):
        return dtensor_empty(shape, dtype=like.dtype, device_mesh=like.device_mesh,
                             placements=like.placements)
    return like.new_empty(shape)


def _cat_rows(w1, w3, like):
    """torch.cat([w1, w3], dim=1) in the layout of `like` (the w13 entry that _half_rows
    halved): for DTensors a local concatenation when no placement splits the rows, else
    one of the whole tensors, redistributed; a scalar is w1's."""
    if isinstance(like, dict):
        return {k: _cat_rows(w1[k], w3[k], v) for k, v in like.items()}
    if not isinstance(like, torch.Tensor) or like.dim() == 0:
        return w1
    if not isinstance(like, DTensor):
        return torch.cat([w1, w3], 1)
    if not any(p.is_shard(1) for p in like.placements):
        return DTensor.from_local(torch.cat([w1.to_local(), w3.to_local()], 1), like.device_mesh,
                                  like.placements, run_check=False, shape=like.shape,
                                  stride=like.stride())
    # every rank holds the whole tensor: each keeps its piece, no scatter
    return distribute_tensor(torch.cat([w1.full_tensor(), w3.full_tensor()], 1),
                             like.device_mesh, like.placements, src_data_rank=None)


def _check_complete(path: str) -> None:
    """ValueError on every rank unless every rank sees checkpoint `path`'s marker (a rank
    that went on alone would wait in the next collective). Collective."""
    rank = _rank_world()[0]
    seen = os.path.isfile(os.path.join(path, MARKER))
    problem = "" if seen else (f"{path} is not a complete checkpoint (no {MARKER} marker"
                               + (f" seen by rank {rank})" if rank else ")"))
    if problem := first_problem(problem):
        raise ValueError(problem)


def _read_marker(path: str) -> int:
    """The world size recorded in checkpoint `path`'s marker; CheckpointDamagedError when
    the marker cannot be read or lacks it."""
    marker = os.path.join(path, MARKER)
    try:
        with open(marker) as f:
            world = json.load(f)["world_size"]
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"world_size {world!r}")
        return world
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointDamagedError(f"{marker} is not a valid marker ({type(e).__name__}: {e})") from None


def _read_rng(path: str, rank: int) -> dict:
    try:
        return torch.load(os.path.join(path, f"rng-rank{rank}.pt"), weights_only=True)
    except Exception as e:   # noqa: BLE001 - missing, truncated or foreign file: say which
        raise CheckpointDamagedError(f"{path}: rank {rank}'s RNG state could not be read "
                                     f"({type(e).__name__}: {e})") from None


def _agree(read, *args):
    """read(*args) on every rank; if it raises CheckpointDamagedError on any rank, every
    rank raises it (the first failing rank's), so that no rank goes on alone to write files
    or wait in a collective."""
    try:
        value, problem = read(*args), ""
    except CheckpointDamagedError as e:
        value, problem = None, str(e)
    if problem := first_problem(problem):
        raise CheckpointDamagedError(problem)
    return value


def _saved_keys(path: str) -> set[str]:
    """The keys saved in checkpoint `path`, flattened by DCP with dots ("model.<name>",
    "train.data.samples_seen", ...); CheckpointDamagedError when its metadata cannot be
    read."""
    try:
        return set(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    # .metadata missing, empty (EOFError), cut short or not a pickle (UnpicklingError), or a
    # pickle of something else (AttributeError: no state_dict_metadata)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError) as e:
        raise CheckpointDamagedError(f"{path} is damaged: its .metadata cannot be read "
                                     f"({type(e).__name__}: {e})") from None


class CheckpointMismatchError(ValueError):
    """A checkpoint could not be loaded into the model and optimizer (most often: its tensors
    have other shapes or names, from another model config)."""


class CheckpointDamagedError(CheckpointMismatchError):
    """A checkpoint with its marker whose files are missing or unreadable."""


class CheckpointSaveError(RuntimeError):
    """A save that failed on some rank (a full disk, say), raised on every rank after the
    partial save was removed; the complete checkpoints are untouched."""


def _failures(e: CheckpointException) -> list[BaseException]:
    """The exceptions a CheckpointException wraps: one (exception, traceback) per failed rank."""
    return [exc for exc, _ in e.failures.values()]


def _first_failure(e: BaseException) -> str:
    """The message of the error behind `e`: a CheckpointException wraps one per rank."""
    if isinstance(e, CheckpointException) and e.failures:
        e = _failures(e)[0]
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


def _schedule_from_config(optimizer, scheduler) -> None:
    """Make the schedule loaded from a checkpoint follow the optimizer's own param groups,
    which were built from the config and not loaded: its base lrs become the groups'
    initial lrs, and each group's lr what the schedule gives at the restored step. A
    resumed run thus follows its config: a lowered [optimizer] lr, another weight decay or
    a longer [training] steps take effect from the first resumed step, while the moments,
    the step count and the schedule's position come from the checkpoint."""
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
