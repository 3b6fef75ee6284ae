"""AllToAllDispatcher: expert parallelism over a process group of `ep` ranks.

Rank r holds experts [r * E_local, (r + 1) * E_local). Dispatch, on each rank:

  1. count routed rows per expert on the device;
  2. exchange the counts (an all-to-all of E_local + 1 integers per rank pair; the extra
     one reports out-of-range expert ids so that every rank can raise together);
  3. read the sent and received counts on the host: the split sizes all_to_all_single
     needs, and with them the padded row count. This is the one host read of a dispatch;
  4. permute rows by destination (sort by expert id; an expert's rank follows from it)
     and move them with all_to_all_single (uneven splits, zero splits allowed);
  5. regroup the received rows expert-major, padded to 16-row groups, by indices built
     on the device (ops.permute.expert_group_indices).

Combine is the inverse path (regrouped rows -> all-to-all back -> token order), then the
weighted sum over the k choices. Both directions are differentiable; gradients take the
inverse all-to-all. Rows move through torch.distributed._functional_collectives, whose
ops (_c10d_functional[_autograd].all_to_all_single) a selective activation-checkpoint
policy can save, so that recomputation never repeats an all-to-all.

Float8 payload: each token row is quantized once (ops.quantize_rows, per row) and sent as
D float8 bytes plus its 4 float32 scale bytes (padded to 16), about half the bytes of bf16; the
receiver hands (data, scale) to scaled_grouped_mm, which does not quantize them again.
The gradient travels back in the activation dtype (bf16).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from ep_fp8.moe.dispatch import (
    ALIGN,
    DispatchState,
    check_combine_inputs,
    check_dispatch_inputs,
    out_of_range_count,
    out_of_range_message,
)
from ep_fp8.moe.router import count_per_expert
from ep_fp8.moe.rows import gather_rows, scatter_rows, wait_collective
from ep_fp8.ops.permute import expert_group_indices, gather_rows_sum, scatter_rows_into

# What AllToAllDispatcher can send; parallel and the config take their choices from here.
DISPATCH_PAYLOADS = ("bf16", "float8")


def check_ep_divides(ep: int, n_experts: int) -> None:
    """Raise ValueError naming parallel.ep and model.n_experts unless the expert-parallel
    degree ep divides n_experts (both >= 1): each EP rank holds n_experts / ep experts."""
    if ep < 1 or n_experts < 1 or n_experts % ep:
        raise ValueError(f"parallel.ep ({ep}) must divide model.n_experts ({n_experts})")


class AllToAllDispatcher:
    """EP > 1 dispatcher over `group` (a torch.distributed ProcessGroup; None: the default
    group). Group rank r holds experts [r E/ep, (r+1) E/ep).

    payload: "bf16" sends rows in the activation dtype; "float8" sends e4m3 rows with
    float32 per-row scales (state.x_fp8 then holds them and x_grouped is a stride-0
    zero tensor, the autograd handle of scaled_grouped_mm's x_fp8 argument).
    exact_scales: scale choice of the float8 payload (see ops.quantize_rows).

    Raises ValueError when the group's size does not divide n_experts or the payload is
    unknown, and (on every rank at once) when any rank passes out-of-range expert ids.
    """

    def __init__(self, group, n_experts: int, payload: str = "bf16", *, exact_scales: bool = False):
        if payload not in DISPATCH_PAYLOADS:
            raise ValueError(f"payload must be one of {DISPATCH_PAYLOADS}, got {payload!r}")
        if not isinstance(exact_scales, bool):   # else quantize_rows refuses it mid-dispatch
            raise TypeError(f"exact_scales must be a bool, got {type(exact_scales).__name__}")
        group = dist.group.WORLD if group is None else group   # the collectives need it named
        ep = dist.get_world_size(group)
        check_ep_divides(ep, n_experts)
        self.group, self.n_experts, self.ep = group, n_experts, ep
        self.n_local = n_experts // ep
        self.payload, self.exact_scales = payload, exact_scales

    def dispatch(self, x_TD: torch.Tensor, topk_idx: torch.Tensor):
        """x (T, D), topk_idx (T, k) int64 global expert ids ->
        (x_grouped (M, D), offs (E_local,) int32, state) for this rank's experts."""
        check_dispatch_inputs(x_TD, topk_idx)
        E, ep, EL = self.n_experts, self.ep, self.n_local
        T, k = topk_idx.shape
        N = T * k
        expert_N = topk_idx.reshape(-1)

        # Clamped so that a bad id cannot write out of bounds before the error below.
        counts_E = count_per_expert(expert_N.clamp(0, E - 1), E)
        n_bad = out_of_range_count(topk_idx, E)
        meta_send = torch.cat([counts_E.view(ep, EL), n_bad.expand(ep, 1)], dim=1)  # (ep, EL+1)
        meta_recv = wait_collective(funcol.all_to_all_single(meta_send.flatten(), None, None, self.group))
        meta_recv = meta_recv.view(ep, EL + 1)  # row s: what rank s sends to this rank

        # HOST SYNC: the one host read of a dispatch. all_to_all_single needs the split
        # sizes on the host; the received counts per expert also give the padded row count.
        host = torch.cat([counts_E, meta_recv.flatten()]).tolist()
        sent_E, recv_S = host[:E], [host[E + s * (EL + 1) : E + (s + 1) * (EL + 1)] for s in range(ep)]
        bad_ranks = [s for s in range(ep) if recv_S[s][EL]]
        if bad_ranks:
            where = f" on rank(s) {bad_ranks} of the expert-parallel group"
            raise ValueError(out_of_range_message(None, E, where))
        input_splits = [sum(sent_E[r * EL : (r + 1) * EL]) for r in range(ep)]
        output_splits = [sum(row[:EL]) for row in recv_S]
        per_expert = [sum(recv_S[s][e] for s in range(ep)) for e in range(EL)]
        M = sum((n + ALIGN - 1) // ALIGN * ALIGN for n in per_expert)

        # Sorting by global expert id makes each destination rank's rows contiguous, and
        # within them each expert's: the order the receiver's index kernel expects.
        order_N = torch.argsort(expert_N, stable=True)
        pos_Tk = torch.empty_like(order_N).index_copy_(0, order_N, torch.arange(N, device=order_N.device))
        pos_Tk = pos_Tk.view(T, k)
        dst_idx, fill_idx, offs = expert_group_indices(
            meta_recv[:, :EL], sum(output_splits), M, align=ALIGN
        )
        state = DispatchState(
            pos_Tk, fill_idx, M, dst_idx=dst_idx, input_splits=input_splits, output_splits=output_splits
        )
        if self.payload == "float8":
            x_grouped, data, scale = _Float8Dispatch.apply(x_TD, state, self.group, self.exact_scales)
            state.x_fp8 = (data, scale)
            return x_grouped, offs, state
        send_ND = scatter_rows(x_TD, pos_Tk, _no_rows(x_TD.device), N)
        recv_RD = funcol.all_to_all_single_autograd(send_ND, output_splits, input_splits, self.group)
        x_grouped = scatter_rows(recv_RD, dst_idx[:, None], fill_idx, M)
        return x_grouped, offs, state

    def combine(self, y_grouped: torch.Tensor, topk_w: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """y_grouped (M, D), topk_w (T, k) float32 -> y (T, D) in y_grouped's dtype."""
        check_combine_inputs(y_grouped, topk_w, state)
        y_recv = gather_rows(y_grouped, state.dst_idx[:, None], state.fill_idx)
        y_back = funcol.all_to_all_single_autograd(
            y_recv, state.input_splits, state.output_splits, self.group
        )
        return gather_rows(y_back, state.idx_Tk, _no_rows(y_grouped.device), topk_w)


def float8_row_bytes(dim: int) -> int:
    """Bytes per row of the float8 payload: dim float8 bytes, the 4 bytes of the float32
    scale, padded to a multiple of 16 so that row copies stay 16-byte aligned."""
    return (dim + 4 + 15) // 16 * 16


def _no_rows(device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64, device=device)


class _Float8Dispatch(torch.autograd.Function):
    """Float8 rows forward, bf16 gradients back. Outputs (handle, data, scale)."""

    @staticmethod
    def forward(ctx, x_TD, state, group, exact_scales):
        from ep_fp8.ops import quantize_rows

        T, D = x_TD.shape
        N, M = state.idx_Tk.numel(), state.n_grouped
        # Quantizing per token (not per routed copy) costs 1/k of quantizing the sent rows
        # and gives the same bytes, since scales are per row.
        data_TD, scale_T = quantize_rows(x_TD.detach(), exact_scales=exact_scales)
        # One message per row: D float8 bytes, the 4 bytes of its float32 scale, padding
        # (gloo cannot carry float8; NCCL gets one collective instead of two).
        packed = x_TD.new_zeros((T, float8_row_bytes(D)), dtype=torch.uint8)
        packed[:, :D] = data_TD.view(torch.uint8)
        packed[:, D : D + 4] = scale_T.view(torch.uint8).view(T, 4)
        send = scatter_rows_into(packed, state.idx_Tk, _no_rows(x_TD.device), N)
        recv = wait_collective(funcol.all_to_all_single(send, state.output_splits, state.input_splits, group))
        to_grouped = state.dst_idx[:, None]
        data = scatter_rows_into(recv[:, :D], to_grouped, state.fill_idx, M).view(torch.float8_e4m3fn)
        scale_R1 = recv[:, D : D + 4].contiguous().view(torch.float32)
        # Padding rows: data 0 and scale 1, so 0 * anything stays 0 (a 0 scale would give 0/0).
        scale = scatter_rows_into(scale_R1, to_grouped, state.fill_idx, M, fill_value=1.0).view(M)
        ctx.mark_non_differentiable(data, scale)
        ctx.save_for_backward(state.idx_Tk, state.dst_idx)
        ctx.splits, ctx.group = (state.input_splits, state.output_splits), group
        handle = x_TD.new_zeros(()).expand(M, D)
        return handle, data, scale

    @staticmethod
    def backward(ctx, grad_handle, _grad_data, _grad_scale):
        if grad_handle is None:
            return None, None, None, None
        idx_Tk, dst_idx = ctx.saved_tensors
        input_splits, output_splits = ctx.splits
        grad_recv = gather_rows_sum(grad_handle.contiguous(), dst_idx[:, None])
        grad_send = wait_collective(funcol.all_to_all_single(grad_recv, input_splits, output_splits, ctx.group))
        return gather_rows_sum(grad_send, idx_Tk), None, None, None
