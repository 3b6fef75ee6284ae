"""param_counts and flops_per_token against a hand count and against the built model."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ep_fp8.model import PRESETS, ModelArgs, Transformer, flops_per_token, param_counts

# vocab 10, dim 8, 2 heads of 4 (1 kv head), 1 dense block (hidden 12), 1 MoE block
# (4 experts of hidden 6, top-2, 1 shared expert).
HAND = ModelArgs(vocab_size=10, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, n_dense_layers=1,
                 dense_hidden_dim=12, n_experts=4, top_k=2, expert_hidden_dim=6,
                 n_shared_experts=1, max_seq_len=16)
# Counted by hand:
#   attention  wq 8*8 + wk 8*4 + wv 8*4 + wo 8*8 = 192;  two block norms 16
#   dense FFN  3*8*12 = 288;  router 4*8 = 32;  one expert 3*8*6 = 144
#   outside    embedding 80 + head 80 + final norm 8 = 168
#   dense block 192 + 16 + 288 = 496
#   MoE block   192 + 16 + 32 + (4 + 1) * 144 = 960;  active: 240 + (2 + 1) * 144 = 672
HAND_TOTAL = 168 + 496 + 960
HAND_ACTIVE = 168 + 496 + 672
# FLOPs at seq_len 5: matmul params = active - embedding 80 - norms (2*2 + 1) * 8 = 1216;
# 6 * 1216 + 12 * n_layers 2 * (n_heads * head_dim) 8 * seq_len 5 = 7296 + 960.
HAND_FLOPS_S5 = 6 * 1216 + 960


def test_param_counts_match_hand_count():
    assert param_counts(HAND) == (HAND_TOTAL, HAND_ACTIVE)


def test_flops_per_token_matches_hand_count():
    assert flops_per_token(HAND, 5) == HAND_FLOPS_S5


@pytest.mark.parametrize("args", [HAND, PRESETS["debug"]], ids=["hand", "debug"])
def test_total_count_equals_the_built_models_parameters(args):
    model = Transformer(args)
    assert param_counts(args)[0] == sum(p.numel() for p in model.parameters())


def test_matmul_flops_equal_torch_flop_counter_on_a_dense_model():
    # torch's FLOP counter knows aten.mm (not the CPU attention kernel): a dense-only model
    # checks the 6 * N term exactly; the attention term is the hand-counted rest.
    args = dataclasses.replace(HAND, n_dense_layers=HAND.n_layers)
    model = Transformer(args)
    B, S = 2, 5
    tokens = torch.randint(0, args.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    attention = 12 * args.n_layers * args.dim * S
    assert counter.get_total_flops() / (B * S) == flops_per_token(args, S) - attention


def test_active_count_depends_on_top_k_not_on_the_number_of_experts():
    more_experts = dataclasses.replace(HAND, n_experts=8)
    assert param_counts(more_experts)[1] == HAND_ACTIVE + 4 * 8  # only the router grows
    assert param_counts(more_experts)[0] == HAND_TOTAL + 4 * 8 + 4 * 144


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="ModelArgs"):
        param_counts({"dim": 8})
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(HAND, 0)
