"""[validation]: the held-out loss that the loop logs (ep_fp8.train.loop.evaluate), checked
against a float64 recomputation, and the checks that stop a run whose held-out files
cannot fill one evaluation. The two-rank run with validation on is in
test_train_distributed.py."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from ep_fp8.model import ModelArgs, Transformer
from ep_fp8.moe.router import Router
from ep_fp8.train.config import load_config
from ep_fp8.train.data import MarkovSource, TokenFileSource
from ep_fp8.train.loop import _held_out_problem, evaluate
from ep_fp8.train.main import main
from tests._paths import ROOT

ARGS = ModelArgs(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, n_dense_layers=1,
                 dense_hidden_dim=24, n_experts=4, top_k=2, expert_hidden_dim=8,
                 n_shared_experts=0, max_seq_len=16, aux_loss_coef=0.5)
CPU = torch.device("cpu")


def test_evaluate_is_the_mean_token_cross_entropy_of_the_held_out_batches():
    torch.manual_seed(1)
    model = Transformer(ARGS)
    source = MarkovSource(vocab=32, branching=3, seq_len=12, seed=5, held_out=True)
    B, batches = 3, 4
    # Reference: the first 12 held-out samples in one forward (the experts take float32
    # at most), their mean cross-entropy in float64.
    tokens = source.get(list(range(B * batches)))
    with torch.no_grad():
        logits = model(tokens[:, :-1]).double()
    want = float(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))

    got = evaluate(model, source, B, batches, CPU)

    # Four batches of 3 summed in float32 against one float64 mean: measured ~1e-7
    # relative; 1e-5 leaves margin.
    assert got == pytest.approx(want, rel=1e-5)
    assert got == evaluate(model, source, B, batches, CPU)   # the same samples every time


def test_evaluate_leaves_the_model_as_it_found_it():
    torch.manual_seed(2)
    model = Transformer(ARGS)
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for r in routers:
        r.tokens_per_expert.copy_(torch.arange(4.0))
        r.expert_bias.copy_(torch.randn(4))
    before = copy.deepcopy(model.state_dict())
    counts = [r.tokens_per_expert.clone() for r in routers]
    source = MarkovSource(vocab=32, branching=3, seq_len=12, seed=5, held_out=True)

    evaluate(model, source, 2, 2, CPU)

    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(c, r.tokens_per_expert) for c, r in zip(counts, routers))
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    evaluate(model, source, 2, 2, CPU)
    assert not model.training   # a model in eval mode stays there


def test_held_out_text_too_short_for_one_evaluation_is_named(tmp_path):
    (tmp_path / "train.txt").write_text("training text " * 100)
    (tmp_path / "held.txt").write_text("x" * (4 * 16 + 1))   # 4 windows of 16 + 1 bytes
    cfg = load_config(None, ["--data.source=text", f"--data.path={tmp_path / 'train.txt'}",
                             "--model.vocab_size=257", "--training.seq_len=16",
                             "--training.batch_size=2", "--validation.enabled=true",
                             f"--validation.path={tmp_path / 'held.txt'}",
                             "--validation.batches=1"])
    held = TokenFileSource(str(tmp_path / "held.txt"), "text", "bytes", 16, 0)
    assert held.n_windows == 4
    assert _held_out_problem(cfg, held, world=2) == ""            # 1 x 2 x 2 = 4: exactly enough
    problem = _held_out_problem(cfg, held, world=3)               # 1 x 2 x 3 = 6
    assert "holds 4 sequence(s) of seq_len + 1 = 17 tokens, fewer than the 6 one evaluation " \
           "reads (batches 1 x batch_size 2 x 3 ranks)" in problem, problem


def test_main_stops_before_writing_anything_when_the_held_out_text_is_too_short(
        tmp_path, capsys, monkeypatch):
    from ep_fp8.train.main import free_port

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)   # the one-process group main makes, undone after
    (tmp_path / "train.txt").write_text("training text " * 100)
    (tmp_path / "held.txt").write_text("h" * (10 * 64 + 1))   # 10 windows of 64 + 1 bytes
    out = tmp_path / "out"
    code = main(["--config", os.path.join(ROOT, "train_configs", "debug_model.toml"),
                 "--data.source=text", f"--data.path={tmp_path / 'train.txt'}",
                 "--validation.enabled=true", f"--validation.path={tmp_path / 'held.txt'}",
                 f"--job.output_dir={out}", "--training.device=cpu", "--parallel.ep=1",
                 "--model.vocab_size=512"])
    assert code == 2
    err = capsys.readouterr().err
    assert "[validation] path" in err and "holds 10 sequence(s)" in err \
        and "fewer than the 32 one evaluation reads" in err, err
    assert not out.exists()
    assert not torch.distributed.is_initialized()
