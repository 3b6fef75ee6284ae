"""The key-value cache (ep_fp8.model.KVCache) and ep_fp8.generate's use of it: a prefill
and later chunks give the logits of the whole forward, generate() gives the tokens of the
loop without a cache (including past max_seq_len) at one position per token while the
context fits, and a cache that does not fit is refused with a message naming why."""

import dataclasses

import pytest
import torch

from ep_fp8.generate import generate, sample_next
from ep_fp8.model import KVCache, ModelArgs, Transformer
from ep_fp8.model.layers import rope_cos_sin

# 1 dense block, 1 MoE block (4 experts, top-2, a shared expert), GQA: 4 query heads on 2
# kv heads. Float32, float8 off: the model load_exported builds.
TINY = ModelArgs(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, n_dense_layers=1,
                 dense_hidden_dim=24, n_experts=4, top_k=2, expert_hidden_dim=8,
                 n_shared_experts=1, max_seq_len=16)
# Dense only, as many kv heads as query heads (SDPA without enable_gqa).
DENSE_MHA = dataclasses.replace(TINY, n_kv_heads=4, n_dense_layers=2)


def _model(args=TINY, seed=1):
    model = Transformer(args)
    model.init_weights(seed)
    with torch.no_grad():   # larger weights than the init: sharper, more varied logits
        for p in model.parameters():
            p.mul_(4)
    return model.eval()


def _tokens(B, S, seed=0):
    return torch.randint(0, TINY.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _generate_uncached(model, prompt, max_new_tokens, *, temperature=1.0, top_k=0,
                       generator=None):
    """generate() as it was before the cache: the model over the last max_seq_len tokens
    of the whole context for every new token."""
    window, vocab = model.args.max_seq_len, model.args.vocab_size
    tokens = torch.tensor([prompt])
    new = []
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -window:])[0, -1]
        token = sample_next(logits, temperature, top_k, vocab, generator)
        new.append(token)
        tokens = torch.cat([tokens, tokens.new_tensor([[token]])], dim=1)
    return new


@pytest.mark.parametrize("args", [TINY, DENSE_MHA], ids=["moe-gqa", "dense-mha"])
@pytest.mark.parametrize("chunks", [[5] + [1] * 11, [1] * 16, [6, 4, 1, 5], [16]])
def test_cached_chunks_give_the_logits_of_the_whole_forward(args, chunks):
    model = _model(args)
    tokens = _tokens(2, 16)
    cache = KVCache.for_model(model, 2)
    with torch.no_grad():
        full = model(tokens)
        got, at = [], 0
        for n in chunks:   # chunks of several tokens after cached ones need the mask
            got.append(model(tokens[:, at:at + n], cache=cache))
            at += n
            assert cache.length == at
    torch.testing.assert_close(torch.cat(got, dim=1), full, rtol=0, atol=1e-5)
    # The check is not vacuous: the positions' logits differ from each other by far more.
    assert (full[:, 1:] - full[:, :-1]).abs().amax() > 1e-2


def test_a_step_uses_the_cached_positions_and_its_own_position():
    """One token after a cached prefix: its logits are those of the whole sequence's last
    position, not of the token alone at position 0 nor of the token at position 0 with
    the prefix."""
    model = _model()
    tokens = _tokens(1, 9, seed=3)
    cache = KVCache.for_model(model, 1)
    with torch.no_grad():
        model(tokens[:, :8], cache=cache)
        step = model(tokens[:, 8:], cache=cache)[0, -1]
        full = model(tokens)[0, -1]
        alone = model(tokens[:, 8:])[0, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)
    assert (step - alone).abs().max() > 1e-3


def test_a_bf16_model_gets_a_bf16_cache_and_the_logits_within_bf16_rounding():
    model = _model().to(torch.bfloat16)
    tokens = _tokens(2, 16)
    cache = KVCache.for_model(model, 2)
    assert cache.dtype == torch.bfloat16 and cache.k[0].shape == (2, 16, 2, 4)
    with torch.no_grad():
        full = model(tokens)
        got = torch.cat([model(tokens[:, :5], cache=cache)]
                        + [model(tokens[:, i:i + 1], cache=cache) for i in range(5, 16)], dim=1)
    torch.testing.assert_close(got, full, rtol=0, atol=2e-2 * full.abs().max().item())
    assert len(generate(model, [1, 2, 3], 20, temperature=0)) == 20   # past the window


def test_rotary_rows_from_start_are_those_of_the_whole_table():
    cos, sin = rope_cos_sin(16, 8, 10000.0, torch.device("cpu"))
    cos5, sin5 = rope_cos_sin(3, 8, 10000.0, torch.device("cpu"), start=5)
    assert torch.equal(cos5, cos[5:8]) and torch.equal(sin5, sin[5:8])


def _forward_lengths(model):
    """The sequence length of every forward of `model`, appended as it runs."""
    lengths = []
    model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    return lengths


@pytest.mark.parametrize("prompt_len, max_new_tokens", [(5, 30), (1, 20), (20, 8), (16, 3)])
def test_greedy_generate_is_the_uncached_loop_at_one_position_per_token(prompt_len,
                                                                        max_new_tokens):
    model = _model()
    window = model.args.max_seq_len
    prompt = _tokens(1, prompt_len, seed=prompt_len + 1)[0].tolist()
    expected = _generate_uncached(model, prompt, max_new_tokens, temperature=0)
    # Not a constant chain, which would hide a wrong window (the prompts' seed is chosen so).
    assert len(set(expected)) >= min(4, max_new_tokens)
    lengths = _forward_lengths(model)
    assert generate(model, prompt, max_new_tokens, temperature=0) == expected
    # The prompt's last `window` tokens once, then one position per token until the cache
    # holds `window` positions, then the whole window again per token.
    context, want = min(prompt_len, window), [min(prompt_len, window)]
    for _ in range(max_new_tokens - 1):
        want.append(1 if context < window else window)
        context = min(context + 1, window)
    assert lengths == want


def test_sampled_generate_draws_what_the_uncached_loop_draws():
    model = _model()
    prompt = [3, 1, 4, 1, 5]
    draw = dict(temperature=1.0, top_k=8)
    expected = _generate_uncached(model, prompt, 25, generator=torch.Generator().manual_seed(4),
                                  **draw)
    assert generate(model, prompt, 25, generator=torch.Generator().manual_seed(4),
                    **draw) == expected


def test_a_cache_that_does_not_fit_is_refused_naming_why():
    model = _model()
    tokens = _tokens(2, 4)
    with pytest.raises(ValueError, match="the cache holds 3 sequences, the tokens 2"):
        model(tokens, cache=KVCache.for_model(model, 3))
    other = Transformer(dataclasses.replace(TINY, n_layers=3, n_dense_layers=1)).eval()
    with pytest.raises(ValueError, match=r"built for another model: \(n_layers, n_kv_heads, "
                                         r"head_dim\) \(3, 2, 4\), the model's \(2, 2, 4\)"):
        model(tokens, cache=KVCache.for_model(other, 2))
    with pytest.raises(ValueError, match=r"holds torch.bfloat16, the model computes in "
                                         r"torch.float32"):
        model(tokens, cache=KVCache(TINY, 2, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match=r"cache must be a KVCache or a StepCache \(KVCache.at\), got dict"):
        model(tokens, cache={})
    cache = KVCache.for_model(model, 2, max_len=6)
    with torch.no_grad():
        model(tokens, cache=cache)
        with pytest.raises(ValueError, match=r"positions \[4, 7\) are past the cache's size "
                                             r"\(6 positions\): reset\(\) it"):
            model(_tokens(2, 3), cache=cache)
        assert cache.length == 4            # a refused call leaves the cache as it was
        model(_tokens(2, 2), cache=cache)   # what still fits is taken
        assert cache.length == 6
        cache.reset()
        torch.testing.assert_close(model(tokens, cache=cache), model(tokens), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"max_len must be an int in \[1, model.max_seq_len = "
                                         r"16\], got 17"):
        KVCache(TINY, 1, max_len=17)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        KVCache(TINY, 0)
    with pytest.raises(ValueError, match="max_seq_len"):   # the model's own check comes first
        model(_tokens(2, 17), cache=KVCache.for_model(model, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.25)])
def test_on_the_gpu_decoding_kernels_give_the_logits_of_the_whole_forward(dtype, atol):
    """generate's attention kernels (flash / memory-efficient, not cuDNN) with the cache
    against the default kernels over the whole sequence, on CUDA; bf16's tolerance is about
    twice the gap between this model's bf16 and float32 logits on the CPU (0.07-0.11)."""
    from torch.nn.attention import sdpa_kernel

    from ep_fp8.generate import _DECODING_ATTENTION

    model = _model(TINY).to("cuda", dtype)
    tokens = _tokens(2, 16).cuda()
    cache = KVCache.for_model(model, 2)
    with torch.no_grad():
        full = model(tokens)
        with sdpa_kernel(_DECODING_ATTENTION):
            got = torch.cat([model(tokens[:, :6], cache=cache), model(tokens[:, 6:10], cache=cache)]
                            + [model(tokens[:, i:i + 1], cache=cache) for i in range(10, 16)], dim=1)
    torch.testing.assert_close(got, full, rtol=0, atol=atol)
    assert (full[:, 1:] - full[:, :-1]).abs().amax() > 4   # logits that differ by far more
