"""Index generation and row movement for regrouping routed rows expert-major, on the device.

Rows arrive as S blocks per source (one source per EP rank; S = 1 on a single rank),
each source's rows already sorted by local expert: block (s, e) holds counts[s, e] rows,
blocks in s-major order. The grouped matmul wants them expert-major instead, every
expert's group padded to a multiple of `align` rows so that group starts stay aligned:

    received:  [s0e0 | s0e1 | ... | s1e0 | s1e1 | ...]
    grouped:   [s0e0 s1e0 .. pad | s0e1 s1e1 .. pad | ... | tail]

`expert_group_indices` says, for every received row, where it goes (`dst_idx`), which
grouped rows are padding or tail (`fill_idx`, to be zeroed), and the cumulative padded
group ends (`offs`, the `offs` of torch._grouped_mm). Everything is computed on the
device from the device counts: no host synchronisation. The caller knows the row counts
on the host (`n_rows`, `n_out`), either exactly or as an upper bound for `n_out`; rows
past the last group end are "tail" and belong to no group.

The rows themselves move with `scatter_rows_into` (token rows to their k grouped rows),
`gather_rows_sum` (the k rows of a token, weighted and summed) and its backward.

Every function has two implementations with the same results: a Triton kernel and a
torch reference; `backend="auto"` takes the kernel on CUDA and the reference elsewhere.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ep_fp8.ops.kernel_choice import check_kernel_backend, use_triton

# The kernel holds every (source, expert) block in registers; past this many blocks the
# torch reference is used instead (S * E is the total expert count, a few hundred).
_MAX_KERNEL_BLOCKS = 2048


def expert_group_indices(
    counts_SE: torch.Tensor,
    n_rows: int,
    n_out: int,
    *,
    align: int = 16,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Destination of every received row in the expert-major, padded layout.

    Args:
        counts_SE: (S, E) int32/int64 rows from source s for expert e, on the device.
            Must sum to `n_rows` (not checked: checking would read the device).
        n_rows: number of received rows (sum of counts_SE).
        n_out: rows of the grouped buffer, at least the padded total
            sum_e roundup(sum_s counts[s, e], align); extra rows form the tail.
        align: group sizes are padded to a multiple of this.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".

    Returns:
        dst_idx: (n_rows,) int64, grouped row of received row i (a permutation into
            [0, n_out) that skips padding).
        fill_idx: (n_out - n_rows,) int64, the grouped rows no received row lands in:
            each group's padding (ascending), then the tail.
        offs: (E,) int32 cumulative padded group ends.

    Raises:
        TypeError: counts_SE not an integer tensor.
        ValueError: bad shape, negative sizes, n_out < n_rows, align < 1, unknown backend.
    """
    if not isinstance(counts_SE, torch.Tensor) or counts_SE.dtype not in (torch.int32, torch.int64):
        got = counts_SE.dtype if isinstance(counts_SE, torch.Tensor) else type(counts_SE).__name__
        raise TypeError(f"counts_SE must be an int32 or int64 tensor, got {got}")
    if counts_SE.dim() != 2:
        raise ValueError(f"counts_SE must be 2-D (sources, experts), got shape {tuple(counts_SE.shape)}")
    if n_rows < 0 or n_out < n_rows:
        raise ValueError(f"need 0 <= n_rows <= n_out, got n_rows={n_rows}, n_out={n_out}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    check_kernel_backend(backend)
    S, E = counts_SE.shape
    if backend == "auto":
        backend = "triton" if counts_SE.is_cuda and S * E <= _MAX_KERNEL_BLOCKS else "torch"
    if not use_triton(backend, counts_SE):
        return expert_group_indices_reference(counts_SE, n_rows, n_out, align=align)
    return _expert_group_indices_triton(counts_SE, n_rows, n_out, align)


def expert_group_indices_reference(
    counts_SE: torch.Tensor, n_rows: int, n_out: int, *, align: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch `expert_group_indices` (same arguments and results, no validation).

    Sync-free on CUDA too: every repeat_interleave is given its output size.
    """
    dev = counts_SE.device
    c_SE = counts_SE.to(torch.int64)
    S, E = c_SE.shape
    c_B = c_SE.flatten()  # (S*E,) blocks in received (s-major) order
    recv_start_B = c_B.cumsum(0) - c_B
    exp_tot_E = c_SE.sum(0)
    exp_pad_E = (exp_tot_E + align - 1) // align * align
    grp_end_E = exp_pad_E.cumsum(0)
    grp_start_E = grp_end_E - exp_pad_E
    # A block's first grouped row: its expert's group start plus the rows of that expert
    # from earlier sources.
    blk_dst_B = (grp_start_E[None, :] + c_SE.cumsum(0) - c_SE).flatten()

    blk_R = torch.repeat_interleave(torch.arange(S * E, device=dev), c_B, output_size=n_rows)
    rows_R = torch.arange(n_rows, device=dev)
    dst_idx = blk_dst_B[blk_R] + rows_R - recv_start_B[blk_R]

    # Fill rows: segment e < E is expert e's padding, segment E is the tail.
    n_fill = n_out - n_rows
    n_pad_E = exp_pad_E - exp_tot_E
    padded_total = grp_end_E[-1:] if E > 0 else torch.zeros(1, dtype=torch.int64, device=dev)
    seg_len = torch.cat([n_pad_E, n_fill - n_pad_E.sum().reshape(1)])
    seg_row0 = torch.cat([grp_start_E + exp_tot_E, padded_total])
    seg_F = torch.repeat_interleave(torch.arange(E + 1, device=dev), seg_len, output_size=n_fill)
    seg_start = seg_len.cumsum(0) - seg_len
    fill_idx = seg_row0[seg_F] + torch.arange(n_fill, device=dev) - seg_start[seg_F]
    return dst_idx, fill_idx, grp_end_E.to(torch.int32)


def _expert_group_indices_triton(counts_SE, n_rows, n_out, align):
    S, E = counts_SE.shape
    dev = counts_SE.device
    n_fill = n_out - n_rows
    dst_idx = torch.empty(n_rows, dtype=torch.int64, device=dev)
    fill_idx = torch.empty(n_fill, dtype=torch.int64, device=dev)
    offs = torch.empty(E, dtype=torch.int32, device=dev)
    S_P = triton.next_power_of_2(max(S, 1))
    E_P = triton.next_power_of_2(max(E, 1))
    # Each program compares BLOCK rows with every block: keep BLOCK x blocks bounded.
    BLOCK = max(16, min(256, 8192 // (S_P * E_P)))
    n_dst_progs = triton.cdiv(n_rows, BLOCK)
    grid = (max(1, n_dst_progs + triton.cdiv(n_fill, BLOCK)),)
    _group_indices_kernel[grid](
        counts_SE.contiguous(), dst_idx, fill_idx, offs, n_rows, n_fill, n_dst_progs, S, E,
        ALIGN=align, S_P=S_P, E_P=E_P, BLOCK=BLOCK, num_warps=4 if S_P * E_P <= 512 else 8,
    )
    return dst_idx, fill_idx, offs


@triton.jit
def _group_indices_kernel(
    counts_ptr, dst_ptr, fill_ptr, offs_ptr, n_rows, n_fill, n_dst_progs, S, E,
    ALIGN: tl.constexpr, S_P: tl.constexpr, E_P: tl.constexpr, BLOCK: tl.constexpr,
):
    # Every program recomputes the block layout from the (small) counts matrix: cheaper
    # than a second launch and a round trip through memory.
    pid = tl.program_id(0)
    s = tl.arange(0, S_P)
    e = tl.arange(0, E_P)
    in_range = (s[:, None] < S) & (e[None, :] < E)
    c = tl.load(counts_ptr + s[:, None] * E + e[None, :], mask=in_range, other=0).to(tl.int32)

    src_tot = tl.sum(c, axis=1)  # (S_P,)
    recv_start = (tl.cumsum(src_tot, 0) - src_tot)[:, None] + tl.cumsum(c, 1) - c
    exp_tot = tl.sum(c, axis=0)  # (E_P,)
    exp_pad = (exp_tot + ALIGN - 1) // ALIGN * ALIGN
    grp_end = tl.cumsum(exp_pad, 0)
    grp_start = grp_end - exp_pad
    blk_dst = grp_start[None, :] + tl.cumsum(c, 0) - c

    if pid == 0:
        tl.store(offs_ptr + e, grp_end, mask=e < E)

    if pid < n_dst_progs:
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        # Flattened blocks; padded (s, e) entries have zero rows, so no row matches them.
        rs = tl.reshape(recv_start, (S_P * E_P,))
        cnt = tl.reshape(c, (S_P * E_P,))
        shift = tl.reshape(blk_dst - recv_start, (S_P * E_P,))
        hit = (rows[:, None] >= rs[None, :]) & (rows[:, None] < rs[None, :] + cnt[None, :])
        dst = rows + tl.sum(tl.where(hit, shift[None, :], 0), axis=1)
        tl.store(dst_ptr + rows, dst.to(tl.int64), mask=rows < n_rows)
    else:
        p = (pid - n_dst_progs) * BLOCK + tl.arange(0, BLOCK)
        n_pad = exp_pad - exp_tot
        pad_start = tl.cumsum(n_pad, 0) - n_pad  # position of expert e's padding in the fill list
        # Names differ from the other branch's: Triton merges same-named variables of both
        # branches and rejects them when their shapes differ.
        pad_hit = (p[:, None] >= pad_start[None, :]) & (p[:, None] < pad_start[None, :] + n_pad[None, :])
        pad_shift = grp_start + exp_tot - pad_start
        in_group = p + tl.sum(tl.where(pad_hit, pad_shift[None, :], 0), axis=1)
        is_pad = tl.sum(pad_hit.to(tl.int32), axis=1) > 0
        tail = tl.sum(exp_pad, 0) + p - tl.sum(n_pad, 0)
        row = tl.where(is_pad, in_group, tail)
        tl.store(fill_ptr + p, row.to(tl.int64), mask=p < n_fill)


# ---------------------------------------------------------------------------------------
# Row movement. idx_Rk (R, k) int64 names k rows of the big (M, D) buffer for each of R
# small-side rows; together with fill_idx the idx entries cover [0, M) exactly once.


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 accumulation for bf16/fp16/fp32 rows; float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def scatter_rows_into(
    src_RD: torch.Tensor, idx_Rk: torch.Tensor, fill_idx: torch.Tensor, n_out: int,
    fill_value: float = 0, *, backend: str = "auto",
) -> torch.Tensor:
    """(R, D) rows -> (n_out, D): out[idx[r, j]] = src[r] for all j, out[fill_idx] = fill_value.

    Any dtype that torch can index_fill_ (float8 payloads travel as .view(torch.uint8));
    src may have a row stride other than D.
    Not differentiable (moe.rows wraps it).
    """
    out = src_RD.new_empty((n_out, src_RD.shape[1]))
    R, k = idx_Rk.shape
    if use_triton(backend, src_RD) and R * src_RD.shape[1] > 0:
        D = src_RD.shape[1]
        BLOCK_D = min(triton.next_power_of_2(D), 1024)
        _scatter_rows_kernel[(R, triton.cdiv(D, BLOCK_D))](
            src_RD, src_RD.stride(0), src_RD.stride(1), idx_Rk.contiguous(), out, D, k, BLOCK_D=BLOCK_D,
        )
    else:
        for j in range(k):
            out.index_copy_(0, idx_Rk[:, j], src_RD)
    return out.index_fill_(0, fill_idx, fill_value)


def gather_rows_sum(
    rows_MD: torch.Tensor, idx_Rk: torch.Tensor, w_Rk: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """(M, D) rows -> (R, D): out[r] = sum_j w[r, j] * rows[idx[r, j]] (w = 1 if None).

    Accumulates in float32 (float64 for float64 rows) in j order and rounds once to
    rows' dtype. Not differentiable (moe.rows wraps it).
    """
    R, k = idx_Rk.shape
    D = rows_MD.shape[1]
    if k == 1 and w_Rk is None:
        return rows_MD.index_select(0, idx_Rk[:, 0])
    if use_triton(backend, rows_MD) and R * D > 0:
        out = rows_MD.new_empty((R, D))
        BLOCK_D = min(triton.next_power_of_2(D), 1024)
        w = w_Rk if w_Rk is not None else idx_Rk  # any (R, k) tensor when unweighted: not read
        _gather_rows_kernel[(R, triton.cdiv(D, BLOCK_D))](
            rows_MD, rows_MD.stride(0), rows_MD.stride(1), idx_Rk.contiguous(), w, w.stride(0), w.stride(1),
            out, D, k, HAS_W=w_Rk is not None, ACC=_tl_dtype(_acc_dtype(rows_MD.dtype)), BLOCK_D=BLOCK_D,
        )
        return out
    acc_dtype = _acc_dtype(rows_MD.dtype)
    acc = torch.zeros((R, D), dtype=acc_dtype, device=rows_MD.device)
    for j in range(k):
        term = rows_MD.index_select(0, idx_Rk[:, j]).to(acc_dtype)
        acc += term if w_Rk is None else term * w_Rk[:, j : j + 1]
    return acc.to(rows_MD.dtype)


def gather_rows_sum_backward(
    grad_RD: torch.Tensor, rows_MD: torch.Tensor | None, idx_Rk: torch.Tensor, fill_idx: torch.Tensor,
    w_Rk: torch.Tensor | None, n_rows: int, need_rows: bool = True, need_w: bool = True,
    *, backend: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of gather_rows_sum: grad_rows (n_rows, D), zero on fill_idx, and grad_w
    (R, k) in w's dtype (None where not needed; rows_MD only read for grad_w)."""
    R, k = idx_Rk.shape
    D = grad_RD.shape[1]
    need_w = need_w and w_Rk is not None
    grad_rows = grad_RD.new_empty((n_rows, D)) if need_rows else None
    grad_w = torch.empty((R, k), dtype=w_Rk.dtype, device=grad_RD.device) if need_w else None
    if use_triton(backend, grad_RD) and (need_rows or need_w) and R * D > 0:
        grad_RD = grad_RD.contiguous()
        # The kernel holds (k, BLOCK_D) tiles of about 4096 elements (at least 128 columns),
        # the size of top-4's: a larger top-k takes narrower column blocks, not more registers.
        k_pow2 = triton.next_power_of_2(k)
        BLOCK_D = min(triton.next_power_of_2(D), 1024, max(4096 // k_pow2, 128))
        acc = _tl_dtype(_acc_dtype(grad_RD.dtype))
        rows = rows_MD if need_w else grad_RD  # rows are read only for grad_w
        w = w_Rk if w_Rk is not None else idx_Rk  # any (R, k) tensor when unweighted: not read
        _gather_rows_bwd_kernel[(R,)](
            grad_RD, rows, rows.stride(0), rows.stride(1), idx_Rk.contiguous(), w, w.stride(0), w.stride(1),
            grad_rows if need_rows else grad_RD,
            grad_w if need_w else grad_RD, D, k, k_pow2,
            HAS_W=w_Rk is not None, NEED_ROWS=need_rows, NEED_W=need_w, ACC=acc, BLOCK_D=BLOCK_D,
        )
    else:
        acc_dtype = _acc_dtype(grad_RD.dtype)
        grad_acc = grad_RD.to(acc_dtype)
        for j in range(k):
            if need_rows:
                g = grad_RD if w_Rk is None else (grad_acc * w_Rk[:, j : j + 1]).to(grad_RD.dtype)
                grad_rows.index_copy_(0, idx_Rk[:, j], g)
            if need_w:
                grad_w[:, j] = (grad_acc * rows_MD.index_select(0, idx_Rk[:, j]).to(acc_dtype)).sum(-1)
    if need_rows:
        grad_rows.index_fill_(0, fill_idx, 0)
    return grad_rows, grad_w


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _scatter_rows_kernel(src_ptr, src_stride, src_col_stride, idx_ptr, out_ptr, D, K, BLOCK_D: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    v = tl.load(src_ptr + r * src_stride + cols * src_col_stride, mask=mask)
    for j in range(K):  # one read of the source row, k writes
        dst = tl.load(idx_ptr + r * K + j)
        tl.store(out_ptr + dst * D + cols, v, mask=mask)


@triton.jit
def _gather_rows_kernel(rows_ptr, rows_stride, rows_col_stride, idx_ptr, w_ptr, w_stride, w_col_stride,
                        out_ptr, D, K: tl.constexpr, HAS_W: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    # The k choices unrolled (K is a constant): their k row loads are independent and go
    # out together, while the sum still adds them in j order.
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for j in tl.static_range(K):
        src = tl.load(idx_ptr + r * K + j)
        v = tl.load(rows_ptr + src * rows_stride + cols * rows_col_stride, mask=mask).to(ACC)
        if HAS_W:
            v = v * tl.load(w_ptr + r * w_stride + j * w_col_stride).to(ACC)
        acc += v
    tl.store(out_ptr + r * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_rows_bwd_kernel(grad_ptr, rows_ptr, rows_stride, rows_col_stride, idx_ptr, w_ptr, w_stride, w_col_stride,
                            grad_rows_ptr, grad_w_ptr, D, K: tl.constexpr, K_POW2: tl.constexpr,
                            HAS_W: tl.constexpr, NEED_ROWS: tl.constexpr, NEED_W: tl.constexpr,
                            ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per token row, all k choices at once as a (K_POW2, BLOCK_D) tile: the
    # row's gradient is read once per column block, scaled into each choice's grouped row
    # (k stores that go out together), and dotted with those rows.
    r = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, K_POW2)
    kmask = kk < K
    dst = tl.load(idx_ptr + r * K + kk, mask=kmask, other=0)
    if HAS_W:
        w = tl.load(w_ptr + r * w_stride + kk * w_col_stride, mask=kmask, other=0).to(ACC)
    dot = tl.zeros((K_POW2, BLOCK_D), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = cols < D
        tile_mask = kmask[:, None] & mask[None, :]
        g = tl.load(grad_ptr + r * D + cols, mask=mask, other=0).to(ACC)
        if NEED_ROWS:
            if HAS_W:
                g_rows = g[None, :] * w[:, None]
            else:
                g_rows = g[None, :] + tl.zeros((K_POW2, BLOCK_D), dtype=ACC)
            tl.store(grad_rows_ptr + dst[:, None] * D + cols[None, :],
                     g_rows.to(grad_rows_ptr.dtype.element_ty), mask=tile_mask)
        if NEED_W:
            rows = tl.load(rows_ptr + dst[:, None] * rows_stride + cols[None, :] * rows_col_stride,
                           mask=tile_mask, other=0)
            dot += g[None, :] * rows.to(ACC)
    if NEED_W:
        tl.store(grad_w_ptr + r * K + kk, tl.sum(dot, axis=1).to(grad_w_ptr.dtype.element_ty), mask=kmask)
