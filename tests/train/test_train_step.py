"""train_step's gradient accumulation: n micro-batches train as one batch of all their
sequences, the MoE aux loss included; and loop_step, the loop's whole step around it."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from ep_fp8.model import ModelArgs, Transformer
from ep_fp8.moe.router import Router
from ep_fp8.train.config import Config
from ep_fp8.train.loop import loop_step, train_step

ARGS = ModelArgs(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, n_dense_layers=1,
                 dense_hidden_dim=24, n_experts=4, top_k=2, expert_hidden_dim=8,
                 n_shared_experts=0, max_seq_len=16, aux_loss_coef=0.5)


class _Batches:
    """The loader interface the steps use: next() -> (inputs (B, S), targets (B, S)), and
    prefetch(n), recorded in `events`."""

    def __init__(self, batches, events=None):
        self.batches = list(batches)
        self.events = [] if events is None else events

    def next(self):
        return self.batches.pop(0)

    def prefetch(self, n, ahead=0):
        self.events.append(("prefetch", n, ahead))


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


def test_loop_step_moves_the_router_biases_resets_their_counts_and_reports_the_stop_signal(monkeypatch):
    # What scripts/profile_train_step.py times as one step, as the loop runs it: without
    # the bias update the counts kept growing step after step and the biases never moved.
    cfg = Config()
    cfg.training.grad_accum, cfg.training.max_norm, cfg.router.bias_update_rate = 1, 1.0, 0.01
    torch.manual_seed(0)
    model = Transformer(ARGS)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    gen = torch.Generator().manual_seed(2)
    batches = [(t[:, :-1], t[:, 1:]) for t in torch.randint(0, ARGS.vocab_size, (3, 4, 9), generator=gen)]
    with torch.no_grad():
        expected_loss = float(F.cross_entropy(model(batches[0][0]).flatten(0, 1), batches[0][1].flatten()))
    # That forward counted its tokens as the step's will: the imbalance the step reports.
    expected_imbalance = max(float(r.tokens_per_expert.max() / r.tokens_per_expert.mean())
                             for r in routers)
    for r in routers:
        r.tokens_per_expert.zero_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    cpu = torch.device("cpu")

    # The next step's batches are drawn before the step's one host read, not after it.
    events, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: events.append(("read",)) or tolist(t))
    first = loop_step(cfg, model, _Batches(batches[:1], events), optimizer, scheduler, cpu)
    monkeypatch.undo()
    assert events == [("prefetch", 1, 8), ("read",)]
    assert first.loss == pytest.approx(expected_loss, rel=1e-6)  # one rank: its own loss
    assert (first.sigterm_ranks, first.sigint_ranks) == (0, 0)
    assert first.lr == 0.1 and first.grad_norm > 0
    assert first.load_imbalance_max == pytest.approx(expected_imbalance, rel=1e-6)
    for r in routers:
        assert float(r.tokens_per_expert.sum()) == 0.0  # counted anew each step
        steps = r.expert_bias / 0.01
        assert torch.equal(steps, steps.round()) and steps.abs().max() == 1  # one step of the rate
    second = loop_step(cfg, model, _Batches(batches[1:2]), optimizer, scheduler, cpu, stop_signal="SIGINT")
    assert (second.sigterm_ranks, second.sigint_ranks) == (0, 1)
    third = loop_step(cfg, model, _Batches(batches[2:]), optimizer, scheduler, cpu, stop_signal="SIGTERM")
    assert (third.sigterm_ranks, third.sigint_ranks) == (1, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loop_step_on_a_gpu_synchronizes_once_at_its_host_read():
    # Any other sync stalls the host mid-step, with the GPU then idle while the host
    # draws data and issues the next step's first kernels.
    import warnings

    cfg = Config()
    cfg.training.grad_accum, cfg.training.max_norm = 1, 1.0
    device = torch.device("cuda")
    torch.manual_seed(0)
    # bf16, sizes multiples of 16: the experts' grouped GEMM as in training (torch's float32
    # grouped GEMM reads the group offsets on the host).
    args = dataclasses.replace(ARGS, dim=32, dense_hidden_dim=32, expert_hidden_dim=16)
    model = Transformer(args).to(device, torch.bfloat16)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 4, 9))
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    loop_step(cfg, model, _Batches(batches[:1]), optimizer, scheduler, device)   # warm-up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = loop_step(cfg, model, _Batches(batches[1:]), optimizer, scheduler, device,
                               stop_signal="SIGTERM")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    assert len(syncs) == 1, [f"{w.filename}:{w.lineno}" for w in syncs]
    assert result.sigterm_ranks == 1
