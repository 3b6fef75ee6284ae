"""Building blocks of the transformer: RMSNorm, rotary embeddings, attention.

(The dense SwiGLU is ep_fp8.moe.FeedForward, the same module the shared experts use.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim, computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics: bf16 sums over thousands of channels lose the small terms.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * self.weight.float()).type_as(x)


def sdpa(q_BSHd: torch.Tensor, k_BLHd: torch.Tensor, v_BLHd: torch.Tensor,
         mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """F.scaled_dot_product_attention on (B, S, heads, head_dim) layouts: q (B, S, n_heads,
    head_dim) against k and v (B, L, n_kv_heads, head_dim), `mask` (broadcast to (B, heads,
    S, L), True where attended) or `causal`; returns (B, S, n_heads, head_dim). Each kv
    head serves n_heads / n_kv_heads query heads (enable_gqa: not repeated in memory)."""
    out = F.scaled_dot_product_attention(
        q_BSHd.transpose(1, 2), k_BLHd.transpose(1, 2), v_BLHd.transpose(1, 2),
        attn_mask=mask, is_causal=causal, enable_gqa=k_BLHd.shape[2] != q_BSHd.shape[2])
    return out.transpose(1, 2)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device,
                 start: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for positions [start, start + seq_len): cos, sin each
    (seq_len, head_dim // 2) float32; each row the same bits whatever `start` (a decoding
    step with a KVCache takes the rows a whole-sequence forward would), also when `start`
    is a 0-d integer tensor on `device` (positions below 2^24 are exact in float32).

    Computed on every forward (a few kFLOPs) rather than kept in a buffer, so a cast of the
    model to bf16 or a meta-device construction cannot degrade or lose them; but outside
    any compiled graph (see Attention).
    """
    inv_freq_F = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device,
                                              dtype=torch.float32) / head_dim)
    if isinstance(start, torch.Tensor):     # a 0-d position on the device: no host read
        pos_S = start.float() + torch.arange(seq_len, device=device, dtype=torch.float32)
    else:
        pos_S = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)
    angle_SF = torch.outer(pos_S, inv_freq_F)
    return angle_SF.cos(), angle_SF.sin()


def apply_rope(x_BSHd: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of x (B, S, H, head_dim) by position."""
    x1, x2 = x_BSHd.float().chunk(2, dim=-1)
    cos, sin = cos_SF[:, None, :], sin_SF[:, None, :]      # broadcast over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x_BSHd)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions, no biases."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, rope_theta: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.rope_theta = n_heads, n_kv_heads, rope_theta
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def rope_tables(self, seq_len: int, device: torch.device,
                    start: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) float32 tables forward takes, for seq_len positions from start."""
        return rope_cos_sin(seq_len, self.head_dim, self.rope_theta, device, start)

    def forward(self, x_BSD: torch.Tensor, cos_SF: torch.Tensor, sin_SF: torch.Tensor,
                cache=None) -> torch.Tensor:
        """x (B, S, D) and the rotary tables of rope_tables(S, device) -> (B, S, D).

        With `cache` (a block's ep_fp8.model.cache.LayerCache or StepLayerCache,
        inference only) x holds positions [cache.start, cache.start + S), the tables are
        rope_tables(S, device, cache.start), and each new position attends to every cached
        one and to the new ones up to itself; its keys and values are written to the
        cache (cache.attend).

        The tables come in rather than being built here because attention is compiled on
        its own (ep_fp8.parallel.apply_compile): inside the graph inductor would fuse the
        table into the rotation and evaluate cos and sin again for every element of q and
        k (on an H200, 1.07 ms instead of 0.10 ms per forward of a moe_1b layer).
        """
        B, S, _ = x_BSD.shape
        want = (S, self.head_dim // 2)
        if any(t.shape != want or t.dtype != torch.float32 for t in (cos_SF, sin_SF)):
            raise ValueError(f"rotary tables must be float32 of shape {want}, got {cos_SF.dtype} "
                             f"{tuple(cos_SF.shape)} and {sin_SF.dtype} {tuple(sin_SF.shape)}: "
                             "use rope_tables(S, device)")
        q = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim)
        k = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos_SF, sin_SF), apply_rope(k, cos_SF, sin_SF)
        out = cache.attend(q, k, v) if cache is not None else sdpa(q, k, v, None, True)
        return self.wo(out.reshape(B, S, -1))
