"""Corners of ep_fp8.generate and the KVCache it uses: a one-token prompt with nothing to
generate, top_k and allowed beyond the vocabulary, bf16 logits sampled as float32, and a
cache built with a wrong kind of argument or on another device refused with a message."""

import math

import pytest
import torch

from ep_fp8.generate import generate, sample_next
from ep_fp8.model import KVCache
from tests.model.test_kv_cache import TINY, _model, _tokens


def test_a_one_token_prompt_with_nothing_or_one_token_to_generate():
    """No new token asked: none given, whatever the prompt's length (the cache then holds
    the prompt alone). One: the argmax of the whole forward's last position."""
    model = _model()
    assert generate(model, [5], 0) == []
    assert generate(model, [5], 0, temperature=1.0) == []
    with torch.no_grad():
        expected = int(model(torch.tensor([[5]]))[0, -1].argmax())
    assert generate(model, [5], 1, temperature=0) == [expected]


def test_top_k_and_allowed_beyond_the_vocabulary_are_no_limit():
    """allowed above the vocabulary is the vocabulary, and top_k at or above it keeps
    every id: the draws are those without either setting, for the same seed."""
    model = _model()
    prompt = [3, 1, 4]

    def draw(**kwargs):
        return generate(model, prompt, 10, temperature=1.0,
                        generator=torch.Generator().manual_seed(2), **kwargs)

    expected = draw()
    assert len(set(expected)) >= 3   # a sampled chain, not one token over and over
    vocab = TINY.vocab_size
    for top_k, allowed in ((vocab + 8, vocab + 18), (vocab, vocab + 18), (vocab + 1, None)):
        assert draw(top_k=top_k, allowed=allowed) == expected, (top_k, allowed)


def test_bf16_logits_are_sampled_from_their_float32_softmax():
    """The logits of a bf16 model are bf16; temperature and softmax are applied in float32.
    Two logits 100 and 99.5 at temperature 0.3: P(first) = sigmoid(0.5 / 0.3) = 0.8411
    (float64). In bf16 the quotients round to 334 and 332 (spacing 2 there), which would
    give sigmoid(2) = 0.8808. 10,000 draws, tolerance 5 standard errors (0.018)."""
    logits = torch.tensor([100.0, 99.5], dtype=torch.bfloat16)
    assert logits.float().tolist() == [100.0, 99.5]   # exact in bf16
    expected = 1 / (1 + math.exp(-0.5 / 0.3))
    g = torch.Generator().manual_seed(0)
    n = 10_000
    first = sum(sample_next(logits, 0.3, 0, 2, g) == 0 for _ in range(n)) / n
    tolerance = 5 * math.sqrt(expected * (1 - expected) / n)
    assert abs(first - expected) <= tolerance, (first, expected, tolerance)


def test_a_cache_of_the_wrong_arguments_is_refused_with_a_message():
    """Arguments of the wrong type are named (TypeError for args, ValueError for sizes
    that are not ints), not left to fail inside torch.zeros or on an attribute."""
    with pytest.raises(TypeError, match="args must be ModelArgs, got dict"):
        KVCache({"max_seq_len": 16}, 1)
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1, got 2.0"):
        KVCache(TINY, 2.0)
    with pytest.raises(ValueError, match=r"max_len must be an int in \[1, model.max_seq_len = "
                                         r"16\], got 4.0"):
        KVCache(TINY, 1, max_len=4.0)


def test_a_cache_on_another_device_than_the_tokens_is_refused():
    model = _model()
    cache = KVCache(TINY, 2, device="meta")
    with torch.no_grad(), pytest.raises(ValueError, match="the cache is on meta, the tokens on cpu"):
        model(_tokens(2, 4), cache=cache)
    assert cache.length == 0


def test_an_allowed_below_one_is_refused():
    """Not an empty choice (argmax of nothing) nor, for a negative value, the vocabulary
    less its last ids (a slice from the end)."""
    model = _model()
    for allowed in (0, -1, -31):
        with pytest.raises(ValueError, match=rf"allowed must be None or an int >= 1, got {allowed}"):
            generate(model, [1, 2], 3, temperature=0, allowed=allowed)
    assert generate(model, [1, 2], 3, temperature=0, allowed=1) == [0, 0, 0]


def test_greedy_choice_keeps_to_the_allowed_ids():
    """Temperature 0 takes the largest of the allowed logits, not of all of them."""
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0, 0.5, 9.0, 8.0])
    assert sample_next(logits, 0.0, 0, 6) == 1
    assert sample_next(logits, 0.0, 0, 8) == 6
    model = _model()
    free = generate(model, [3, 1, 4], 12, temperature=0)
    assert max(free) >= 8   # unrestricted, the chain takes ids the restriction removes
    assert max(generate(model, [3, 1, 4], 12, temperature=0, allowed=8)) < 8


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_a_temperature_that_is_not_finite_and_non_negative_is_refused(temperature):
    with pytest.raises(ValueError, match=r"must be >= 0 \(and the temperature finite\)"):
        generate(_model(), [3, 1], 4, temperature=temperature)


def test_a_tiny_temperature_draws_the_largest_and_top_k_cuts_before_scaling():
    """Logits divided by 1e-39 overflowed to inf and softmax gave nan; and a huge
    temperature flattened them before the top-k cut, which then kept every id."""
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1e-39, 0, 4, g)) == {0}
    assert set(sample_next(logits, 1e30, 1, 4, g)) == {0}     # top_k 1: only the largest
    assert set(sample_next(logits, 1e30, 2, 4, g)) == {0, 1}  # and a flat draw among the two
