"""KVCache: the keys and values of past positions, for decoding one token at a time.

Inference only (ep_fp8.generate): training never passes a cache, and its forward is the
same as without this module.
"""

from __future__ import annotations

import torch

from ep_fp8.model.args import ModelArgs
from ep_fp8.model.layers import sdpa


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
        self.check_layout(args, tokens, dtype)
        S = tokens.shape[1]
        if self.length + S > self.max_len:
            raise ValueError(f"positions [{self.length}, {self.length + S}) are past the "
                             f"cache's size ({self.max_len} positions): reset() it or start "
                             f"a new one")

    def check_layout(self, args: ModelArgs, tokens: torch.Tensor, dtype: torch.dtype) -> None:
        """check() without the room for the new positions."""
        layout = (args.n_layers, args.n_kv_heads, args.dim // args.n_heads)
        mine = (len(self.k), self.n_kv_heads, self.head_dim)
        if layout != mine:
            raise ValueError(f"the cache was built for another model: (n_layers, n_kv_heads, "
                             f"head_dim) {mine}, the model's {layout}")
        B = tokens.shape[0]
        if B != self.batch_size:
            raise ValueError(f"the cache holds {self.batch_size} sequences, the tokens {B}")
        if tokens.device != self.device:
            raise ValueError(f"the cache is on {self.device}, the tokens on {tokens.device}")
        if dtype != self.dtype:
            raise ValueError(f"the cache holds {self.dtype}, the model computes in {dtype}: "
                             f"build it with KVCache.for_model")

    def advance(self, S: int) -> None:
        """After a forward of S new positions (every block has written them)."""
        self.length += S

    def layer(self, i: int) -> "LayerCache":
        return LayerCache(self, i)

    def at(self, position: torch.Tensor) -> "StepCache":
        """This cache for one new position whose index the device holds: a StepCache
        (which see, for the errors)."""
        return StepCache(self, position)


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

    def attend(self, q_BSHd: torch.Tensor, k_BSHd: torch.Tensor,
               v_BSHd: torch.Tensor) -> torch.Tensor:
        """Attention of the new positions [start, start + S) (q, k, v (B, S, heads,
        head_dim), after rotation) to the cached ones and to the new ones up to each
        itself; writes k and v to the cache. Returns (B, S, n_heads, head_dim)."""
        start, S = self.start, q_BSHd.shape[1]
        k_all, v_all = self.update(k_BSHd, v_BSHd)          # positions [0, start + S)
        if start == 0:      # a prefill: the forward without a cache, on the same tensors
            k_all, v_all, mask, causal = k_BSHd, v_BSHd, None, True
        elif S == 1:        # one new token sees every cached position
            mask, causal = None, False
        else:               # new token i sees positions [0, start + i]
            mask = torch.ones(S, start + S, dtype=torch.bool, device=q_BSHd.device).tril(start)
            causal = False
        return sdpa(q_BSHd, k_all, v_all, mask, causal)


class StepCache:
    """A KVCache for one decoding step whose position is a tensor on the cache's device
    (0-d, int64), not a Python int: the step's work is then the same tensors and kernels
    at every position, so it can be captured once in a CUDA graph and replayed with the
    position (and the token) written into their tensors (ep_fp8.generate.StepDecoder).

    `Transformer.forward(tokens (B, 1), cache=kv_cache.at(position))` writes the new
    keys and values at `position` and attends to positions [0, position] by a mask over
    all max_len slots; it does not advance kv_cache.length, which its caller keeps. The
    logits equal those of `forward(tokens, cache=kv_cache)` with kv_cache.length ==
    position, up to rounding. The position's range is not checked (that would read the
    device): it must lie in [0, max_len), with positions below it written before.
    Raises TypeError when `cache` is not a KVCache, ValueError when `position` is not a
    0-d int64 tensor on its device; a forward with it, ValueError as KVCache.check_layout
    does or when the tokens hold more than one position per sequence.
    """

    def __init__(self, cache: KVCache, position: torch.Tensor) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        if not (isinstance(position, torch.Tensor) and position.dtype == torch.int64
                and position.dim() == 0 and position.device == cache.device):
            got = (f"{position.dtype} of shape {tuple(position.shape)} on {position.device}"
                   if isinstance(position, torch.Tensor) else type(position).__name__)
            raise ValueError(f"a step's position must be a 0-d int64 tensor on the cache's "
                             f"device ({cache.device}), got {got}")
        self.cache, self.position = cache, position

    def check(self, args: ModelArgs, tokens: torch.Tensor, dtype: torch.dtype) -> None:
        """KVCache.check_layout, and one new position per sequence."""
        self.cache.check_layout(args, tokens, dtype)
        if tokens.shape[1] != 1:
            raise ValueError(f"a step at a position on the device takes one new position "
                             f"per sequence, got {tokens.shape[1]}")

    def advance(self, S: int) -> None:
        """Nothing: the caller moves the position."""

    def layer(self, i: int) -> "StepLayerCache":
        return StepLayerCache(self, i)


class StepLayerCache:
    """Block i's view of a StepCache, what Attention.forward takes as `cache`."""

    def __init__(self, step: StepCache, i: int) -> None:
        self.step, self.i = step, i

    @property
    def start(self) -> torch.Tensor:
        """The new token's position (a 0-d tensor on the device)."""
        return self.step.position

    def attend(self, q_B1Hd: torch.Tensor, k_B1Hd: torch.Tensor,
               v_B1Hd: torch.Tensor) -> torch.Tensor:
        """LayerCache.attend for one new position given on the device: its k and v go to
        slot `position`, and it attends to slots [0, position] of all max_len."""
        cache, position = self.step.cache, self.step.position
        k, v = cache.k[self.i], cache.v[self.i]
        index = position.reshape(1)
        k.index_copy_(1, index, k_B1Hd)
        v.index_copy_(1, index, v_B1Hd)
        mask = (torch.arange(k.shape[1], device=k.device) <= position).view(1, 1, 1, -1)
        return sdpa(q_B1Hd, k, v, mask, False)
