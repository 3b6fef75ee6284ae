"""Shared by the ops tests (and others): float64 references, comparisons, what autograd saves."""

import torch

FP8 = torch.float8_e4m3fn


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal value for value, NaN matching NaN (float8 NaN encodings may differ in sign)."""
    if a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def offsets(sizes, device="cpu") -> torch.Tensor:
    return torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)


def grouped_mm_f64(x, w_t, offs, grad_out=None):
    """Float64 loop over groups: (out, grad_x, grad_w_t) with grad_out, else out alone."""
    M, N = x.shape[0], w_t.shape[2]
    x, w_t = x.double(), w_t.double()
    out = torch.zeros(M, N, dtype=torch.float64)
    gx, gw = torch.zeros_like(x), torch.zeros_like(w_t)
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end] @ w_t[g]
        if grad_out is not None:
            go = grad_out.double()
            gx[start:end] = go[start:end] @ w_t[g].T
            gw[g] = x[start:end].T @ go[start:end]
        start = end
    return out if grad_out is None else (out, gx, gw)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error of a against ref (0 when both are 0)."""
    a, ref = a.double(), ref.double()
    denom = ref.norm().item()
    return (a - ref).norm().item() / denom if denom else (a - ref).norm().item()


def saved_by(fn, *args, **kw):
    """(fn(*args, **kw), the tensors autograd saved for its backward, in order)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kw)
    return out, saved


def graph_recorder():
    """(backend, graphs): a torch.compile backend that appends each graph it is handed to
    `graphs` and runs it as traced (no inductor)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend, graphs
