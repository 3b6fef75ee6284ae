"""The training loop: build the model from its preset, parallelize it, and train with
AdamW, warm-up + cosine, clipping and gradient accumulation; update the router biases
after each step; log, checkpoint, resume, and stop cleanly on SIGTERM, Ctrl-C (SIGINT) or a
NaN/Inf loss.

`train(cfg)` expects the process group to exist (see `ep_fp8.train.main`); it may be
called several times in one process (the tests do).
"""

from __future__ import annotations

import datetime
import math
import os
import signal
import sys
import threading
import typing

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ep_fp8 import rng
from ep_fp8.parallel.agree import first_difference, first_problem
from ep_fp8.paths import new_file
from ep_fp8.train.checkpoint import (CheckpointDamagedError, CheckpointMismatchError, Checkpointer,
                                     load_weights)
from ep_fp8.train.config import (Config, ConfigError, checkpoint_dir, resolve_model_args, run_dir,
                                 to_dict, to_toml)
from ep_fp8.train.data import (DataLoader, MarkovSource, build_source,
                                build_validation_source)
from ep_fp8.train.metrics import MetricsLogger, peak_flops
from ep_fp8.train.optim import build_optimizer, build_scheduler, clip_grad_norm_, schedule_note
from ep_fp8.train.validate import EARLIER_RUNS, resolve_ep


# Start-up tokenization this slow gets a hint at token files (ep_fp8.train.prepare_data).
SLOW_TOKENIZING_S = 30.0


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or Inf; the message names the step."""


def resolve_device(cfg: Config) -> torch.device:
    """The device this rank trains on: cuda:LOCAL_RANK, or the CPU."""
    if cfg.training.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """Parameter dtype for compute: "auto" is bfloat16 on CUDA and float32 on the CPU."""
    if cfg.training.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.training.dtype)


def dispatch_payload(cfg: Config) -> str:
    """The all-to-all payload: float8 only while the experts are float8, so switching
    float8.enabled alone turns a float8 run into its bf16 twin."""
    return cfg.float8.dispatch_payload if cfg.float8.enabled else "bf16"


def build_model(cfg: Config, device: torch.device, dtype: torch.dtype):
    """ep_fp8.model.Transformer from the preset + overrides, parallelized over all ranks.
    Returns (model, model_args, parallel_dims)."""
    from ep_fp8.model import Transformer
    from ep_fp8.parallel import ParallelDims, parallelize_model

    args, world, rep = resolve_model_args(cfg), dist.get_world_size(), cfg.parallel.dp_replicate
    dims = ParallelDims(world_size=world, dp_replicate=rep,
                        ep=resolve_ep(cfg.parallel.ep, args.n_experts, world, rep))
    mesh = dims.build_mesh(device.type)
    # Built on the meta device and materialised as shards: a rank never holds the whole
    # model, only one full parameter at a time while init_weights draws it (seeded per
    # parameter over its global shape), so every sharding and EP degree starts equal.
    torch.manual_seed(rng.generator_seed(cfg.job.seed, "global", 0))  # any other randomness, equally per rank
    with torch.device("meta"):
        model = Transformer(args, float8=cfg.float8.enabled, float8_backend=cfg.float8.backend,
                            exact_scales=cfg.float8.exact_scales)
    model = parallelize_model(model, dims, mesh, dispatch_payload=dispatch_payload(cfg),
                              fsdp=True, ac_mode=cfg.activation_checkpoint.mode,
                              compile=cfg.compile.enabled, param_dtype=dtype,
                              reduce_dtype=torch.float32)
    model.to_empty(device=device)
    model.init_weights(seed=cfg.job.seed)
    return model, args, dims


def end_by_signal(signum: int) -> None:
    """End this process by signal `signum` as if it had never been caught, so that whoever
    started it (a shell script, torchrun) sees that signal, not an exit code."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


class _StopFlag:
    """The first SIGTERM or SIGINT (Ctrl-C; under torchrun, which forwards it to its
    workers) asks the loop to finish the step, save and stop. A second one of either ends
    the process at once by that signal, without saving (checkpoints are written
    atomically, so the complete ones stay usable). A SIGINT this process inherited as
    ignored (a background job) stays ignored."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.name = ""   # the first signal received ('' while none)
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        if self.name:  # the second signal: die by it, as if it had not been caught
            if rank0:
                print_or_mute(f"{name} after {self.name}: ending now without saving; complete "
                              "checkpoints are kept", sys.stderr)
            end_by_signal(signum)
            return
        self.name = name
        if rank0:
            print_or_mute(f"{name}: stopping after this step (with a checkpoint when "
                          f"[checkpoint] enabled = true); a second SIGINT or SIGTERM ends the "
                          "run at once without saving", sys.stderr)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


_LOCKS: dict[str, int] = {}   # run folder lock file -> its descriptor, held until exit


def _lock_run_folder(cfg: Config, create: bool) -> str:
    """Rank 0 takes an exclusive lock on <run>/.lock for the life of the process, so that
    two runs never share a run folder (one would resume from the other's live checkpoints
    and delete its save in progress). Returns '' or why the folder is taken. create=False
    only checks an existing lock file, writing nothing. Where the file system has no
    locks, the run goes on unlocked."""
    path = os.path.join(run_dir(cfg), ".lock")
    if path in _LOCKS or (not create and not os.path.exists(path)):
        return ""
    import fcntl

    try:
        if create:
            os.makedirs(run_dir(cfg), exist_ok=True)
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except OSError:
        return ""   # gone since, or unwritable: validation has checked the folder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return (f"another run is using {run_dir(cfg)} (its .lock is held by {holder}): wait "
                "for it to end, or choose another [job] name")
    except OSError:   # no locks on this file system
        os.close(fd)
        return ""
    if not create:   # checked only: the lock is taken for real after the resume
        os.close(fd)
        return ""
    import socket

    os.ftruncate(fd, 0)
    os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}".encode())
    _LOCKS[path] = fd
    return ""


def _agree_on_lock(cfg: Config, create: bool) -> None:
    """_lock_run_folder on rank 0; every rank raises ConfigError if it is taken."""
    if problem := first_problem(_lock_run_folder(cfg, create) if dist.get_rank() == 0 else ""):
        raise ConfigError(f"{cfg.source}: {problem}")


def print_or_mute(msg: str, stream=None) -> None:
    """print(msg, file=stream or sys.stdout, flush=True); when the stream is a pipe whose
    reader is gone (`run | tee log`, and Ctrl-C ended tee too), it is sent to /dev/null
    from then on instead of raising, so that the run still finishes its step and saves."""
    stream = stream or sys.stdout
    try:
        print(msg, file=stream, flush=True)
    except (BrokenPipeError, ValueError):   # ValueError: a closed stream
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())   # also lets the exit-time flush succeed
            os.close(devnull)
        except (OSError, ValueError):
            pass


def say(msg: str, stream=None) -> None:
    """Rank 0 prints msg (print_or_mute; stdout unless `stream`): for what every rank knows
    alike."""
    if dist.get_rank() == 0:
        print_or_mute(msg, stream)


def _keep_earlier_run_files(cfg: Config) -> None:
    """Rank 0, a run that starts from step 0: the config.toml, metrics.jsonl and tb/ of an
    earlier run in this folder (one that saved no checkpoints: validation refuses the
    others) move to <run>/earlier-runs/<their date>/ rather than being overwritten."""
    if dist.get_rank() != 0:
        return
    folder = run_dir(cfg)
    names = [n for n in ("config.toml", "metrics.jsonl", "tb") if os.path.lexists(os.path.join(folder, n))]
    if not names:
        return
    when = max(os.path.getmtime(os.path.join(folder, n)) for n in names)
    stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
    dest, n = os.path.join(folder, EARLIER_RUNS, stamp), 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(folder, EARLIER_RUNS, f"{stamp}-{n}")
    os.makedirs(dest)
    for name in names:
        os.rename(os.path.join(folder, name), os.path.join(dest, name))
    say(f"an earlier run's {', '.join(names)} in {folder} moved to {dest}")


def _save_and_print_config(cfg: Config) -> None:
    """Rank 0: print the resolved config once and save it as <run>/config.toml."""
    if dist.get_rank() != 0:
        return
    text = to_toml(cfg, resolve_model=True)
    path = os.path.join(run_dir(cfg), "config.toml")
    # Whole or not at all: a resume rewrites it, and export and later resumes read it.
    with new_file(path, path, overwrite=True) as f:
        f.write(text.encode())
    print_or_mute(f"config ({cfg.source}), resolved:\n{text}")


def _describe(cfg: Config, args, dims, device: torch.device, dtype: torch.dtype) -> None:
    """Rank 0: one line on the model and the layout, the float8 backend resolved."""
    from ep_fp8.model import param_counts
    from ep_fp8.ops import resolve_backend

    total, active = param_counts(args)
    float8 = "off"
    if cfg.float8.enabled:
        # The experts' first GEMM (D -> 2H, w1 and w3 stacked); the other differs only in K and N.
        backend = resolve_backend(cfg.float8.backend, device, args.dim, 2 * args.expert_hidden_dim,
                                  G=args.n_experts // max(dims.ep, 1) or None)
        float8 = f"on ({cfg.float8.backend}: {backend})"
    say(f"model {cfg.model.name}: {total / 1e6:.1f}M parameters, {active / 1e6:.1f}M active "
         f"per token; {dims.world_size} rank{'s' if dims.world_size > 1 else ''}, ep={dims.ep}, dp_replicate={dims.dp_replicate}, "
         f"device {device.type}, {str(dtype).removeprefix('torch.')}, float8 {float8}, "
         f"dispatch payload {dispatch_payload(cfg)}")


def build_optimizer_and_scheduler(cfg: Config, model):
    """AdamW over `model` as [optimizer] says, and the warm-up + cosine schedule of
    [lr_schedule] over [training] steps."""
    o = cfg.optimizer
    optimizer = build_optimizer(model, o.lr, tuple(o.betas), o.weight_decay, o.eps)
    scheduler = build_scheduler(optimizer, cfg.training.steps, cfg.lr_schedule.warmup_steps,
                                cfg.lr_schedule.min_lr_ratio)
    return optimizer, scheduler


def train_step(model, loader: DataLoader, optimizer, scheduler, grad_accum: int,
               max_norm: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step over `grad_accum` micro-batches. Returns (this rank's mean loss,
    the global gradient norm before clipping, the lr used); the tensors stay on the device
    (no host synchronisation here). The MoE aux losses get gradient 1 / grad_accum, like
    the cross-entropy, so n micro-batches train as one batch of all their sequences."""
    from ep_fp8.moe import set_aux_grad_scale

    set_aux_grad_scale(model, 1.0 / grad_accum)
    loss_sum = torch.zeros((), device=device)
    for _ in range(grad_accum):
        inputs_BS, targets_BS = (x.to(device, non_blocking=True) for x in loader.next())
        logits_BSV = model(inputs_BS)
        loss = F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten())
        (loss / grad_accum).backward()
        loss_sum += loss.detach() / grad_accum
    grad_norm = clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    lr = optimizer.param_groups[0]["lr"]   # the lr this step used
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, lr


class StepResult(typing.NamedTuple):
    loss: float           # averaged over the ranks
    grad_norm: float      # global, before clipping
    lr: float
    load_imbalance_max: float
    sigterm_ranks: int    # how many ranks asked to stop, by signal
    sigint_ranks: int


def loop_step(cfg: Config, model, loader: DataLoader, optimizer, scheduler, device: torch.device,
              group=None, stop_signal=None) -> StepResult:
    """One step of the training loop: train_step, the routers' bias update, then one small
    all-reduce over `group` (None: one rank) of the loss and of each rank's stop flag
    (`stop_signal`: "SIGTERM", "SIGINT" or None, or a function returning one, called after
    the step's work is issued, so that a signal received while it ran counts for it), so
    that all ranks stop after the same step even when only some were signalled. Reads the
    loss, gradient norm, flags and the routers' imbalances on the host in one read: the
    loop's one sync per step; before it, draws the next step's batches
    (DataLoader.prefetch)."""
    from ep_fp8.moe import balance_routers

    t = cfg.training
    loss, grad_norm, lr = train_step(model, loader, optimizer, scheduler, t.grad_accum, t.max_norm, device)
    imbalance_L = balance_routers(model, cfg.router.bias_update_rate, group=group)
    if callable(stop_signal):
        stop_signal = stop_signal()
    # Filled on the device: torch.tensor(..., device=cuda), like flags[i] = 1, copies from
    # host memory and waits for the whole step, so the data below was drawn with the GPU
    # idle (3% of moe_1b's step on one H200).
    flags = torch.zeros(2, dtype=loss.dtype, device=device)
    for i, name in enumerate(("SIGTERM", "SIGINT")):
        if stop_signal == name:
            flags[i].fill_(1)
    shared = torch.cat([loss.reshape(1), flags])
    world = 1
    if group is not None:
        dist.all_reduce(shared, group=group)
        world = dist.get_world_size(group)
    # The next step's batches are drawn here, while the device works through this step,
    # and those of 8 steps at once: the synthetic chain's cost is per call more than per
    # sample (moe_1b's 16 x 2048 tokens: 12 ms for one step's, 19 ms for 8 steps').
    loader.prefetch(t.grad_accum, ahead=8 * t.grad_accum)
    loss_avg, n_term, n_int, norm, *imbalances = torch.cat([
        shared[:1] / world, shared[1:], grad_norm.to(device, loss.dtype).reshape(1),
        imbalance_L.to(device, loss.dtype)]).tolist()
    return StepResult(loss_avg, norm, lr, max(imbalances, default=1.0), int(n_term), int(n_int))


@torch.no_grad()
def evaluate(model, source, batch_size: int, batches: int, device: torch.device,
             group=None) -> float:
    """Mean cross-entropy (nats per token) of `model` on the first `batches` global batches
    of `source`, every rank of `group` (None: this rank alone) reading its own rows of each
    as in training: the same samples at every call. The model runs in eval mode (its
    routers count nothing, so the bias update is untouched) and returns to the mode it was
    in. Every rank of `group` must call it (the MoE layers' all-to-alls); one host read."""
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    loader = DataLoader(source, batch_size, rank, world)
    total = torch.zeros(2, dtype=torch.float64, device=device)   # loss sum, tokens
    was_training = model.training
    model.eval()
    try:
        for _ in range(batches):
            inputs_BS, targets_BS = (x.to(device, non_blocking=True) for x in loader.next())
            logits_BSV = model(inputs_BS)
            total[0] += F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten(),
                                        reduction="sum")
            total[1] += targets_BS.numel()
    finally:
        model.train(was_training)
    if group is not None:
        dist.all_reduce(total, group=group)
    loss_sum, tokens = total.tolist()
    return loss_sum / tokens


def _held_out_sequences(cfg: Config, world: int) -> int:
    """Sequences one evaluation reads: [validation] batches global batches."""
    return cfg.validation.batches * world * cfg.training.batch_size


def _held_out_problem(cfg: Config, val_source, world: int) -> str:
    """'' or why the held-out files cannot fill one evaluation."""
    v, needed = cfg.validation, _held_out_sequences(cfg, world)
    if isinstance(val_source, MarkovSource) or val_source.n_windows >= needed:
        return ""
    return (f"{cfg.source}: [validation] path {v.path!r} holds {val_source.n_windows} "
            f"sequence(s) of seq_len + 1 = {cfg.training.seq_len + 1} tokens, fewer than the "
            f"{needed} one evaluation reads (batches {v.batches} x batch_size "
            f"{cfg.training.batch_size} x {world} ranks): lower [validation] batches or add "
            f"held-out text")


def train(cfg: Config) -> dict:
    """Train as `cfg` says. Returns {"step", "records", "validation", "stopped",
    "checkpoint"}: the last step done, the logged metric records, the validation records
    ({"step", "val_loss"}), why it stopped early ("" if it did not), and the last
    checkpoint written. Raises NonFiniteLossError naming the step when the loss or the
    gradient norm becomes NaN or Inf, and ConfigError (before anything is written) when
    the data files do not hold what [data] and [validation] ask or the checkpoint to
    resume from does not fit the model this config builds."""
    from ep_fp8.model import flops_per_token

    rank, world = dist.get_rank(), dist.get_world_size()
    device, t = resolve_device(cfg), cfg.training
    dtype = resolve_dtype(cfg, device)
    problem, val_source = "", None
    if cfg.validation.enabled:   # first: the held-out files are usually the smaller read
        try:
            val_source = build_validation_source(cfg)
            problem = _held_out_problem(cfg, val_source, world)
        except ValueError as e:
            problem = f"{cfg.source}: [validation] {e}"
    if not problem:
        try:   # reading the data finds what validation could not (too few tokens, a bad line)
            source = build_source(cfg)
        except ValueError as e:   # data.py names the file (and line) of every read or parse error
            problem = f"{cfg.source}: [data] {e}"
    if problem := first_problem(problem):   # every rank stops, not only the one that failed
        raise ConfigError(problem)
    for section, what, read in (("validation", "held-out data", val_source),
                                ("data", "data", source)):
        if read is not None and (differs := first_difference(read.fingerprint)):   # collective
            raise ConfigError(f"{cfg.source}: [{section}] the ranks read different {what} "
                              f"({differs}): every rank must see the same files (on many nodes, "
                              f"a path on a file system they share)")
    model, args, dims = build_model(cfg, device, dtype)
    _describe(cfg, args, dims, device, dtype)
    if note := source.note:  # e.g. a tokenizer without an end-of-document token
        say(note)
    if cfg.validation.path and not cfg.validation.enabled:
        say(f"[validation] path = {cfg.validation.path!r} is set, but enabled = false: this run "
            f"computes no held-out loss")
    seconds = getattr(source, "seconds", None)   # to tokenize text: TokenFileSource, or a blend
    if seconds is not None and seconds >= SLOW_TOKENIZING_S:
        say(f"[data] reading and tokenizing the [data] files took {seconds:.0f} s on every "
            f"rank; python -m ep_fp8.train.prepare_data does it once, into a token file that "
            f"the ranks map (docs/getting_started.md, \"Large corpora\")")
    if note := schedule_note(t.steps, cfg.lr_schedule.warmup_steps, cfg.lr_schedule.min_lr_ratio):
        say(note)
    optimizer, scheduler = build_optimizer_and_scheduler(cfg, model)
    loader = DataLoader(source, t.batch_size, rank, world)
    ckpt = Checkpointer(checkpoint_dir(cfg), cfg.checkpoint.keep_last)

    step, last_ckpt = 0, None
    _agree_on_lock(cfg, create=False)   # a live run's checkpoints are not ours to load
    found, unreadable = None, ""
    if cfg.checkpoint.enabled and cfg.checkpoint.resume:
        try:
            found = ckpt.latest()
        except OSError as e:   # a folder this rank cannot list: said on every rank
            unreadable = f"rank {rank}: {e}"
    if problem := first_problem(unreadable):   # collective, as the next one
        raise ConfigError(f"{cfg.source}: cannot resume: the checkpoint folder cannot be "
                          f"read ({problem})")
    # Every rank resumes from the same checkpoint or none does (collective).
    if differs := first_difference(str(found[1] if found else None)):
        raise ConfigError(
            f"{cfg.source}: cannot resume: the ranks see different newest checkpoints in "
            f"{ckpt.folder} ({differs}); every rank must see the same checkpoint folder (one "
            f"shared file system)")
    if found:
        try:
            step = ckpt.load(found[1], model, optimizer, scheduler, loader)
        except CheckpointDamagedError as e:   # raised on every rank: all exit alike
            raise ConfigError(
                f"{cfg.source}: cannot resume: {e}. Move that checkpoint folder away to resume "
                f"from the one before it, or choose another [job] name") from None
        except CheckpointMismatchError as e:   # raised on every rank: all exit alike
            raise ConfigError(
                f"{cfg.source}: cannot resume: {e}. Resume with the config that run was saved "
                f"with ({os.path.join(run_dir(cfg), 'config.toml')}; on another number of ranks "
                f"add --parallel.ep=0), or choose another [job] name") from None
        last_ckpt = found[1]
        say(f"resumed from {found[1]} (step {step})")
        if loader.resume_note:
            say(loader.resume_note)
        if step >= t.steps:
            say(f"nothing to train: the checkpoint is at step {step} and [training] steps "
                 f"is {t.steps}; raise training.steps to continue")
    elif initial := os.path.expanduser(cfg.checkpoint.initial_load):
        try:
            from_step = load_weights(initial, model)
        except CheckpointDamagedError as e:   # a CheckpointMismatchError: caught before it
            raise ConfigError(
                f"{cfg.source}: [checkpoint] initial_load: {e}. Give another complete "
                f"checkpoint (a step-N folder of a run)") from None
        except CheckpointMismatchError as e:   # raised on every rank alike
            raise ConfigError(
                f"{cfg.source}: [checkpoint] initial_load: {e}. The model this config builds must "
                f"have the sizes of the one saved there ([model] name and overrides; its run's "
                f"config.toml lists them)") from None
        except ValueError as e:   # not a complete checkpoint, or a damaged one
            raise ConfigError(f"{cfg.source}: [checkpoint] initial_load: {e}") from None
        say(f"weights from {initial} (its step {from_step}); optimizer, learning-rate "
            f"schedule, data order and step start anew")

    _agree_on_lock(cfg, create=True)   # held until the process ends
    if step == 0:
        _keep_earlier_run_files(cfg)
    _save_and_print_config(cfg)   # after the resume: a config that cannot resume writes nothing
    metrics = MetricsLogger(
        run_dir(cfg), rank=rank, world=world, steps=t.steps, log_every=cfg.metrics.log_every,
        tokens_per_step=world * t.batch_size * t.seq_len * t.grad_accum,
        flops_per_token=flops_per_token(args, t.seq_len),
        peak=peak_flops(device, cfg.metrics.peak_flops), device=device,
        jsonl=cfg.metrics.jsonl, tensorboard=cfg.metrics.tensorboard, printer=print_or_mute)
    metrics.start(cfg.job.name, to_dict(cfg, resolve_model=True), resumed_step=step)
    dp_group = dist.group.WORLD if world > 1 else None   # every rank reads its own data
    v = cfg.validation
    if val_source is not None:
        sequences = _held_out_sequences(cfg, world)
        say(f"validation: every {v.interval} steps and at step {t.steps}, on the same "
            f"{sequences} held-out sequences ({sequences * t.seq_len:,} tokens) each time")
    stopped = ""
    model.train()
    with _StopFlag() as stop:
        while step < t.steps and not stopped:
            step += 1
            loss_avg, norm, lr, imbalance, n_term, n_int = loop_step(
                cfg, model, loader, optimizer, scheduler, device, dp_group, lambda: stop.name)
            if not (math.isfinite(loss_avg) and math.isfinite(norm)):
                # A non-finite gradient has already reached the weights: stop here, with
                # the step logged (the curve shows where it diverged).
                metrics.step(step, loss_avg, norm, lr, imbalance, last=True)
                metrics.close()
                raise NonFiniteLossError(
                    f"loss is {loss_avg} and gradient norm {norm} at step {step}: stopping. "
                    f"The last complete checkpoint is {last_ckpt or 'none'}; lower "
                    f"[optimizer] lr or raise [lr_schedule] warmup_steps before resuming.")
            if n_term + n_int > 0:  # the same words on every rank, whichever were signalled
                stopped = f"stopped by {'SIGTERM' if n_term else 'SIGINT'} after step {step}"
            metrics.step(step, loss_avg, norm, lr, imbalance, last=bool(stopped))
            if cfg.checkpoint.enabled and (step % cfg.checkpoint.interval == 0
                                           or step == t.steps or stopped):
                with metrics.paused():   # not training time: tokens/s and MFU leave it out
                    last_ckpt = ckpt.save(step, model, optimizer, scheduler, loader)
                say(f"checkpoint {last_ckpt}")
            # After the save (an evaluation that fails loses no checkpoint); also at a step
            # a signal stops after, when it is due: a resumed run would not come back to it.
            if val_source is not None and (step % v.interval == 0 or step == t.steps):
                with metrics.paused():   # not training time
                    val_loss = evaluate(model, val_source, t.batch_size, v.batches, device,
                                        dp_group)
                metrics.validation(step, val_loss)
        if stop.name and not stopped:
            # Received too late for the last step's flags (while its results were awaited,
            # saved or evaluated): the run is complete, but it was asked to stop, and says
            # so (after a Ctrl-C, main's exit status tells a calling script to stop too).
            stopped = f"stopped by {stop.name} after step {step}"
        if stopped and not cfg.checkpoint.enabled:
            stopped += " (checkpoint.enabled = false: nothing saved)"
        entropy = source.entropy if isinstance(source, MarkovSource) else None
        # Still under the stop flag: a Ctrl-C now is not a KeyboardInterrupt, which main
        # would report as one before training started.
        say(metrics.summary(stopped=stopped, entropy=entropy, checkpoint=last_ckpt))
    return {"step": step, "records": metrics.records, "validation": metrics.val_records,
            "stopped": stopped, "checkpoint": last_ckpt}
