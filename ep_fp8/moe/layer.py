"""The MoE layer: router -> dispatcher -> grouped experts -> combine (+ shared experts)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ep_fp8.moe.dispatch import LocalDispatcher
from ep_fp8.moe.experts import FeedForward, GroupedExperts
from ep_fp8.moe.router import Router, attach_aux_loss


class MoE(nn.Module):
    """Mixture-of-Experts SwiGLU layer, dropless. forward(x (B, S, D)) -> (B, S, D).

    Attributes: router (Router), experts (GroupedExperts, all E experts until the
    parallel layer shards them), shared_experts (FeedForward with hidden size
    n_shared_experts * hidden_dim, or None), dispatcher (LocalDispatcher(n_experts);
    expert parallelism replaces it with an AllToAllDispatcher).

    float8 / float8_backend / exact_scales choose the experts' matmuls (see
    GroupedExperts). With aux_loss_coef > 0 the sequence-level balance loss is trained
    through the routing weights (its gradient joins theirs in backward), with gradient
    router.aux_grad_scale (1; a loop accumulating n micro-batches sets 1/n with
    moe.set_aux_grad_scale); router.last_aux_loss keeps its value. Raises ValueError on
    inconsistent sizes (see Router).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        n_experts: int,
        top_k: int,
        *,
        n_shared_experts: int = 0,
        score_func: str = "softmax",
        route_norm: bool = True,
        route_scale: float = 1.0,
        n_expert_groups: int = 1,
        n_limited_groups: int = 1,
        aux_loss_coef: float = 0.0,
        load_balance_bias: bool = True,
        float8: bool = False,
        float8_backend: str = "auto",
        exact_scales: bool = False,
    ):
        super().__init__()
        if n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {n_shared_experts}")
        self.router = Router(
            dim, n_experts, top_k, score_func=score_func, route_norm=route_norm,
            route_scale=route_scale, n_expert_groups=n_expert_groups,
            n_limited_groups=n_limited_groups, load_balance_bias=load_balance_bias,
            aux_loss_coef=aux_loss_coef,
        )
        self.experts = GroupedExperts(
            dim, hidden_dim, n_experts, float8=float8, float8_backend=float8_backend,
            exact_scales=exact_scales,
        )
        self.shared_experts = (
            FeedForward(dim, n_shared_experts * hidden_dim) if n_shared_experts > 0 else None
        )
        self.dispatcher = LocalDispatcher(n_experts)

    def init_weights(self, init_std: float = 0.02) -> None:
        self.router.init_weights(init_std)
        self.experts.init_weights(init_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"MoE input must be (batch, seq, dim), got shape {tuple(x.shape)}")
        B, S, D = x.shape
        x_TD = x.reshape(B * S, D)
        topk_idx, topk_w, scores_TE = self.router.route(x_TD)  # (T, k), (T, k), (T, E)
        if self.router.aux_loss_coef > 0:
            aux = self.router.aux_loss(scores_TE, topk_idx, n_seqs=B)
            if torch.is_grad_enabled():
                # On the routing weights, whose gradient always comes back through combine,
                # rather than on the output: that stays an ordinary tensor, writable in place.
                topk_w = attach_aux_loss(topk_w, aux, self.router.aux_grad_scale)
        x_grouped, offs, state = self.dispatcher.dispatch(x_TD, topk_idx)
        y_grouped = self.experts(x_grouped, offs, x_fp8=state.x_fp8)
        y_TD = self.dispatcher.combine(y_grouped, topk_w, state)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(B, S, D)
