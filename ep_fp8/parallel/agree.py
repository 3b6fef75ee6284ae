"""One verdict for all ranks on a check that each rank makes on its own files or slice."""

from __future__ import annotations

import torch.distributed as dist


def _gathered(value: str) -> list[str]:
    """Every rank's `value` in rank order (one all_gather_object over the default group);
    [value] without a process group or with one rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def first_problem(problem: str) -> str:
    """The first non-empty `problem` over the default group's ranks, in rank order ('' when
    every rank passed ''), the same on every rank: all raise together, and none goes on
    alone to write files or to wait in a collective the others never reach. `problem`
    itself without a process group. Collective (one all_gather_object of the strings)."""
    return next((p for p in _gathered(problem) if p), "")


def first_difference(value: str) -> str:
    """'' when `value` is the same on every rank of the default group, else which rank
    first differs from rank 0 and how ("rank 1: X; rank 0: Y"), the same on every rank.
    Collective (one all_gather_object), like first_problem."""
    values = _gathered(value)
    return next((f"rank {r}: {v}; rank 0: {values[0]}"
                 for r, v in enumerate(values) if v != values[0]), "")
