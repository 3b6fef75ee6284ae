"""ops.permute.expert_group_indices: Triton kernel against the torch reference, and both
against a layout built row by row in Python."""

import pytest
import torch

from ep_fp8.ops.permute import expert_group_indices, expert_group_indices_reference

ALIGN = 16


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
def test_triton_kernel_matches_reference_in_interpreter(name, counts, extra):
    n_rows = int(counts.sum())
    padded = int(((counts.sum(0) + ALIGN - 1) // ALIGN * ALIGN).sum())
    want = expert_group_indices_reference(counts, n_rows, padded + extra, align=ALIGN)
    got = expert_group_indices(counts, n_rows, padded + extra, align=ALIGN, backend="triton")
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_every_grouped_row_is_written_exactly_once():
    counts = torch.randint(0, 30, (4, 6), generator=torch.Generator().manual_seed(1))
    n_rows = int(counts.sum())
    n_out = n_rows + 6 * (ALIGN - 1)  # the local dispatcher's upper bound
    dst, fill, offs = expert_group_indices(counts, n_rows, n_out, backend="triton")
    assert torch.equal(torch.cat([dst, fill]).sort().values, torch.arange(n_out))
    sizes = torch.diff(offs, prepend=offs.new_zeros(1))
    assert bool((sizes % ALIGN == 0).all()) and bool((sizes >= counts.sum(0)).all())


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
