"""Scenarios run inside each rank of a gloo process group by test_all_to_all.py.

Each scenario compares the expert-parallel path on this rank with a single-process
reference (LocalDispatcher and all E experts, same weights, same tokens) and returns
plain numbers; the test asserts on them. One process group runs every scenario, so the
test pays for one spawn per world size.
"""

from __future__ import annotations

import copy
import traceback

import torch
import torch.distributed as dist
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from torch.utils._python_dispatch import TorchDispatchMode

import ep_fp8.ops
from ep_fp8.moe import AllToAllDispatcher, GroupedExperts, LocalDispatcher, MoE, update_router_biases

E, D, H = 8, 16, 32
DEVICE = torch.device("cpu")  # set per process by run()
ACT_DTYPE = torch.float32  # bfloat16 on GPUs, where torch._grouped_mm needs it
HAS_FP8_OPS = hasattr(ep_fp8.ops, "scaled_grouped_mm") and hasattr(ep_fp8.ops, "quantize_rows")


def _max_err(a, b):
    """max |a - b| / max |b| (0 for empty tensors)."""
    if not a.numel():
        return 0.0
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _routing(kind, rank, ws, T, gen):
    """(T_rank, k) expert ids for this rank."""
    if kind == "uniform":
        return torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)])
    if kind == "skewed":  # most choices go to expert 1 (on rank 0), some experts get nothing
        idx = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)])
        hot = torch.rand(T, generator=gen) < 0.8
        idx[hot, 0] = 1
        idx[hot, 1] = torch.where(idx[hot, 1] == 1, 2, idx[hot, 1])
        return idx
    if kind == "all_to_one_expert":
        return torch.full((T, 1), E - 1, dtype=torch.int64)
    if kind == "empty_rank":  # rank 0 sends nothing; the last rank receives nothing
        if rank == 0:
            return torch.zeros(0, 3, dtype=torch.int64)
        n_allowed = E - E // ws
        return torch.stack([torch.randperm(n_allowed, generator=gen)[:3] for _ in range(T)])
    raise ValueError(kind)


def _expert_pair(ws, rank, float8=False):
    torch.manual_seed(0)  # the same full weights on every rank
    backend = "auto" if DEVICE.type == "cuda" else "emulated"  # the real kernels on a GPU
    full = GroupedExperts(D, H, E, float8=float8, float8_backend=backend).to(DEVICE)
    EL = E // ws
    local = GroupedExperts(D, H, EL, float8=float8, float8_backend=backend).to(DEVICE)
    with torch.no_grad():
        for name in ("w13", "w2"):
            getattr(local, name).copy_(getattr(full, name)[rank * EL : (rank + 1) * EL])
    return full, local


def dispatch_scenario(kind, rank, ws, payload="bf16", dtype=None):
    dtype = dtype or ACT_DTYPE
    gen = torch.Generator().manual_seed(100 + rank)
    idx = _routing(kind, rank, ws, 12, gen).to(DEVICE)
    T, k = idx.shape
    x = torch.randn(T, D, generator=gen).to(DEVICE, dtype).requires_grad_()
    w = torch.rand(T, k, generator=gen).to(DEVICE).requires_grad_()
    grad_y = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    float8 = payload == "float8"
    full, local = _expert_pair(ws, rank, float8=float8)

    d = AllToAllDispatcher(dist.group.WORLD, E, payload=payload)
    xg, offs, st = d.dispatch(x, idx)
    y = d.combine(local(xg, offs, x_fp8=st.x_fp8), w, st)
    y.backward(grad_y)

    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = LocalDispatcher(E)
    xg_r, offs_r, st_r = ref.dispatch(x_ref, idx)
    y_ref = ref.combine(full(xg_r, offs_r), w_ref, st_r)
    y_ref.backward(grad_y)

    EL = E // ws
    sl = slice(rank * EL, (rank + 1) * EL)
    out = {"y": _max_err(y, y_ref), "grad_x": _max_err(x.grad, x_ref.grad), "grad_w": _max_err(w.grad, w_ref.grad)}
    for name in ("w13", "w2"):
        g = getattr(full, name).grad.clone()
        dist.all_reduce(g)  # the experts of rank r see every rank's tokens
        out[f"grad_{name}"] = _max_err(getattr(local, name).grad, g[sl])
    sizes = torch.diff(offs.long(), prepend=torch.zeros(1, dtype=torch.long, device=DEVICE))
    out["groups_aligned"] = bool((sizes % 16 == 0).all())
    out["fill_rows_zero"] = bool((st.x_fp8[0] if float8 else xg)[st.fill_idx].float().eq(0).all())
    moved = torch.tensor([sum(st.output_splits), T * k], device=DEVICE)
    dist.all_reduce(moved)  # every routed pair arrives at exactly one rank
    out["rows_conserved"] = moved[0].item() == moved[1].item()
    out["received_nothing"] = sum(st.output_splits) == 0
    if float8:
        out["payload_bits_match"] = all(_payload_bits_match(x, idx, exact) for exact in (False, True))
    return out


def _payload_bits_match(x, idx, exact_scales):
    """The float8 rows and scales received equal, bit for bit, ops.quantize_rows (with the
    same exact_scales) of the rows a bf16 payload delivers to the same grouped rows: the
    payload is quantized once, with the dispatcher's scale choice, and travels unchanged."""
    fp8 = AllToAllDispatcher(dist.group.WORLD, E, payload="float8", exact_scales=exact_scales)
    hp = AllToAllDispatcher(None, E, payload="bf16")   # None: the default group, named or not
    with torch.no_grad():
        _, _, st = fp8.dispatch(x, idx)
        xg, _, st_hp = hp.dispatch(x, idx)
    rows = st.dst_idx
    data_ref, scale_ref = ep_fp8.ops.quantize_rows(xg[rows], exact_scales=exact_scales)
    data, scale = st.x_fp8[0][rows], st.x_fp8[1][rows]
    return (torch.equal(st.dst_idx, st_hp.dst_idx)
            and torch.equal(data.view(torch.uint8), data_ref.view(torch.uint8))
            and torch.equal(scale, scale_ref))


def layer_scenario(rank, ws):
    """Whole MoE layer (router, shared experts, aux loss) with DTensor expert shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    ref = MoE(D, H, E, 2, n_shared_experts=1, score_func="sigmoid", aux_loss_coef=0.01).to(DEVICE, ACT_DTYPE)
    ep = copy.deepcopy(ref)
    mesh = init_device_mesh(DEVICE.type, (ws,))
    for name in ("w13", "w2"):
        full = getattr(ref.experts, name).detach().clone()
        setattr(ep.experts, name, torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)])))
    ep.dispatcher = AllToAllDispatcher(dist.group.WORLD, E)

    gen = torch.Generator().manual_seed(200 + rank)
    x = torch.randn(2, 5, D, generator=gen).to(DEVICE, ACT_DTYPE)
    grad = torch.randn(2, 5, D, generator=gen).to(DEVICE, ACT_DTYPE)
    y, y_ref = ep(x), ref(x)
    y.backward(grad)
    y_ref.backward(grad)
    out = {"y": _max_err(y, y_ref)}
    EL = E // ws
    for name, p in ref.named_parameters():
        g_ep = dict(ep.named_parameters())[name].grad
        if name.startswith("experts."):
            g = p.grad.clone()
            dist.all_reduce(g)
            out[f"grad_{name}"] = _max_err(g_ep.to_local(), g[rank * EL : (rank + 1) * EL])
        else:
            out[f"grad_{name}"] = _max_err(g_ep, p.grad)
    update_router_biases(ep, rate=0.01, group=dist.group.WORLD)
    biases = [torch.empty(E, device=DEVICE) for _ in range(ws)]
    dist.all_gather(biases, ep.router.expert_bias)
    out["bias_same_on_all_ranks"] = all(torch.equal(b, biases[0]) for b in biases)
    out["bias_updated"] = bool(biases[0].abs().sum() > 0)
    return out


class _CountAllToAll(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "all_to_all_single" in str(func):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _save_all_to_all(ctx, func, *args, **kwargs):
    if "all_to_all_single" in str(func):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_scenario(rank, ws):
    """Selective activation checkpointing that saves all-to-all outputs never repeats one."""
    torch.manual_seed(0)
    moe = MoE(D, H, E, 2).to(DEVICE, ACT_DTYPE)
    moe.experts = _expert_pair(ws, rank)[1]
    moe.dispatcher = AllToAllDispatcher(dist.group.WORLD, E)
    x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(rank)).to(DEVICE, ACT_DTYPE).requires_grad_()
    out = {}
    for mode in ("none", "full", "selective"):
        x.grad = None
        if mode == "none":
            y = moe(x)
        elif mode == "full":
            y = checkpoint(moe, x, use_reentrant=False)
        else:
            ctx_fn = lambda: create_selective_checkpoint_contexts(_save_all_to_all)  # noqa: E731
            y = checkpoint(moe, x, use_reentrant=False, context_fn=ctx_fn)
        counter = _CountAllToAll()
        with counter:
            y.square().sum().backward()
        out[f"backward_all_to_alls_{mode}"] = counter.count
        out[f"grad_x_{mode}"] = x.grad.clone()
    out["grad_x_selective_vs_none"] = _max_err(out.pop("grad_x_selective"), out["grad_x_none"])
    out["grad_x_full_vs_none"] = _max_err(out.pop("grad_x_full"), out.pop("grad_x_none"))
    return out


def bad_input_scenario(rank, ws):
    out = {}
    d = AllToAllDispatcher(dist.group.WORLD, E)
    idx = torch.zeros(4, 2, dtype=torch.int64, device=DEVICE)
    if rank == 1:
        idx[2, 1] = E  # one bad id on one rank
    try:
        d.dispatch(torch.randn(4, D, device=DEVICE), idx)
        out["out_of_range"] = "no error"
    except ValueError as e:
        out["out_of_range"] = str(e)
    try:
        AllToAllDispatcher(dist.group.WORLD, ws + 1)
        out["not_dividing"] = "no error"
    except ValueError as e:
        out["not_dividing"] = str(e)
    # the group still works after the error: every rank raised at the same point
    xg, offs, st = d.dispatch(torch.randn(4, D, device=DEVICE), torch.zeros(4, 2, dtype=torch.int64, device=DEVICE))
    out["usable_after_error"] = xg.shape[0] == ((8 * ws + 15) // 16 * 16 if rank == 0 else 0)
    return out


def bench_scenario(rank, ws):
    """scripts/bench_dispatch.py's expert-parallel measurement runs (times not checked)."""
    from tests.moe.bench_script import load_bench_dispatch

    bench = load_bench_dispatch()
    args = bench.parse_args(["--quick", "--tokens", "32", "--dim", "64", "--warmup", "0", "--iters", "1"])
    x = torch.randn(args.tokens, args.dim, device=DEVICE).to(torch.bfloat16)
    idx = bench.make_routing(args.tokens, args.top_k, args.experts, "skewed", DEVICE, rank)
    payloads = ("bf16", "float8") if HAS_FP8_OPS else ("bf16",)
    records = [r for p in payloads for r in bench.bench_all_to_all(x, idx, args, DEVICE, dist.group.WORLD, p)]
    return {"records": records}


def scenarios(ws):
    runs = {f"dispatch_{kind}": (dispatch_scenario, (kind,), {})
            for kind in ("uniform", "skewed", "all_to_one_expert", "empty_rank")}
    runs["dispatch_bfloat16"] = (dispatch_scenario, ("skewed",), {"dtype": torch.bfloat16})
    runs["layer"] = (layer_scenario, (), {})
    runs["checkpoint"] = (checkpoint_scenario, (), {})
    runs["bad_input"] = (bad_input_scenario, (), {})
    runs["bench"] = (bench_scenario, (), {})
    if HAS_FP8_OPS:
        for kind in ("uniform", "empty_rank"):
            runs[f"float8_{kind}"] = (dispatch_scenario, (kind,), {"payload": "float8", "dtype": torch.bfloat16})
    return runs


def run(rank, ws, device_type="cpu"):
    """Every scenario on this rank of the process group tests._dist.run_ranks made; returns
    {scenario: result dict}, an "error" entry holding the traceback of one that raised."""
    global DEVICE, ACT_DTYPE
    if device_type == "cuda":
        DEVICE, ACT_DTYPE = torch.device("cuda", rank), torch.bfloat16
    results = {}
    for name, (fn, args, kwargs) in scenarios(ws).items():
        try:
            results[name] = fn(*args, rank, ws, **kwargs)
        except Exception:  # recorded, so that the test names the scenario that broke
            results[name] = {"error": traceback.format_exc()}
    return results
