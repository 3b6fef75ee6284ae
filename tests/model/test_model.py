"""The transformer on one process: shapes, causality, input checks, presets, init."""

import dataclasses
import math

import pytest
import torch

from ep_fp8.model import PRESETS, ModelArgs, Transformer

# Tiny MoE config: 1 dense block, 1 MoE block; fast on CPU.
TINY = ModelArgs(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, n_dense_layers=1,
                 dense_hidden_dim=24, n_experts=4, top_k=2, expert_hidden_dim=8,
                 n_shared_experts=1, max_seq_len=16)


def _tokens(B, S, vocab, seed=0):
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


def test_forward_returns_float32_logits_batch_seq_vocab():
    model = Transformer(TINY)
    logits = model(_tokens(3, 7, TINY.vocab_size))
    assert logits.shape == (3, 7, TINY.vocab_size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_blocks_are_dense_then_moe():
    model = Transformer(dataclasses.replace(TINY, n_layers=3, n_dense_layers=1))
    kinds = ["moe" if b.moe is not None else "dense" for b in model.layers]
    assert kinds == ["dense", "moe", "moe"]
    assert all((b.moe is None) != (b.feed_forward is None) for b in model.layers)


@pytest.mark.parametrize("t", [0, 5, 11])
def test_changing_token_t_leaves_logits_before_t_unchanged(t):
    model = Transformer(TINY)
    tokens = _tokens(2, 12, TINY.vocab_size)
    changed = tokens.clone()
    changed[:, t] = (changed[:, t] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    # fp32; the grouped expert matmul may block rows differently when one token's
    # routing changes, so allow rounding, far below the effect of a real leak.
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-4  # position t itself does see the change


def test_bad_tokens_raise_naming_the_problem():
    model = Transformer(TINY)
    with pytest.raises(TypeError, match="int64 or int32, got torch.float32"):
        model(torch.zeros(1, 4))
    model(torch.zeros(1, 4, dtype=torch.int32))   # int32, as the message says, is accepted
    with pytest.raises(ValueError, match="batch, seq_len"):
        model(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"at least one position, got shape \(2, 0\)"):
        model(torch.zeros(2, 0, dtype=torch.int64))


@pytest.mark.parametrize("change, key", [
    (dict(n_heads=3), "model.n_heads"),
    (dict(n_kv_heads=3), "model.n_kv_heads"),
    (dict(top_k=5), "model.top_k"),
    (dict(n_dense_layers=3), "model.n_dense_layers"),
    (dict(score_func="relu"), "model.score_func"),
    (dict(n_expert_groups=3), "model.n_expert_groups"),
    # 8 experts in 4 groups, 1 group kept: a token reaches 2 experts, so top-3 is impossible.
    (dict(n_expert_groups=4, n_limited_groups=1, top_k=3), r"model.top_k \(3\) must be <="),
    (dict(top_k=1), "model.route_norm = true with model.top_k = 1"),
    (dict(route_scale=0.0), "model.route_scale must be finite and > 0"),
    (dict(route_scale=float("nan")), "model.route_scale must be finite and > 0"),
    (dict(aux_loss_coef=float("nan")), "model.aux_loss_coef must be finite and >= 0"),
    (dict(aux_loss_coef=-0.5), "model.aux_loss_coef must be finite and >= 0"),
    (dict(rope_theta=float("inf")), "model.rope_theta must be finite and > 0"),
    (dict(norm_eps=0.0), "model.norm_eps must be finite and > 0"),
])
def test_inconsistent_args_raise_value_error_naming_the_field(change, key):
    with pytest.raises(ValueError, match=key):
        dataclasses.replace(TINY, **change)


def test_wrong_type_raises_type_error_naming_the_field():
    with pytest.raises(TypeError, match="model.dim"):
        dataclasses.replace(TINY, dim=16.0)
    with pytest.raises(TypeError, match="model.n_layers"):
        dataclasses.replace(TINY, n_layers=True)


def test_presets_have_the_documented_sizes():
    assert set(PRESETS) == {"debug", "moe_1b", "moe_16b"}
    debug = PRESETS["debug"]
    assert (debug.dim, debug.n_layers, debug.n_dense_layers, debug.n_experts, debug.top_k,
            debug.vocab_size) == (64, 4, 1, 8, 2, 256)
    one_b = PRESETS["moe_1b"]
    assert one_b.dim >= 2048 and one_b.expert_hidden_dim >= 1408
    assert 16 <= one_b.n_experts <= 32
    v2_lite = PRESETS["moe_16b"]
    assert (v2_lite.dim, v2_lite.n_layers, v2_lite.n_experts, v2_lite.n_shared_experts,
            v2_lite.top_k, v2_lite.expert_hidden_dim, v2_lite.n_dense_layers) == \
        (2048, 27, 64, 2, 6, 1408, 1)


def test_same_seed_same_weights_other_seed_other_weights():
    torch.manual_seed(1)  # global RNG state must not matter
    a = Transformer(TINY)
    a.init_weights(5)
    torch.manual_seed(2)
    b = Transformer(TINY)
    b.init_weights(5)
    c = Transformer(TINY)
    c.init_weights(6)
    d = Transformer(TINY)
    d.init_weights(5 + 2**32)  # the CPU generator keeps 32 bits: every bit must still count
    for (name, pa), pb, pc, pd in zip(a.named_parameters(), b.parameters(), c.parameters(),
                                      d.parameters()):
        assert torch.equal(pa, pb), name
        if pa.ndim > 1:
            assert not torch.equal(pa, pc), name
            assert not torch.equal(pa, pd), name


def test_init_scales_output_projections_by_depth_and_sets_norms_to_one():
    args = dataclasses.replace(TINY, dim=64, n_layers=8, n_heads=4, n_kv_heads=4,
                               dense_hidden_dim=128, expert_hidden_dim=64, vocab_size=512)
    model = Transformer(args)
    out_std = 0.02 / math.sqrt(2 * args.n_layers)
    # ~8k-300k samples per tensor: the sample std is within 5% of the true one.
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].attention.wo.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert model.layers[1].moe.experts.w2.std().item() == pytest.approx(out_std, rel=0.05)
    assert model.layers[1].moe.experts.w13.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(args.dim))


def test_init_weights_on_meta_parameters_raises_value_error():
    with torch.device("meta"):
        model = Transformer(TINY)
    with pytest.raises(ValueError, match="to_empty"):
        model.init_weights(0)


def test_meta_model_materialised_and_initialised_equals_eager_init():
    eager = Transformer(TINY)
    eager.init_weights(3)
    with torch.device("meta"):
        model = Transformer(TINY)
    model.to_empty(device="cpu")
    model.init_weights(3)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert torch.equal(p, q), name
    for name, buf in model.named_buffers():
        assert torch.equal(buf, torch.zeros_like(buf)), name  # router bias and counts


def test_debug_preset_trains_a_step():
    model = Transformer(PRESETS["debug"])
    tokens = _tokens(2, 17, 256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # 0.5 overshoots by step 3 on some seeds
    losses = []
    for _ in range(3):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), rel=0.05)  # uniform at init
    assert losses[2] < losses[1] < losses[0]


def test_attention_refuses_rotary_tables_that_are_not_float32_of_its_shape():
    attn = Transformer(TINY).layers[0].attention
    x = torch.randn(2, 5, TINY.dim)
    cos, sin = attn.rope_tables(5, x.device)
    assert cos.dtype == torch.float32 and cos.shape == (5, TINY.dim // TINY.n_heads // 2)
    with pytest.raises(ValueError, match="rotary tables must be float32"):
        attn(x, cos.bfloat16(), sin.bfloat16())  # what a mixed-precision cast would give
    with pytest.raises(ValueError, match=r"of shape \(5, 2\)"):
        attn(x, *attn.rope_tables(6, x.device))


def test_compiled_attention_receives_the_rotary_tables_instead_of_computing_them():
    # Inside a compiled graph inductor evaluates cos and sin again for every element of q
    # and k (10x slower rope on an H200): the tables must come in from the eager block.
    from ep_fp8.parallel.parallelize import apply_compile
    from tests.ops._helpers import graph_recorder

    recording_backend, graphs = graph_recorder()
    torch._dynamo.reset()
    model = Transformer(TINY)
    eager = model(_tokens(2, 9, TINY.vocab_size))
    apply_compile(model, recording_backend)
    compiled = model(_tokens(2, 9, TINY.vocab_size))
    torch._dynamo.reset()
    assert len(graphs) >= TINY.n_layers  # attention at least, per block
    # Method calls (angle.cos()) name their target by string, functions (torch.cos) by object.
    calls = {getattr(node.target, "__name__", str(node.target)) for gm in graphs
             for node in gm.graph.nodes if node.op in ("call_function", "call_method")}
    assert not calls & {"cos", "sin"}, calls
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
