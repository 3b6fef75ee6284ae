"""ops.permute: Triton kernels against their torch references, and the references against
layouts built row by row in Python. Without a GPU the kernels run on CPU tensors through
the Triton interpreter (TRITON_INTERPRET=1); on a GPU the same tests run them compiled
on CUDA tensors."""

import pytest
import torch

from ep_fp8.ops.permute import (
    expert_group_indices,
    expert_group_indices_reference,
    gather_rows_sum,
    gather_rows_sum_backward,
    scatter_rows_into,
)

ALIGN = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Compiled GPU kernels may fuse multiply-adds; the interpreter computes step by step.
FUSED = DEVICE == "cuda"


def _python_layout(counts_SE, n_out, align):
    """The expert-major padded layout, one row at a time (the spec, slowly)."""
    S, E = counts_SE.shape
    c = counts_SE.tolist()
    recv_start, r = {}, 0
    for s in range(S):
        for e in range(E):
            recv_start[s, e], r = r, r + c[s][e]
    dst = [None] * r
    fill, offs, row = [], [], 0
    for e in range(E):
        for s in range(S):
            for i in range(c[s][e]):
                dst[recv_start[s, e] + i] = row
                row += 1
        while row % align:
            fill.append(row)
            row += 1
        offs.append(row)
    fill.extend(range(row, n_out))
    return torch.tensor(dst, dtype=torch.int64), torch.tensor(fill, dtype=torch.int64), torch.tensor(offs, dtype=torch.int32)


def _cases():
    g = torch.Generator().manual_seed(0)
    yield "one_source", torch.randint(0, 40, (1, 8), generator=g), 0
    yield "uneven_with_tail", torch.randint(0, 20, (3, 5), generator=g), 37
    yield "all_zero", torch.zeros(2, 4, dtype=torch.int64), 5
    skew = torch.zeros(4, 3, dtype=torch.int64)
    skew[:, 1] = torch.tensor([17, 0, 33, 1])
    yield "one_expert_gets_all", skew, 0
    yield "exact_multiples", torch.full((2, 2), 16, dtype=torch.int32), 16
    yield "single_block", torch.tensor([[5]]), 0


@pytest.mark.parametrize("name,counts,extra", list(_cases()), ids=[c[0] for c in _cases()])
def test_reference_matches_row_by_row_layout(name, counts, extra):
    n_rows = int(counts.sum())
    padded = int(((counts.sum(0) + ALIGN - 1) // ALIGN * ALIGN).sum())
    got = expert_group_indices_reference(counts, n_rows, padded + extra, align=ALIGN)
    want = _python_layout(counts, padded + extra, ALIGN)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("name,counts,extra", list(_cases()), ids=[c[0] for c in _cases()])
def test_index_kernel_matches_reference(name, counts, extra):
    counts = counts.to(DEVICE)
    n_rows = int(counts.sum())
    padded = int(((counts.sum(0) + ALIGN - 1) // ALIGN * ALIGN).sum())
    want = expert_group_indices_reference(counts, n_rows, padded + extra, align=ALIGN)
    got = expert_group_indices(counts, n_rows, padded + extra, align=ALIGN, backend="triton")
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_every_grouped_row_is_written_exactly_once():
    counts = torch.randint(0, 30, (4, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    n_rows = int(counts.sum())
    n_out = n_rows + 6 * (ALIGN - 1)  # the local dispatcher's upper bound
    dst, fill, offs = expert_group_indices(counts, n_rows, n_out, backend="triton")
    assert torch.equal(torch.cat([dst, fill]).sort().values.cpu(), torch.arange(n_out))
    sizes = torch.diff(offs, prepend=offs.new_zeros(1))
    assert bool((sizes % ALIGN == 0).all()) and bool((sizes >= counts.sum(0).to(sizes.dtype)).all())


def test_bad_arguments_raise_clear_errors():
    c = torch.ones(2, 3, dtype=torch.int64)
    with pytest.raises(TypeError, match="counts_SE must be an int32 or int64 tensor"):
        expert_group_indices(c.float(), 6, 96)
    with pytest.raises(ValueError, match="2-D"):
        expert_group_indices(c.flatten(), 6, 96)
    with pytest.raises(ValueError, match="n_out"):
        expert_group_indices(c, 6, 5)
    with pytest.raises(ValueError, match="align"):
        expert_group_indices(c, 6, 96, align=0)
    with pytest.raises(ValueError, match="backend"):
        expert_group_indices(c, 6, 96, backend="cuda")


def _row_layout(R, k, n_fill, gen, device="cpu"):
    perm = torch.randperm(R * k + n_fill, generator=gen).to(device)
    return perm[: R * k].view(R, k), perm[R * k :]


@pytest.mark.parametrize("dtype, D", [(torch.float32, 37), (torch.float64, 37),
                                      (torch.uint8, 37), (torch.float32, 1100)])
def test_scatter_rows_kernel_matches_reference(dtype, D):
    gen = torch.Generator().manual_seed(3)
    R, k, n_fill = 7, 3, 5
    idx, fill = _row_layout(R, k, n_fill, gen, DEVICE)
    wide = torch.randint(0, 200, (R, D + 4), generator=gen).to(DEVICE, dtype)
    src = wide[:, :D]  # a row stride other than D, as the float8 payload's data bytes
    want = scatter_rows_into(src, idx, fill, R * k + n_fill, fill_value=1, backend="torch")
    got = scatter_rows_into(src, idx, fill, R * k + n_fill, fill_value=1, backend="triton")
    assert torch.equal(got, want)


def _check_gather_kernels(rows, idx, fill, w, grad):
    """gather_rows_sum and its backward: the Triton kernels against the torch reference."""
    k, dtype = idx.shape[1], rows.dtype
    # Both sum in the same order: exact, except that the interpreter's float32 -> bfloat16
    # cast may round one step differently, and compiled kernels may fuse multiply-adds. A
    # fused multiply-add rounds once where the reference rounds twice: a difference of a few
    # ulps of the largest of the k terms, not of their sum, which can cancel (H200: 2.7e-8
    # on a float32 sum of 6e-3, 4e-6 relative).
    if dtype == torch.bfloat16:
        tol = dict(rtol=2**-7, atol=1e-6)
    elif FUSED:
        largest_term = float(rows.abs().max()) * (float(w.max()) if w is not None else 1.0)
        tol = dict(rtol=0, atol=4 * k * torch.finfo(dtype).eps * largest_term)
    else:
        tol = dict(rtol=0, atol=0)
    torch.testing.assert_close(gather_rows_sum(rows, idx, w, backend="triton"),
                               gather_rows_sum(rows, idx, w, backend="torch"), **tol)
    g_rows, g_w = gather_rows_sum_backward(grad, rows, idx, fill, w, rows.shape[0], backend="triton")
    r_rows, r_w = gather_rows_sum_backward(grad, rows, idx, fill, w, rows.shape[0], backend="torch")
    torch.testing.assert_close(g_rows, r_rows, **tol)
    if w is not None:  # dot products: the kernel sums in another order
        torch.testing.assert_close(g_w, r_w, rtol=1e-5, atol=1e-5)
    else:
        assert g_w is None and r_w is None


@pytest.mark.parametrize("dtype, D", [(torch.float32, 40), (torch.float64, 40),
                                      (torch.bfloat16, 40), (torch.float32, 1100)])
@pytest.mark.parametrize("weighted", [True, False])
def test_gather_rows_kernels_match_reference(dtype, D, weighted):
    # D = 1100: rows wider than one block of 1024 columns.
    gen = torch.Generator().manual_seed(4)
    R, k, n_fill = 6, 3, 9
    idx, fill = _row_layout(R, k, n_fill, gen, DEVICE)
    rows = torch.randn(R * k + n_fill, D, generator=gen).to(DEVICE, dtype)
    w = torch.rand(R, k, generator=gen).to(DEVICE) if weighted else None
    grad = torch.randn(R, D, generator=gen).to(DEVICE, dtype)
    _check_gather_kernels(rows, idx, fill, w, grad)


@pytest.mark.parametrize("k, D", [(1, 40), (3, 40), (8, 130), (3, 1100)])
@pytest.mark.parametrize("need_rows, need_w", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("weighted", [True, False])
def test_gather_rows_backward_kernel_for_each_k_and_each_gradient_asked(k, D, need_rows, need_w, weighted):
    # top-k is a compile-time constant of the kernel, padded to a power of two (3 -> 4
    # lanes, one masked); D = 130 and 1100 end in a partial column block.
    gen = torch.Generator().manual_seed(7)
    R, n_fill = 6, 5
    idx, fill = _row_layout(R, k, n_fill, gen, DEVICE)
    rows = torch.randn(R * k + n_fill, D, generator=gen).to(DEVICE)
    w = torch.rand(R, k, generator=gen).to(DEVICE) if weighted else None
    grad = torch.randn(R, D, generator=gen).to(DEVICE)
    inputs = (grad.clone(), rows.clone())
    got = gather_rows_sum_backward(grad, rows, idx, fill, w, rows.shape[0], need_rows, need_w, backend="triton")
    # Without grad_rows the kernel gets grad's own pointer for it: it must not write there.
    assert torch.equal(grad, inputs[0]) and torch.equal(rows, inputs[1])
    want = gather_rows_sum_backward(grad, rows, idx, fill, w, rows.shape[0], need_rows, need_w, backend="torch")
    if need_rows:   # each grouped row is one product g * w (or g): exact
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    else:
        assert got[0] is None and want[0] is None
    if need_w and weighted:   # dot products: the kernel sums in another order
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    else:
        assert got[1] is None and want[1] is None


@pytest.mark.parametrize("layout", ["w_every_other_column", "w_expanded", "w_column_major", "rows_column_major"])
def test_gather_rows_kernels_follow_strides(layout):
    """Weights and rows in any strides: the kernels read them through their strides (they
    once read them as dense row-major, which gave wrong sums without an error)."""
    gen = torch.Generator().manual_seed(6)
    R, k, D, n_fill = 6, 3, 40, 9
    idx, fill = _row_layout(R, k, n_fill, gen, DEVICE)
    rows = torch.randn(R * k + n_fill, D, generator=gen).to(DEVICE)
    w = torch.rand(R, k, generator=gen).to(DEVICE)
    if layout == "w_every_other_column":
        w = torch.rand(R, 2 * k, generator=gen).to(DEVICE)[:, ::2]
    elif layout == "w_expanded":
        w = torch.rand(1, k, generator=gen).to(DEVICE).expand(R, k)
    elif layout == "w_column_major":
        w = w.t().contiguous().t()
    else:
        rows = rows.t().contiguous().t()
    assert not w.is_contiguous() or not rows.is_contiguous()
    _check_gather_kernels(rows, idx, fill, w, torch.randn(R, D, generator=gen).to(DEVICE))


@pytest.mark.parametrize("k", [1, 2])
def test_gather_rows_reference_matches_float64_loop(k):
    gen = torch.Generator().manual_seed(5)
    R, D, n_fill = 4, 8, 3
    idx, fill = _row_layout(R, k, n_fill, gen)
    rows = torch.randn(R * k + n_fill, D, generator=gen, dtype=torch.float64)
    w = torch.rand(R, k, generator=gen, dtype=torch.float64)
    want = torch.stack([sum(w[r, j] * rows[idx[r, j]] for j in range(k)) for r in range(R)])
    torch.testing.assert_close(gather_rows_sum(rows, idx, w), want, rtol=1e-15, atol=0)
    grad = torch.randn(R, D, generator=gen, dtype=torch.float64)
    g_rows, g_w = gather_rows_sum_backward(grad, rows, idx, fill, w, rows.shape[0])
    want_w = torch.stack([torch.stack([grad[r] @ rows[idx[r, j]] for j in range(k)]) for r in range(R)])
    torch.testing.assert_close(g_w, want_w, rtol=1e-12, atol=0)
    assert torch.equal(g_rows[fill], torch.zeros(n_fill, D, dtype=torch.float64))
    torch.testing.assert_close(g_rows[idx[:, k - 1]], grad * w[:, k - 1:k], rtol=1e-15, atol=0)
    # Unweighted (w = 1), as the dispatch gathers: k = 1 takes a shortcut of its own.
    want_1 = torch.stack([sum(rows[idx[r, j]] for j in range(k)) for r in range(R)])
    torch.testing.assert_close(gather_rows_sum(rows, idx, None), want_1, rtol=1e-15, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_row_kernels_match_reference(dtype):
    gen = torch.Generator().manual_seed(6)
    R, k, D, n_fill = 1024, 8, 7168, 300
    idx, fill = (t.cuda() for t in _row_layout(R, k, n_fill, gen))
    rows = torch.randn(R * k + n_fill, D, generator=gen).to(dtype).cuda()
    w = torch.rand(R, k, generator=gen).cuda()
    grad = torch.randn(R, D, generator=gen).to(dtype).cuda()
    src = rows[:R]
    assert torch.equal(scatter_rows_into(src, idx, fill, rows.shape[0], backend="triton"),
                       scatter_rows_into(src, idx, fill, rows.shape[0], backend="torch"))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)  # FMA
    torch.testing.assert_close(gather_rows_sum(rows, idx, w, backend="triton"),
                               gather_rows_sum(rows, idx, w, backend="torch"), **tol)
    got = gather_rows_sum_backward(grad, rows, idx, fill, w, rows.shape[0], backend="triton")
    want = gather_rows_sum_backward(grad, rows, idx, fill, w, rows.shape[0], backend="torch")
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("S,E", [(1, 256), (8, 32), (64, 4), (6, 43)])
def test_cuda_kernel_matches_reference_at_model_sizes(S, E):
    g = torch.Generator(device="cuda").manual_seed(S * 1000 + E)
    counts = torch.randint(0, 300, (S, E), generator=g, device="cuda")
    counts[0, 0] = 0
    n_rows = int(counts.sum())
    n_out = n_rows + E * (ALIGN - 1)
    want = expert_group_indices_reference(counts, n_rows, n_out, align=ALIGN)
    got = expert_group_indices(counts, n_rows, n_out, align=ALIGN, backend="triton")
    for gt, w in zip(got, want):
        assert torch.equal(gt, w)


def test_triton_backend_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    # Refused with a ValueError before any launch, as for every op with a kernel and a
    # torch reference (ep_fp8.ops.kernel_choice), not Triton's driver error.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(9)
    idx, fill = _row_layout(4, 2, 3, gen)
    src = torch.randn(4, 8, generator=gen)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        scatter_rows_into(src, idx, fill, 11, backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        expert_group_indices(torch.tensor([[2, 3]]), 5, 40, backend="triton")


def test_triton_on_cpu_tensors_is_refused_under_a_gpu_driver_and_allowed_under_a_stand_in(monkeypatch):
    # On a GPU machine Triton's CUDA driver is active, and it cannot launch on CPU tensors
    # (the refusal once let them through there); a stand-in driver set by hand, as the SM90
    # compile check does, can.
    from types import SimpleNamespace

    from triton.backends import backends

    from ep_fp8.ops import kernel_choice

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = torch.zeros(2)
    gpu_driver = object.__new__(backends["nvidia"].driver)   # its type is what counts
    monkeypatch.setattr(kernel_choice, "driver", SimpleNamespace(active=gpu_driver))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernel_choice.use_triton("triton", cpu)
    monkeypatch.setattr(kernel_choice, "driver", SimpleNamespace(active=object()))
    assert kernel_choice.use_triton("triton", cpu)
    assert not kernel_choice.use_triton("auto", cpu)   # auto takes the reference on the CPU
