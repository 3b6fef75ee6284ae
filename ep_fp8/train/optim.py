"""AdamW, the warm-up + cosine learning-rate schedule, and gradient-norm clipping that
works across parameters living on different device meshes (experts on the EP mesh,
dense weights on the data-parallel mesh)."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch.distributed.tensor import DTensor


def _mesh_key(p: torch.Tensor):
    # foreach kernels and norm reductions must not mix DTensors of different meshes or
    # placements, so parameters are grouped by both. Meshes by equality: FSDP2 may give
    # parameters of one module equal meshes as distinct objects (the experts' w13 and w2).
    if isinstance(p, DTensor):
        return (p.device_mesh, tuple(p.placements))
    return None


def build_optimizer(model: torch.nn.Module, lr: float, betas: tuple[float, float],
                    weight_decay: float, eps: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. Matrices (ndim >= 2: linear, expert and
    embedding weights) decay; vectors (norm scales, biases) do not. One param group per
    (device mesh, decays) pair, so a foreach update never mixes meshes."""
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in model.parameters():
        if p.requires_grad:
            groups[(_mesh_key(p), p.ndim >= 2)].append(p)
    param_groups = [{"params": ps, "weight_decay": weight_decay if decays else 0.0}
                    for (_, decays), ps in groups.items()]
    # On GPUs one fused kernel per group reads and writes each parameter and state once;
    # the foreach path takes several passes (several times the traffic).
    fused = all(p.is_cuda for group in param_groups for p in group["params"])
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_factor(step: int, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warm-up from
    1/(warmup_steps+1) to 1 over `warmup_steps` steps, then a cosine from 1 down to
    `min_lr_ratio` at the last step (`steps - 1`)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(steps - 1 - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_note(steps: int, warmup_steps: int, min_lr_ratio: float) -> str:
    """A warning when the schedule has no decay: warm-up that fills the whole run (warmup_steps
    >= steps - 1) leaves the lr rising, or at its peak, at the last step; '' otherwise."""
    if warmup_steps < steps - 1 or min_lr_ratio == 1.0:
        return ""
    last = lr_factor(steps - 1, steps, warmup_steps, min_lr_ratio)
    return (f"warning: [lr_schedule] warmup_steps = {warmup_steps} >= [training] steps - 1 = "
            f"{steps - 1}: the lr warms up for the whole run and ends at {last:.3g} x lr, "
            f"with no decay to min_lr_ratio = {min_lr_ratio}")


def build_scheduler(optimizer: torch.optim.Optimizer, steps: int, warmup_steps: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying `lr_factor`; call `.step()` once after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps, warmup_steps, min_lr_ratio))


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Global L2 norm of all gradients (DTensor or plain, any mix of meshes), as a float32
    0-dim tensor on the gradients' device; when max_norm > 0 and the norm exceeds it, every
    gradient is scaled by max_norm / norm. Needs no host synchronisation."""
    by_mesh: dict = defaultdict(list)
    for p in params:
        if p.grad is not None:
            by_mesh[_mesh_key(p.grad)].append(p.grad)
    squares = []
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()   # sums the shards' partial norms over the mesh
        squares.append(norm.float() ** 2)
    if not squares:
        return torch.zeros(())
    total = torch.stack(squares).sum().sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grads in by_mesh.values():
            local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
            torch._foreach_mul_(local, coef.to(local[0].device))
    return total
