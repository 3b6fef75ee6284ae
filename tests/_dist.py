"""Run a function on N ranks (spawned processes, one process group) and collect what each
returns. Shared by the multi-process tests of tests/moe, tests/parallel and tests/train.

One process group per call: a test module calls `run_ranks` once (module fixture) and
its worker runs several checks, returning small dicts of numbers that tests assert on
(or writing files the tests read).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import traceback

from ep_fp8.train.main import free_port

__all__ = ["free_port", "run_ranks"]


def _entry(fn, rank: int, world: int, port: int, backend: str | None, pg_timeout: float | None,
           queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share 2 cores
    # As torchrun sets them, for code that reads the environment (ep_fp8.train).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        # A rank that fails alone leaves the others in a collective: pg_timeout fails them.
        extra = {} if pg_timeout is None else {"timeout": datetime.timedelta(seconds=pg_timeout)}
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, **extra)
        queue.put((rank, "ok", fn(rank, world)))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the traceback
        queue.put((rank, "error", traceback.format_exc()))
    # FSDP2 on gloo sometimes aborts at interpreter exit; leave without running atexit.
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)


def run_ranks(fn, world: int, *, backend: str | None = "gloo", timeout: float = 150.0,
              pg_timeout: float | None = None) -> list:
    """fn(rank, world) on `world` spawned ranks of one `backend` process group (collective
    timeout `pg_timeout` s, None: torch's default); returns the list of fn's (picklable) results by rank. fn must
    be picklable: a module-level function or a functools.partial of one.

    Raises RuntimeError with the first failing rank's traceback, or after `timeout` s.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()  # put() writes synchronously: safe before os._exit
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, backend, pg_timeout, queue),
                         daemon=True)
             for r in range(world)]
    # gloo ranks compute on the CPU: on a GPU machine they must not see the GPU either, or
    # torch.compile initializes CUDA inside a checkpointed forward, which checkpoint forbids.
    hidden = {"CUDA_VISIBLE_DEVICES": ""} if "nccl" not in (backend or "") else {}
    saved = {k: os.environ.get(k) for k in hidden}
    os.environ.update(hidden)   # spawned children copy the environment at start
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
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
