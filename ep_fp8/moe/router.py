"""Top-k routing over E experts, with DeepSeek-V3's load-balancing tools.

- Scores: softmax or sigmoid of the gate logits, in float32.
- Selection: top-k of (scores + expert_bias); the bias steers which experts are picked
  but never the weights (auxiliary-loss-free balancing). Optionally group-limited:
  the n_limited_groups best of n_expert_groups groups first, then top-k inside them.
- Weights: the selected scores, optionally renormalised to sum to 1, times route_scale.
- expert_bias is nudged by `update_router_biases` after each optimizer step, from the
  tokens-per-expert counts the router accumulates every forward.
- An optional sequence-level balance loss (`Router.aux_loss`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

SCORE_FUNCS = ("softmax", "sigmoid")  # the gate score functions, owned here
_FLOAT32_BUFFERS = ("expert_bias", "tokens_per_expert")


def count_per_expert(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(T, k) expert ids in [0, E) -> (E,) int64 counts, on the device, no host sync.

    (torch.bincount would read the maximum on the host.)
    """
    flat = topk_idx.reshape(-1)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int64))


class Router(nn.Module):
    """Top-k router. forward(x (T, D)) -> topk_idx (T, k) int64, topk_w (T, k) float32.

    Buffers: expert_bias (E,) float32, persistent (checkpointed); tokens_per_expert (E,)
    float32, not persistent, accumulated every forward in training mode until
    update_router_biases zeroes it. Raises ValueError on inconsistent sizes or an unknown
    score_func.
    """

    def __init__(
        self,
        dim: int,
        n_experts: int,
        top_k: int,
        *,
        score_func: str = "softmax",
        route_norm: bool = True,
        route_scale: float = 1.0,
        n_expert_groups: int = 1,
        n_limited_groups: int = 1,
        load_balance_bias: bool = True,
        aux_loss_coef: float = 0.0,
    ):
        super().__init__()
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        if n_experts < 1 or not 1 <= top_k <= n_experts:
            raise ValueError(f"need 1 <= top_k <= n_experts, got top_k={top_k}, n_experts={n_experts}")
        if n_expert_groups < 1 or n_experts % n_expert_groups:
            raise ValueError(
                f"n_expert_groups ({n_expert_groups}) must divide n_experts ({n_experts})"
            )
        if not 1 <= n_limited_groups <= n_expert_groups:
            raise ValueError(
                f"need 1 <= n_limited_groups <= n_expert_groups, got n_limited_groups="
                f"{n_limited_groups}, n_expert_groups={n_expert_groups}"
            )
        if top_k > n_limited_groups * (n_experts // n_expert_groups):
            raise ValueError(
                f"top_k ({top_k}) exceeds the experts in {n_limited_groups} of "
                f"{n_expert_groups} groups ({n_limited_groups * (n_experts // n_expert_groups)})"
            )
        if top_k == 1 and route_norm:
            raise ValueError("route_norm=True with top_k=1 makes every routing weight 1, so the "
                             "gate would get no gradient from the loss: pass route_norm=False")
        if not (math.isfinite(aux_loss_coef) and aux_loss_coef >= 0):
            raise ValueError(f"aux_loss_coef must be finite and >= 0, got {aux_loss_coef}")
        if not (math.isfinite(route_scale) and route_scale > 0):
            raise ValueError(f"route_scale must be finite and > 0, got {route_scale}")
        self.n_experts, self.top_k = n_experts, top_k
        self.score_func, self.route_norm, self.route_scale = score_func, route_norm, route_scale
        self.n_expert_groups, self.n_limited_groups = n_expert_groups, n_limited_groups
        self.load_balance_bias = load_balance_bias
        self.aux_loss_coef = aux_loss_coef
        # Gradient that backward sends into the aux loss: 1 / grad_accum when the loop
        # divides each micro-batch's loss by grad_accum (see set_aux_grad_scale).
        self.aux_grad_scale = 1.0
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))
        self.register_buffer(
            "tokens_per_expert", torch.zeros(n_experts, dtype=torch.float32), persistent=False
        )
        # Detached coef * sequence loss of the last forward (None until one ran with coef > 0).
        self.last_aux_loss: torch.Tensor | None = None
        self.init_weights()

    def init_weights(self, init_std: float = 0.02) -> None:
        """The gate's weights drawn anew, and the balancing state (bias, counts) zeroed:
        after to_empty() the buffers hold whatever memory they were given."""
        nn.init.trunc_normal_(self.gate.weight, std=init_std)
        with torch.no_grad():
            self.expert_bias.zero_()
            self.tokens_per_expert.zero_()

    def _apply(self, fn, recurse=True):
        # The balancing state stays float32 when the module is cast (model.to(bf16) would
        # make counts above 256 inexact and bias steps vanish); it still follows devices.
        keep = {name: self._buffers.pop(name) for name in _FLOAT32_BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in keep.items():
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == torch.float32 else buf.to(device=moved.device)
        return self

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        topk_idx, topk_w, _ = self.route(x_TD)
        return topk_idx, topk_w

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """forward, plus the (T, E) float32 scores the sequence loss needs."""
        if x_TD.dim() != 2 or x_TD.shape[1] != self.gate.in_features:
            raise ValueError(f"router input must be (tokens, {self.gate.in_features}), "
                             f"got shape {tuple(x_TD.shape)}")
        # Gate in the activation dtype, scores in float32 (softmax/sigmoid and the top-k
        # comparison are where precision matters).
        logits_TE = F.linear(x_TD, self.gate.weight.to(x_TD.dtype)).float()
        if self.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()

        with torch.no_grad():
            choice_TE = scores_TE + self.expert_bias if self.load_balance_bias else scores_TE
            if self.n_expert_groups > 1:
                choice_TE = self._mask_to_top_groups(choice_TE)
            topk_idx = choice_TE.topk(self.top_k, dim=-1).indices  # (T, k)
            # Only training forwards count (an evaluation must not move the biases). An
            # activation-checkpoint recompute runs this forward again and counts the
            # batch twice. Harmless: every count of the layer is doubled alike, so the
            # max/mean imbalance and the signs of mean - count (the bias update) are the
            # same as with single counting.
            if self.training:
                self.tokens_per_expert += count_per_expert(topk_idx, self.n_experts).float()

        topk_w = scores_TE.gather(1, topk_idx)  # (T, k), differentiable
        if self.route_norm:
            topk_w = topk_w / (topk_w.sum(dim=-1, keepdim=True) + 1e-20)
        if self.route_scale != 1.0:
            topk_w = topk_w * self.route_scale
        return topk_idx, topk_w, scores_TE

    def _mask_to_top_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        # DeepSeek-V3: a group's score is the sum of its two best (biased) scores, or its
        # best score when there is no bias; keep the n_limited_groups best groups.
        T, E = choice_TE.shape
        G = self.n_expert_groups
        choice_TGe = choice_TE.view(T, G, E // G)
        if self.load_balance_bias:
            group_score_TG = choice_TGe.topk(min(2, E // G), dim=-1).values.sum(dim=-1)
        else:
            group_score_TG = choice_TGe.amax(dim=-1)
        top_groups = group_score_TG.topk(self.n_limited_groups, dim=-1).indices
        drop_TG = torch.ones_like(group_score_TG, dtype=torch.bool).scatter_(1, top_groups, False)
        return choice_TGe.masked_fill(drop_TG[..., None], float("-inf")).view(T, E)

    def aux_loss(self, scores_TE: torch.Tensor, topk_idx: torch.Tensor, n_seqs: int) -> torch.Tensor:
        """coef * the sequence-wise balance loss of DeepSeek-V3 (eqs. 17-20), a 0-d tensor.

        For each sequence: f_i = E / (k S) * (tokens of the sequence routed to i),
        P_i = mean over the sequence of s_i / sum_j s_j; loss = sum_i f_i P_i, averaged
        over sequences (1.0 when perfectly balanced). Gradients reach the gate through
        P only. Also stores the detached value in last_aux_loss.
        """
        T, E = scores_TE.shape
        if T == 0:  # no tokens (an empty batch or empty sequences): nothing to balance
            loss = scores_TE.sum() * 0.0
            self.last_aux_loss = loss.detach()
            return loss
        if n_seqs < 1 or T % n_seqs:
            raise ValueError(f"{T} tokens do not split into {n_seqs} sequences")
        S, k = T // n_seqs, topk_idx.shape[1]
        probs_BSE = (scores_TE / scores_TE.sum(dim=-1, keepdim=True)).view(n_seqs, S, E)
        with torch.no_grad():
            idx_B = topk_idx.reshape(n_seqs, S * k)
            counts_BE = torch.zeros(n_seqs, E, dtype=torch.float32, device=scores_TE.device).scatter_add_(
                1, idx_B, torch.ones_like(idx_B, dtype=torch.float32)
            )
            f_BE = counts_BE * (E / (k * S))
        loss = self.aux_loss_coef * (f_BE * probs_BSE.mean(dim=1)).sum(dim=-1).mean()
        self.last_aux_loss = loss.detach()
        return loss


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on y whose backward also sends gradient `scale` into aux, so aux is trained
    as if scale * aux had been added to the loss, without the loss knowing about it."""

    @staticmethod
    def forward(ctx, y, aux, scale):
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device, scale)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        shape, dtype, device, scale = ctx.aux_meta
        return grad_y, torch.full(shape, scale, dtype=dtype, device=device), None


def attach_aux_loss(y: torch.Tensor, aux: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Return y (same values) so that backward through it also backpropagates aux with
    gradient `scale`, i.e. as if scale * aux had been added to the loss."""
    return _AttachAuxLoss.apply(y, aux, float(scale))


def set_aux_grad_scale(model: nn.Module, scale: float) -> None:
    """Set the gradient every Router of `model` sends into its aux loss. A loop that
    divides each of n accumulated micro-batch losses by n passes 1 / n, so that n
    micro-batches give the gradient of one batch of all their sequences. Raises
    ValueError for a scale that is not finite and > 0."""
    if not 0 < scale < math.inf:
        raise ValueError(f"aux gradient scale must be finite and > 0, got {scale}")
    for m in model.modules():
        if isinstance(m, Router):
            m.aux_grad_scale = float(scale)


@torch.no_grad()
def update_router_biases(model: nn.Module, rate: float, group=None) -> dict:
    """After an optimizer step: balance statistics and the bias update of every Router.

    For each Router in model: all-reduce tokens_per_expert over `group` (sum; None = no
    reduction, pass the group of all ranks that route different tokens so that every
    rank applies the same update), imbalance = max / mean count (1.0 when nothing was
    routed), and when rate > 0 and the router uses load_balance_bias,
    expert_bias += rate * sign(mean - count); then zero the counts.

    Returns {"load_imbalance_max": float, "load_imbalance_mean": float} over layers
    (both 1.0 for a model without routers). One host read, here, after the step;
    `balance_routers` does the same without it.
    """
    values = balance_routers(model, rate, group).tolist()  # the one host read
    if not values:
        return {"load_imbalance_max": 1.0, "load_imbalance_mean": 1.0}
    return {"load_imbalance_max": max(values), "load_imbalance_mean": sum(values) / len(values)}


@torch.no_grad()
def balance_routers(model: nn.Module, rate: float, group=None) -> torch.Tensor:
    """update_router_biases without its host read: returns each Router's imbalance
    (max / mean count) as a (layers,) float32 tensor on the routers' device, empty for a
    model without routers, for a caller that reads it with its own values. Raises
    ValueError for a rate that is not finite and >= 0."""
    if not (math.isfinite(rate) and rate >= 0):
        raise ValueError(f"rate must be finite and >= 0, got {rate}")
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if not routers:
        return torch.zeros(0)
    counts = torch.cat([r.tokens_per_expert for r in routers])
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    imbalances = []
    for r, c_E in zip(routers, counts.split([r.n_experts for r in routers])):
        mean = c_E.mean()
        imbalances.append(torch.where(mean > 0, c_E.max() / mean.clamp_min(1e-12), 1.0))
        if rate > 0 and r.load_balance_bias:
            r.expert_bias += rate * torch.sign(mean - c_E)
        r.tokens_per_expert.zero_()
    return torch.stack(imbalances)
