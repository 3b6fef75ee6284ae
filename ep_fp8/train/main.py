"""Command line: `python -m ep_fp8.train --config FILE [--section.key=value ...]`.

Reads and checks the config first (errors name the file and key, before any process
group exists), then joins the process group torchrun describes in the environment (or a
one-process group when started without torchrun), trains, and leaves.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist

from ep_fp8.train.config import ConfigError, load_config

USAGE = """usage: python -m ep_fp8.train [--check] --config FILE [--section.key=value ...]

Trains the model that the TOML file FILE describes; each --section.key=value overrides
one key of it (e.g. --training.steps=20 --float8.enabled=false). Keys: docs/config.md.
Several processes: torchrun --nproc-per-node=N -m ep_fp8.train --config FILE
--check: only read and check the config for WORLD_SIZE processes (default 1), start
nothing and write no file of the run; exit code 0 when it is fine, 2 with the error
when not."""


def parse_cli(argv: list[str]) -> tuple[str, list[str]]:
    """(config path, ['--section.key=value', ...]); `--section.key value` is accepted too.
    Raises ConfigError for an argument of another form or a missing --config."""
    path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 1
        if name == "--config":
            if not value:
                raise ConfigError(f"command line: {arg!r} names no file: write --config FILE"
                                  f"\n{USAGE}")
            if path is not None:
                raise ConfigError(f"command line: --config given twice ({path!r} and "
                                  f"{value!r}); give one config file\n{USAGE}")
            path = value
        elif name.startswith("--") and "." in name and (eq or value):
            overrides.append(f"{name}={value}")
        elif name.startswith("--") and "." in name:   # a bare flag, as other trainers take them
            raise ConfigError(f"command line: {arg!r} has no value: write {arg}=true (or "
                              f"{arg}=VALUE)\n{USAGE}")
        else:
            raise ConfigError(f"command line: cannot read {arg!r}\n{USAGE}")
        i += 1
    if path is None:
        raise ConfigError(f"command line: --config FILE is required\n{USAGE}")
    return path, overrides


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a one-process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_type: str) -> None:
    """Join the process group of torchrun's environment variables, or make a one-process
    group when they are absent. NCCL on CUDA, gloo on the CPU."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


# main's answer when a SIGINT stopped the run (after the save when it reached the loop).
INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    """Returns the process exit code: 0 done (or stopped by SIGTERM after saving), 1 the
    loss became NaN/Inf or a checkpoint could not be saved, 2 a bad config or command
    line, INTERRUPTED (130) stopped by SIGINT, after saving when the training loop had
    started (`python -m ep_fp8.train` then ends the process by SIGINT)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    check_only = "--check" in argv
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        path, overrides = parse_cli([a for a in argv if a != "--check"])
        cfg = load_config(path, overrides, world_size=world)
    except (ConfigError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if check_only:
        return 0
    from ep_fp8.train.checkpoint import CheckpointSaveError
    from ep_fp8.train.loop import NonFiniteLossError, resolve_device, say, train

    init_distributed(resolve_device(cfg).type)
    code = 0
    # The errors below are raised alike on every rank (agreed, or from all-reduced
    # values): rank 0 says them once.
    try:
        if train(cfg)["stopped"].startswith("stopped by SIGINT"):
            code = INTERRUPTED
    except ConfigError as e:   # found on reading the data or a checkpoint, before anything was written
        say(f"config error: {e}", sys.stderr)
        code = 2
    except (NonFiniteLossError, CheckpointSaveError) as e:
        say(f"error: {e}", sys.stderr)
        code = 1
    except KeyboardInterrupt:  # a SIGINT before the training loop took over SIGINT
        print("interrupted (SIGINT) before training started: nothing saved", file=sys.stderr)
        code = INTERRUPTED
    finally:
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
