"""Mixture-of-Experts: router, dispatchers, grouped experts and the MoE layer."""

from ep_fp8.moe.all_to_all import DISPATCH_PAYLOADS, AllToAllDispatcher, check_ep_divides
from ep_fp8.moe.dispatch import DispatchState, LocalDispatcher
from ep_fp8.moe.experts import FeedForward, GroupedExperts
from ep_fp8.moe.layer import MoE
from ep_fp8.moe.router import (Router, balance_routers, count_per_expert, set_aux_grad_scale,
                               update_router_biases)

__all__ = [
    "DISPATCH_PAYLOADS",
    "AllToAllDispatcher",
    "DispatchState",
    "FeedForward",
    "GroupedExperts",
    "LocalDispatcher",
    "MoE",
    "Router",
    "balance_routers",
    "check_ep_divides",
    "count_per_expert",
    "set_aux_grad_scale",
    "update_router_biases",
]
