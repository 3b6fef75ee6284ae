"""Activation checkpointing per transformer block, that never repeats an all-to-all.

Both modes wrap each block's forward in torch.utils.checkpoint (non-reentrant) with a
selective-checkpoint policy (create_selective_checkpoint_contexts):

  "full"       keep only the block input and the outputs of all-to-all ops (and their
               waits); recompute everything else in backward.
  "selective"  also keep the outputs of matmuls (aten mm / addmm / bmm, grouped and
               scaled matmuls, attention kernels, the ep_fp8 custom ops), so backward
               recomputes only the cheap element-wise work.

Saving the all-to-all outputs means recomputation replays the dispatch from memory: no
rank sends a token twice, and no rank can wait in a collective the others skip.

The wrapper replaces the block's `forward` on the instance rather than wrapping the
module, so parameter names (and hence checkpoints) are the same with and without AC.
"""

from __future__ import annotations

import functools

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

AC_MODES = ("none", "full", "selective")


def _ops(*names: str) -> set:
    """The aten overloads among `names` that this torch build has."""
    found = set()
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            found.add(packet.default)
    return found


_MATMUL_OPS = _ops(
    "mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_mm", "_scaled_grouped_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
)
# A compiled submodule inside a checkpointed block is one such op only where inductor's
# wrap_inductor_compiled_regions is on; it is off by default and left off here (saving
# whole compiled regions cost memory and no speed, docs/parallelism.md), so by default
# compiled regions are recomputed under "selective" as under "full".
_compiled_region = getattr(torch._higher_order_ops, "inductor_compiled_code", None)
if _compiled_region is not None:
    _MATMUL_OPS.add(_compiled_region)


def _ignore_profiler_ops_in_sac() -> None:
    """Let profiler annotations pass through selective checkpointing uncounted.

    A nested FSDP2 unit (a block's experts) re-entered during recomputation records one
    more annotation ("FSDP::root_pre_forward") than in forward, and torch's SAC replays
    ops by call index, so it would fail with "invocation index ... not found in storage".
    Annotations are not tensor computation (a proposed upstream fix ignores them the same
    way). Idempotent: adds the profiler ops to torch's ignore set.
    """
    ignored = getattr(torch_checkpoint, "SAC_IGNORED_OPS", None)
    if ignored is None:  # a torch whose SAC has no ignore list
        return
    for name in ("_record_function_enter", "_record_function_enter_new",
                 "_record_function_exit"):
        packet = getattr(torch.ops.profiler, name, None)
        if packet is not None:
            ignored.update(getattr(packet, o) for o in packet.overloads())


def is_all_to_all(func) -> bool:
    """True for all-to-all ops, functional (_c10d_functional[_autograd]) or c10d."""
    name = str(func)
    return "all_to_all" in name or "alltoall" in name


def _is_wait(func) -> bool:
    return str(func).startswith("_c10d_functional.wait_tensor")


def ac_policy(ctx, func, *args, save_matmuls: bool, **kwargs) -> CheckpointPolicy:
    """MUST_SAVE for all-to-all outputs (and matmuls when save_matmuls), else recompute."""
    if is_all_to_all(func) or _is_wait(func):
        return CheckpointPolicy.MUST_SAVE
    if save_matmuls and (func in _MATMUL_OPS or getattr(func, "namespace", None) == "ep_fp8"):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


class CheckpointedForward:
    """Calls `forward` under torch.utils.checkpoint with the policy of `mode`."""

    def __init__(self, forward, mode: str) -> None:
        self.forward, self.mode = forward, mode
        self._policy = functools.partial(ac_policy, save_matmuls=mode == "selective")

    def _contexts(self):
        return create_selective_checkpoint_contexts(self._policy)

    def __call__(self, *args, **kwargs):
        return checkpoint(self.forward, *args, use_reentrant=False,
                          context_fn=self._contexts, **kwargs)


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str) -> None:
    """Checkpoint every block of `blocks` with `mode` ("none" | "full" | "selective").

    Raises ValueError on an unknown mode or a block that is already checkpointed, before
    changing any block.
    """
    check_activation_checkpointing(blocks, mode)
    if mode == "none":
        return
    _ignore_profiler_ops_in_sac()
    for block in blocks:
        block.forward = CheckpointedForward(block.forward, mode)


def check_activation_checkpointing(blocks: nn.ModuleList, mode: str) -> None:
    """Raise what apply_activation_checkpointing(blocks, mode) would, changing nothing."""
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpoint.mode must be one of {AC_MODES}, got {mode!r}")
    if mode == "none":
        return
    for i, block in enumerate(blocks):
        if isinstance(block.__dict__.get("forward"), CheckpointedForward):
            raise ValueError(f"block {i} is already activation-checkpointed")
