"""The Transformer against a naive float64 reference written from the definitions:
explicit causal mask, grouped-query heads by index (query head h reads kv head
h // (n_heads / n_kv_heads)), rotary pairs (i, i + d/2) turned by position * theta^(-2i/d),
RMSNorm with its eps and weight, the router's scores, group limit, top-k and weights, and
every routed token's experts one by one, and the sequence-wise balance loss of DeepSeek-V3
(eqs. 17-20) added to the loss with its coefficient.

The model runs in float32 (the experts take no float64), so the tolerance is float32's:
relative 1e-5 of the largest logit or gradient (measured about 5e-7 and 1e-6). Weights
are scaled up so that attention and routing are far from uniform: a wrong mask, head map,
rotary angle, scale or norm changes the logits by 1e-2 or more.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ep_fp8.model import ModelArgs, Transformer

TOL = 1e-5


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rotary(x, theta):
    """x (B, S, H, d): pair (i, i + d/2) turned by the angle s * theta^(-2i/d)."""
    S, d = x.shape[1], x.shape[-1]
    angle = torch.arange(S, dtype=torch.float64)[:, None] * theta ** (-2 * torch.arange(d // 2) / d)
    cos, sin = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def attention(x, p, pre, args):
    B, S, _ = x.shape
    H, KV = args.n_heads, args.n_kv_heads
    hd = args.dim // H
    q = rotary((x @ p[pre + "wq.weight"].T).view(B, S, H, hd), args.rope_theta)
    k = rotary((x @ p[pre + "wk.weight"].T).view(B, S, KV, hd), args.rope_theta)
    v = (x @ p[pre + "wv.weight"].T).view(B, S, KV, hd)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    heads = []
    for h in range(H):
        kv = h // (H // KV)
        scores = torch.einsum("bsd,btd->bst", q[:, :, h], k[:, :, kv]) / math.sqrt(hd)
        heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, :, kv])
    return torch.stack(heads, dim=2).reshape(B, S, H * hd) @ p[pre + "wo.weight"].T


def swiglu(x, w1, w2, w3):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def _expert(p, pre, e):
    """(w1, w2, w3) of routed expert e: w1 and w3 are the halves of w13's rows."""
    w1, w3 = p[pre + "experts.w13"][e].chunk(2, dim=0)
    return w1, p[pre + "experts.w2"][e], w3


def moe(x, p, pre, args, bias):
    B, S, D = x.shape
    x = x.reshape(-1, D)
    logits = x @ p[pre + "router.gate.weight"].T
    scores = logits.softmax(-1) if args.score_func == "softmax" else logits.sigmoid()
    choice = scores + bias if args.load_balance_bias else scores
    E, G = args.n_experts, args.n_expert_groups
    if G > 1:  # keep the n_limited_groups best groups of each token
        grouped = choice.view(-1, G, E // G)
        group_score = (grouped.topk(min(2, E // G), -1).values.sum(-1) if args.load_balance_bias
                       else grouped.amax(-1))
        dropped = torch.ones_like(group_score, dtype=torch.bool)
        dropped.scatter_(1, group_score.topk(args.n_limited_groups, -1).indices, False)
        choice = grouped.masked_fill(dropped[..., None], float("-inf")).view(-1, E)
    idx = choice.topk(args.top_k, -1).indices
    w = scores.gather(1, idx)
    if args.route_norm:
        w = w / w.sum(-1, keepdim=True)
    w = w * args.route_scale
    rows = []
    for t in range(x.shape[0]):
        rows.append(sum(w[t, j] * swiglu(x[t], *_expert(p, pre, idx[t, j])) for j in range(args.top_k)))
    y = torch.stack(rows)
    if args.n_shared_experts:
        y = y + swiglu(x, *(p[pre + f"shared_experts.{n}.weight"] for n in ("w1", "w2", "w3")))
    # Balance loss per sequence: f_i = E / (k S) * (its tokens routed to i), a constant;
    # P_i = mean over its tokens of s_i / sum_j s_j; sum_i f_i P_i, averaged over sequences.
    aux = 0.0
    for b in range(B):
        seq = slice(b * S, (b + 1) * S)
        f = torch.bincount(idx[seq].flatten(), minlength=E).double() * E / (args.top_k * S)
        P = (scores[seq] / scores[seq].sum(-1, keepdim=True)).mean(0)
        aux = aux + (f * P).sum() / B
    return y.view(B, S, D), args.aux_loss_coef * aux


def reference_logits_and_aux(model, p, tokens):
    args = model.args
    h, aux = p["tok_embeddings.weight"][tokens], 0.0
    for i, layer in enumerate(model.layers):
        pre = f"layers.{i}."
        h = h + attention(rms_norm(h, p[pre + "attention_norm.weight"], args.norm_eps), p,
                          pre + "attention.", args)
        hn = rms_norm(h, p[pre + "ffn_norm.weight"], args.norm_eps)
        if i < args.n_dense_layers:
            h = h + swiglu(hn, *(p[pre + f"feed_forward.{n}.weight"] for n in ("w1", "w2", "w3")))
        else:
            y, layer_aux = moe(hn, p, pre + "moe.", args, layer.moe.router.expert_bias.double())
            h, aux = h + y, aux + layer_aux
    return rms_norm(h, p["norm.weight"], args.norm_eps) @ p["output.weight"].T, aux


CONFIGS = {
    "gqa4_theta_eps_aux": dict(n_heads=8, n_kv_heads=2, rope_theta=1000.0, norm_eps=1e-2,
                               aux_loss_coef=0.1),
    "mqa_sigmoid_groups_shared_aux": dict(n_heads=4, n_kv_heads=1, score_func="sigmoid", route_norm=False,
                                          route_scale=2.5, n_expert_groups=4, n_limited_groups=2,
                                          n_shared_experts=2, aux_loss_coef=0.1),
    "mha_no_dense_no_bias": dict(n_heads=2, n_kv_heads=2, n_dense_layers=0, load_balance_bias=False,
                                 n_expert_groups=2, n_limited_groups=1, rope_theta=5e5),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_gradients_match_a_float64_reference(name):
    args = ModelArgs(vocab_size=40, dim=32, n_layers=3, dense_hidden_dim=24, n_experts=8, top_k=2,
                     expert_hidden_dim=16, max_seq_len=32, **CONFIGS[name])
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights(7)
    with torch.no_grad():
        for n, t in model.named_parameters():
            if t.ndim > 1:
                t.mul_(6)   # far from uniform attention and routing
            else:
                t.copy_(torch.rand(t.shape) + 0.5)   # norm weights other than 1
        for layer in model.layers:
            if layer.moe is not None:
                layer.moe.router.expert_bias.copy_(torch.randn(args.n_experts) * 0.05)
    tokens = torch.randint(0, args.vocab_size, (2, 13), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, args.vocab_size, (2, 13), generator=torch.Generator().manual_seed(4))

    logits = model(tokens)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    p = {n: t.detach().double().requires_grad_() for n, t in model.named_parameters()}
    ref, aux = reference_logits_and_aux(model, p, tokens)
    (F.cross_entropy(ref.flatten(0, 1), targets.flatten()) + aux).backward()

    assert (logits.double() - ref).abs().max() <= TOL * ref.abs().max()
    for n, t in model.named_parameters():
        want = p[n].grad if p[n].grad is not None else torch.zeros_like(p[n])
        assert (t.grad.double() - want).abs().max() <= TOL * want.abs().max().clamp_min(1e-12), n
