"""KVCache: the keys and values of past positions, for decoding one token at a time.

Inference only (ep_fp8.generate): training never passes a cache, and its forward is the
same as without this module.
"""

from __future__ import annotations

import torch

from ep_fp8.model.args import ModelArgs


class KVCache:
    """Per-layer keys and values of the first `length` positions of `batch_size` sequences.

    k[i], v[i]: (batch_size, max_len, n_kv_heads, head_dim) for block i, in `dtype` (the
    model's activation dtype) on `device`; the keys are stored after their rotation.
    `Transformer.forward(tokens, cache=cache)` takes tokens (batch_size, S) as positions
    [length, length + S), attends to the cached positions and earlier new ones, writes the
    new keys and values and advances `length` by S. `max_len` defaults to, and may not
    exceed, args.max_seq_len (the model saw no later position). `reset()` empties it.
    Raises ValueError on a batch size or max_len out of range.
    """

    def __init__(self, args: ModelArgs, batch_size: int, *, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        if not isinstance(args, ModelArgs):
            raise TypeError(f"args must be ModelArgs, got {type(args).__name__}")
        max_len = args.max_seq_len if max_len is None else max_len
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"cache batch_size must be an int >= 1, got {batch_size!r}")
        if not (isinstance(max_len, int) and 1 <= max_len <= args.max_seq_len):
            raise ValueError(f"cache max_len must be an int in [1, model.max_seq_len = "
                             f"{args.max_seq_len}], got {max_len!r}")
        self.args, self.batch_size, self.max_len = args, batch_size, max_len
        self.n_kv_heads, self.head_dim = args.n_kv_heads, args.dim // args.n_heads
        shape = (batch_size, max_len, self.n_kv_heads, self.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.length = 0

    @classmethod
    def for_model(cls, model, batch_size: int, *, max_len: int | None = None) -> "KVCache":
        """A cache for `model` (an ep_fp8.model.Transformer), in the dtype and on the
        device of its token embedding (those of its activations)."""
        weight = model.tok_embeddings.weight
        return cls(model.args, batch_size, max_len=max_len, dtype=weight.dtype,
                   device=weight.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def reset(self) -> None:
        """Forget every position (the tensors are kept and overwritten later)."""
        self.length = 0

    def check(self, args: ModelArgs, tokens: torch.Tensor, dtype: torch.dtype) -> None:
        """ValueError unless tokens (B, S) of a model of `args` with activations of `dtype`
        fit: same layout (layers, kv heads, head size), batch size, device and dtype, and
        room for S more positions."""
        layout = (args.n_layers, args.n_kv_heads, args.dim // args.n_heads)
        mine = (len(self.k), self.n_kv_heads, self.head_dim)
        if layout != mine:
            raise ValueError(f"the cache was built for another model: (n_layers, n_kv_heads, "
                             f"head_dim) {mine}, the model's {layout}")
        B, S = tokens.shape
        if B != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} sequences, the tokens {B}")
        if tokens.device != self.device:
            raise ValueError(f"the cache is on {self.device}, the tokens on {tokens.device}")
        if dtype != self.dtype:
            raise ValueError(f"the cache holds {self.dtype}, the model computes in {dtype}: "
                             f"build it with KVCache.for_model")
        if self.length + S > self.max_len:
            raise ValueError(f"positions [{self.length}, {self.length + S}) are past the "
                             f"cache's size ({self.max_len} positions): reset() it or start "
                             f"a new one")

    def layer(self, i: int) -> "LayerCache":
        return LayerCache(self, i)


class LayerCache:
    """Block i's view of a KVCache, what Attention.forward takes as `cache`."""

    def __init__(self, cache: KVCache, i: int) -> None:
        self.cache, self.i = cache, i

    @property
    def start(self) -> int:
        """The position of the first new token (the cache's length, which the Transformer
        advances only after every block has written)."""
        return self.cache.length

    def update(self, k_BSHd: torch.Tensor,
               v_BSHd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, S, n_kv_heads, head_dim) at positions [start, start + S) and
        return the keys and values of positions [0, start + S)."""
        start, S = self.start, k_BSHd.shape[1]
        k, v = self.cache.k[self.i], self.cache.v[self.i]
        k[:, start:start + S] = k_BSHd
        v[:, start:start + S] = v_BSHd
        return k[:, :start + S], v[:, :start + S]
