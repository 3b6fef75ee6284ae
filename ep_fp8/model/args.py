"""Model hyper-parameters (`ModelArgs`) and the named presets.

A preset is a plain `ModelArgs`; change a field with `dataclasses.replace(PRESETS[name],
field=value)`, which validates again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ep_fp8.moe.router import SCORE_FUNCS


@dataclass
class ModelArgs:
    """Sizes of a decoder-only MoE transformer (DeepSeek-V3 / Qwen3-MoE family).

    Layers `[0, n_dense_layers)` use a dense SwiGLU of hidden size `dense_hidden_dim`; the
    others a MoE layer with `n_experts` routed experts (top `top_k` per token) of hidden
    size `expert_hidden_dim` plus `n_shared_experts` always-on experts of the same size.
    Attention: `n_heads` query heads of size `dim // n_heads`, `n_kv_heads` key/value heads
    (grouped-query attention), rotary positions with base `rope_theta`.
    The router fields (`score_func` ... `load_balance_bias`) go to `ep_fp8.moe.MoE`
    unchanged.

    Raises ValueError (naming the field) on inconsistent sizes.
    """

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    n_dense_layers: int = 1
    dense_hidden_dim: int = 192
    n_experts: int = 8
    top_k: int = 2
    expert_hidden_dim: int = 64
    n_shared_experts: int = 1
    score_func: str = "softmax"
    route_norm: bool = True
    route_scale: float = 1.0
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    aux_loss_coef: float = 0.0
    load_balance_bias: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "float": (int, float), "bool": bool, "str": str}[f.type]
            # bool is an int subclass: reject it where a count is expected.
            if not isinstance(value, expected) or (f.type != "bool" and isinstance(value, bool)):
                raise TypeError(f"model.{f.name} must be {f.type}, got {type(value).__name__}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len",
                     "n_expert_groups", "n_limited_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_dense_layers", "n_shared_experts"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        self._divides("n_heads", "dim")
        if self.head_dim % 2:
            raise ValueError(f"model.dim // model.n_heads must be even for rotary embeddings, "
                             f"got {self.head_dim}")
        self._divides("n_kv_heads", "n_heads")
        self._at_most("n_dense_layers", "n_layers")
        if self.n_dense_layers > 0 and self.dense_hidden_dim < 1:
            raise ValueError(f"model.dense_hidden_dim must be >= 1, got {self.dense_hidden_dim}")
        if self.n_moe_layers > 0:
            for name in ("n_experts", "expert_hidden_dim", "top_k"):
                if getattr(self, name) < 1:
                    raise ValueError(f"model.{name} must be >= 1 when there are MoE layers, "
                                     f"got {getattr(self, name)}")
            self._at_most("top_k", "n_experts")
            if self.score_func not in SCORE_FUNCS:
                raise ValueError(f"model.score_func must be one of {SCORE_FUNCS}, "
                                 f"got {self.score_func!r}")
            self._divides("n_expert_groups", "n_experts")
            self._at_most("n_limited_groups", "n_expert_groups")
            # Selection picks top_k experts among those of the n_limited_groups best groups.
            reachable = self.n_limited_groups * (self.n_experts // self.n_expert_groups)
            if self.top_k > reachable:
                raise ValueError(
                    f"model.top_k ({self.top_k}) must be <= model.n_limited_groups "
                    f"({self.n_limited_groups}) * model.n_experts ({self.n_experts}) / "
                    f"model.n_expert_groups ({self.n_expert_groups}) = {reachable}, the "
                    f"experts a token can reach")
            if self.top_k == 1 and self.route_norm:
                raise ValueError("model.route_norm = true with model.top_k = 1 makes every routing "
                                 "weight 1, so the gate would get no gradient from the loss: set "
                                 "model.route_norm = false")
        if not (math.isfinite(self.aux_loss_coef) and self.aux_loss_coef >= 0):
            raise ValueError(f"model.aux_loss_coef must be finite and >= 0, got {self.aux_loss_coef}")
        for name in ("route_scale", "rope_theta", "norm_eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"model.{name} must be finite and > 0, got {value}")

    def _divides(self, small: str, big: str) -> None:
        if getattr(self, big) % getattr(self, small):
            raise ValueError(f"model.{small} ({getattr(self, small)}) must divide "
                             f"model.{big} ({getattr(self, big)})")

    def _at_most(self, small: str, big: str) -> None:
        if getattr(self, small) > getattr(self, big):
            raise ValueError(f"model.{small} ({getattr(self, small)}) must be <= "
                             f"model.{big} ({getattr(self, big)})")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers


PRESETS: dict[str, ModelArgs] = {
    # Tiny and CPU-friendly: a 2-rank gloo training step takes milliseconds.
    "debug": ModelArgs(),
    # Fits and trains on one H200 with a useful batch. Expert-heavy on purpose: top-4 of 16
    # experts of hidden 2048 make the expert GEMMs ~70% of the weight matmul FLOPs (at the
    # 4096-token vocabulary of moe_1b_h200.toml's data, 60% at the preset's 32768; ~62% and
    # 54% with attention's at seq_len 2048), so the float8 experts' speed shows end to end.
    # Recipes set vocab_size to their tokenizer's.
    "moe_1b": ModelArgs(
        vocab_size=32768, dim=2048, n_layers=6, n_heads=16, n_kv_heads=4, n_dense_layers=1,
        dense_hidden_dim=5632, n_experts=16, top_k=4, expert_hidden_dim=2048,
        n_shared_experts=0, aux_loss_coef=1e-4, rope_theta=500000.0, max_seq_len=4096,
    ),
    # DeepSeek-V2-Lite sizes (~15.8B total, ~2.7B active) with grouped-query attention in
    # place of MLA: for 8 or more GPUs.
    "moe_16b": ModelArgs(
        vocab_size=102400, dim=2048, n_layers=27, n_heads=16, n_kv_heads=16, n_dense_layers=1,
        dense_hidden_dim=10944, n_experts=64, top_k=6, expert_hidden_dim=1408,
        n_shared_experts=2, aux_loss_coef=1e-4, rope_theta=10000.0, max_seq_len=4096,
    ),
}
