"""Parameter and FLOP counts of a `ModelArgs`, from the sizes alone (no model built).

Counted parameters (per block, D = dim, hd = dim // n_heads):
  attention   D * hd * (2 n_heads + 2 n_kv_heads)        (wq, wo; wk, wv)
  norms       2 D
  dense FFN   3 D dense_hidden_dim                        (first n_dense_layers blocks)
  MoE         E D (router) + (E + n_shared) 3 D expert_hidden_dim
and outside the blocks the embedding V D, the final norm D and the output head V D.
A token is *active* on everything except the E - top_k routed experts it is not sent to.

Training FLOPs per token (used for MFU), the PaLM / Megatron convention:
  6 N_mm + 12 n_layers (n_heads hd) seq_len
  N_mm = active parameters that take part in a matmul (active minus embedding and norms:
  the embedding is a lookup, norms are element-wise); 6 = 2 (multiply-add) x 3 (forward,
  gradient of the input, gradient of the weight). The attention term counts QK^T and
  attention x V over the full S x S score matrix (2 matmuls x 2 FLOPs x 3 passes), as the
  convention does, although causal kernels skip about half of it.
"""

from __future__ import annotations

from ep_fp8.model.args import ModelArgs


def _block_counts(args: ModelArgs) -> dict[str, int]:
    D, hd = args.dim, args.head_dim
    return {
        "attention": D * hd * (2 * args.n_heads + 2 * args.n_kv_heads),
        "norms": 2 * D,
        "dense_ffn": 3 * D * args.dense_hidden_dim,
        "router": args.n_experts * D,
        "expert": 3 * D * args.expert_hidden_dim,
    }


def param_counts(args: ModelArgs) -> tuple[int, int]:
    """(total parameters, parameters active per token) of the model `args` describes.

    Raises TypeError when args is not a ModelArgs.
    """
    if not isinstance(args, ModelArgs):
        raise TypeError(f"args must be ModelArgs, got {type(args).__name__}")
    c = _block_counts(args)
    outside = 2 * args.vocab_size * args.dim + args.dim          # embedding, head, final norm
    dense_block = c["attention"] + c["norms"] + c["dense_ffn"]
    moe_common = c["attention"] + c["norms"] + c["router"] + args.n_shared_experts * c["expert"]
    total = (outside + args.n_dense_layers * dense_block
             + args.n_moe_layers * (moe_common + args.n_experts * c["expert"]))
    active = (outside + args.n_dense_layers * dense_block
              + args.n_moe_layers * (moe_common + args.top_k * c["expert"]))
    return total, active


def flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at sequence length `seq_len`.

    6 * (active matmul parameters) + 12 * n_layers * dim_attn * seq_len; see the module
    docstring. Raises ValueError when seq_len < 1.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    _, active = param_counts(args)
    non_matmul = args.vocab_size * args.dim + (2 * args.n_layers + 1) * args.dim
    dim_attn = args.n_heads * args.head_dim
    return float(6 * (active - non_matmul) + 12 * args.n_layers * dim_attn * seq_len)
