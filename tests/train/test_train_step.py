"""train_step's gradient accumulation: n micro-batches train as one batch of all their
sequences, the MoE aux loss included."""

import dataclasses

import torch

from ep_fp8.model import ModelArgs, Transformer
from ep_fp8.train.loop import train_step

ARGS = ModelArgs(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, n_dense_layers=1,
                 dense_hidden_dim=24, n_experts=4, top_k=2, expert_hidden_dim=8,
                 n_shared_experts=0, max_seq_len=16, aux_loss_coef=0.5)


class _Batches:
    """The loader interface train_step uses: next() -> (inputs (B, S), targets (B, S))."""

    def __init__(self, batches):
        self.batches = list(batches)

    def next(self):
        return self.batches.pop(0)


def _gate_update(args, tokens_BS, grad_accum):
    """The gate weights' change after one train_step with SGD(lr=1): minus its gradient."""
    torch.manual_seed(0)
    model = Transformer(args)
    gate = model.layers[1].moe.router.gate.weight
    before = gate.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    inputs, targets = tokens_BS[:, :-1], tokens_BS[:, 1:]
    loader = _Batches(zip(inputs.chunk(grad_accum), targets.chunk(grad_accum)))
    train_step(model, loader, optimizer, scheduler, grad_accum, max_norm=1e9,
               device=torch.device("cpu"))
    return (gate.detach() - before)


def test_two_micro_batches_of_two_give_the_gate_gradient_of_one_batch_of_four():
    tokens = torch.randint(0, ARGS.vocab_size, (4, 9), generator=torch.Generator().manual_seed(1))
    one = _gate_update(ARGS, tokens, grad_accum=1)
    two = _gate_update(ARGS, tokens, grad_accum=2)
    # float32 model (the grouped matmul has no float64): equal up to float32 rounding.
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-7)
    # The aux loss does reach the gate: without it the update differs well beyond that.
    no_aux = _gate_update(dataclasses.replace(ARGS, aux_loss_coef=0.0), tokens, grad_accum=1)
    assert (no_aux - one).abs().max() > 0.05 * one.abs().max()
