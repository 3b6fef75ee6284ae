"""Run a function on N gloo ranks (spawned processes) and collect what each returns.

One process group per call: a test module calls `run_ranks` once (module fixture) and
its worker runs several checks, returning small dicts of numbers that tests assert on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world: int, port: int, backend: str, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share 2 cores
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        queue.put((rank, "ok", fn(rank, world)))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        queue.put((rank, "error", traceback.format_exc()))
    # FSDP2 on gloo sometimes aborts at interpreter exit; leave without running atexit.
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)


def run_ranks(fn, world: int, *, backend: str = "gloo", timeout: float = 150.0) -> list:
    """fn(rank, world) on `world` spawned ranks; returns the list of results by rank.

    Raises RuntimeError with the first failing rank's traceback, or on timeout.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()  # put() writes synchronously: safe before os._exit
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, backend, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: list = [None] * world
    try:
        import time

        deadline, got = time.monotonic() + timeout, 0
        while got < world:
            if not queue.empty():
                rank, status, value = queue.get()
                if status == "error":
                    raise RuntimeError(f"rank {rank} failed:\n{value}")
                results[rank], got = value, got + 1
            elif time.monotonic() > deadline:
                raise RuntimeError(f"ranks did not finish within {timeout} s")
            elif any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                raise RuntimeError(f"a rank died: exit codes {[p.exitcode for p in procs]}")
            else:
                time.sleep(0.05)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results
