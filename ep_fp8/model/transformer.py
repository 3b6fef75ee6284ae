"""The decoder-only MoE transformer: embedding, blocks (attention + dense FFN or MoE), head.

Free of parallelism: `ep_fp8.parallel.parallelize_model` shards it from outside.
"""

from __future__ import annotations

import torch
from torch import nn

from ep_fp8.model.args import ModelArgs
from ep_fp8.model.cache import KVCache, StepCache
from ep_fp8.model.init import init_weights_
from ep_fp8.model.layers import Attention, RMSNorm
from ep_fp8.moe import FeedForward, MoE


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + ffn(norm(h)).

    The feed-forward is `self.feed_forward` (dense SwiGLU) for the first
    `args.n_dense_layers` blocks and `self.moe` (ep_fp8.moe.MoE) for the rest; the other
    attribute is None.
    """

    def __init__(self, layer_id: int, args: ModelArgs, *, float8: bool = False,
                 float8_backend: str = "auto", exact_scales: bool = False) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args.dim, args.n_heads, args.n_kv_heads, args.rope_theta)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: FeedForward | None = None
        self.moe: MoE | None = None
        if layer_id < args.n_dense_layers:
            self.feed_forward = FeedForward(args.dim, args.dense_hidden_dim)
        else:
            self.moe = MoE(
                args.dim, args.expert_hidden_dim, args.n_experts, args.top_k,
                n_shared_experts=args.n_shared_experts, score_func=args.score_func,
                route_norm=args.route_norm, route_scale=args.route_scale,
                n_expert_groups=args.n_expert_groups, n_limited_groups=args.n_limited_groups,
                aux_loss_coef=args.aux_loss_coef, load_balance_bias=args.load_balance_bias,
                float8=float8, float8_backend=float8_backend, exact_scales=exact_scales)

    def forward(self, x_BSD: torch.Tensor, cache: KVCache | StepCache | None = None) -> torch.Tensor:
        """x (B, S, D) -> (B, S, D); with `cache` (inference), x holds positions
        [cache.length, cache.length + S) (a StepCache: its position) and this block's keys
        and values go to it."""
        # The rotary tables in float32, built here: the block is an FSDP2 unit whose mixed
        # precision would cast float inputs to bf16, and attention may be compiled.
        if cache is None:
            cos_SF, sin_SF = self.attention.rope_tables(x_BSD.shape[1], x_BSD.device)
            h = x_BSD + self.attention(self.attention_norm(x_BSD), cos_SF, sin_SF)
        else:
            layer = cache.layer(self.layer_id)
            cos_SF, sin_SF = self.attention.rope_tables(x_BSD.shape[1], x_BSD.device,
                                                        layer.start)
            h = x_BSD + self.attention(self.attention_norm(x_BSD), cos_SF, sin_SF, layer)
        ffn = self.moe if self.moe is not None else self.feed_forward
        return h + ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    """Decoder-only transformer in the DeepSeek-V3 / Qwen3-MoE family.

    forward(tokens (B, S) int64 or int32) -> logits (B, S, vocab_size) float32.
    forward(tokens, cache=KVCache(...)) (inference): the tokens are positions
    [cache.length, cache.length + S) after the cached ones; it returns their logits and
    advances the cache (see ep_fp8.model.cache.KVCache and ep_fp8.generate).
    forward(tokens (B, 1), cache=kv_cache.at(position)): one position given as a 0-d
    tensor on the device, for a step captured in a CUDA graph (see StepCache).
    `float8`, `float8_backend`, `exact_scales` go to every MoE layer's experts.
    Weights are initialised by `init_weights(0)` at construction unless the parameters are
    on the meta device; call `init_weights(seed)` for another seed or after `to_empty`.
    """

    def __init__(self, args: ModelArgs, *, float8: bool = False, float8_backend: str = "auto",
                 exact_scales: bool = False) -> None:
        super().__init__()
        if not isinstance(args, ModelArgs):
            raise TypeError(f"args must be ModelArgs, got {type(args).__name__}")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(i, args, float8=float8, float8_backend=float8_backend,
                             exact_scales=exact_scales)
            for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if not self.tok_embeddings.weight.is_meta:
            self.init_weights(0)

    def init_weights(self, seed: int | None = None) -> None:
        """Deterministic init from `seed` (None means 0), the same for any sharding.

        See `ep_fp8.model.init.init_weights_`. Raises ValueError on meta parameters.
        """
        init_weights_(self, 0 if seed is None else int(seed), self.args.n_layers)

    def forward(self, tokens: torch.Tensor, cache: KVCache | StepCache | None = None) -> torch.Tensor:
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be int64 or int32, got {tokens.dtype}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, seq_len), got shape {tuple(tokens.shape)}")
        B, S = tokens.shape
        if S < 1:
            raise ValueError(f"tokens must hold at least one position, got shape {tuple(tokens.shape)}")
        if S > self.args.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds model.max_seq_len "
                             f"({self.args.max_seq_len})")
        h_BSD = self.tok_embeddings(tokens)
        if cache is None:
            for block in self.layers:
                h_BSD = block(h_BSD)
            return self.output(self.norm(h_BSD)).float()
        if not isinstance(cache, (KVCache, StepCache)):
            raise TypeError(f"cache must be a KVCache or a StepCache (KVCache.at), got "
                            f"{type(cache).__name__}")
        cache.check(self.args, tokens, h_BSD.dtype)
        for block in self.layers:
            h_BSD = block(h_BSD, cache)
        cache.advance(S)        # after every block wrote: they all read the same start
        return self.output(self.norm(h_BSD)).float()
