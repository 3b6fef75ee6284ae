"""Dispatchers: routed token rows -> expert-major grouped rows, and back.

Every dispatcher has one interface, so the MoE layer has one code path:

    x_grouped (M, D), offs (E_local,) int32, state = dispatcher.dispatch(x (T, D), topk_idx (T, k))
    y (T, D) = dispatcher.combine(y_grouped (M, D), topk_w (T, k) float32, state)

x_grouped holds every routed (token, expert) pair exactly once, experts in order, each
expert's group padded with zero rows to a multiple of 16 (`offs` = cumulative padded
ends, the `offs` of torch._grouped_mm). Padding rows never reach y or any gradient.
`LocalDispatcher` (here) serves EP = 1; `AllToAllDispatcher` (all_to_all.py) EP > 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ep_fp8.moe.router import count_per_expert
from ep_fp8.moe.rows import gather_rows, scatter_rows
from ep_fp8.ops.permute import expert_group_indices

ALIGN = 16  # group sizes are padded to a multiple of this (float8 kernels' alignment)


@dataclass
class DispatchState:
    """What combine needs to undo a dispatch.

    idx_Tk: (T, k) int64, where each (token, choice) row went: a grouped row (local) or
        a row of the send buffer (all-to-all).
    fill_idx: int64 grouped rows holding no token (padding, tail).
    n_grouped: M, rows of x_grouped.
    x_fp8: (data (M, D) float8_e4m3fn, scale (M,) float32) when rows arrived as float8,
        else None.
    dst_idx: (N_recv,) int64 grouped row of each received row (all-to-all only).
    input_splits / output_splits: rows sent to / received from each rank (all-to-all).
    """

    idx_Tk: torch.Tensor
    fill_idx: torch.Tensor
    n_grouped: int
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None
    dst_idx: torch.Tensor | None = None
    input_splits: list[int] | None = None
    output_splits: list[int] | None = None


def check_dispatch_inputs(x_TD: torch.Tensor, topk_idx: torch.Tensor) -> None:
    """Shape and dtype checks shared by the dispatchers (no device reads)."""
    if x_TD.dim() != 2:
        raise ValueError(f"x must be (tokens, dim), got shape {tuple(x_TD.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x_TD.shape[0]:
        raise ValueError(
            f"topk_idx must be (tokens, k) with tokens = {x_TD.shape[0]}, got shape {tuple(topk_idx.shape)}"
        )
    if topk_idx.dtype != torch.int64:
        raise TypeError(f"topk_idx must be int64, got {topk_idx.dtype}")
    if topk_idx.device != x_TD.device:
        raise ValueError(f"topk_idx is on {topk_idx.device} but x is on {x_TD.device}")


def check_combine_inputs(y_grouped: torch.Tensor, topk_w: torch.Tensor, state: DispatchState) -> None:
    if y_grouped.dim() != 2 or y_grouped.shape[0] != state.n_grouped:
        raise ValueError(
            f"y_grouped must have {state.n_grouped} rows (as dispatched), got shape {tuple(y_grouped.shape)}"
        )
    if topk_w.shape != state.idx_Tk.shape:
        raise ValueError(
            f"topk_w must have shape {tuple(state.idx_Tk.shape)} (as topk_idx), got {tuple(topk_w.shape)}"
        )
    if not topk_w.is_floating_point():
        raise TypeError(f"topk_w must be a floating-point tensor (the routing weights), got {topk_w.dtype}")
    if topk_w.device != y_grouped.device:
        raise ValueError(f"topk_w is on {topk_w.device}, y_grouped on {y_grouped.device}: "
                         "they must share a device")


def out_of_range_count(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """0-d int64 device tensor: entries of topk_idx outside [0, n_experts)."""
    return ((topk_idx < 0) | (topk_idx >= n_experts)).sum()


def out_of_range_message(n_bad: int | None, n_experts: int, where: str = "") -> str:
    how_many = "" if n_bad is None else f" {n_bad}"
    return f"topk_idx{where} has{how_many} entries outside [0, {n_experts})"


class LocalDispatcher:
    """EP = 1: permutation only, no communication, no host synchronisation.

    To stay free of host reads, x_grouped gets an upper bound of rows,
    M = T*k + E*(16-1): the padded groups (each at most 15 rows of padding) and then a
    zero "tail" that belongs to no group (its expert outputs are never read). The price
    is up to 15 rows per expert of memory; the grouped matmul skips the tail.

    Out-of-range topk_idx raises ValueError on CPU; on CUDA it triggers a device-side
    assertion (checking on the host would cost a synchronisation every layer).
    """

    def __init__(self, n_experts: int):
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        self.n_experts = n_experts

    def dispatch(self, x_TD: torch.Tensor, topk_idx: torch.Tensor):
        """x (T, D), topk_idx (T, k) int64 -> (x_grouped (M, D), offs (E,) int32, state)."""
        check_dispatch_inputs(x_TD, topk_idx)
        E = self.n_experts
        n_bad = out_of_range_count(topk_idx, E)
        if topk_idx.is_cuda:
            torch._assert_async(n_bad == 0, out_of_range_message(None, E))
        elif int(n_bad):
            raise ValueError(out_of_range_message(int(n_bad), E))

        T, k = topk_idx.shape
        N = T * k
        M = N + E * (ALIGN - 1)
        expert_N = topk_idx.reshape(-1)
        order_N = torch.argsort(expert_N, stable=True)  # pairs sorted by expert
        counts_1E = count_per_expert(expert_N, E).view(1, E)
        dst_sorted, fill_idx, offs = expert_group_indices(counts_1E, N, M, align=ALIGN)
        pair_dst_Tk = torch.empty_like(dst_sorted).index_copy_(0, order_N, dst_sorted).view(T, k)
        x_grouped = scatter_rows(x_TD, pair_dst_Tk, fill_idx, M)
        return x_grouped, offs, DispatchState(pair_dst_Tk, fill_idx, M)

    def combine(self, y_grouped: torch.Tensor, topk_w: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """y_grouped (M, D), topk_w (T, k) float32 -> y (T, D): sum_j w[t, j] * y of pair (t, j)."""
        check_combine_inputs(y_grouped, topk_w, state)
        return gather_rows(y_grouped, state.idx_Tk, state.fill_idx, topk_w)
