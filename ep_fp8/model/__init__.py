"""The MoE transformer and its named presets (no parallelism here: see ep_fp8.parallel)."""

from ep_fp8.model.args import PRESETS, ModelArgs
from ep_fp8.model.cache import KVCache, StepCache
from ep_fp8.model.counts import flops_per_token, param_counts
from ep_fp8.model.layers import Attention, RMSNorm
from ep_fp8.model.transformer import Transformer, TransformerBlock

__all__ = [
    "PRESETS", "ModelArgs", "KVCache", "StepCache", "Transformer", "TransformerBlock", "Attention", "RMSNorm",
    "param_counts", "flops_per_token",
]
