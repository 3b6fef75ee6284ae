"""generate_samples(): several continuations of one prompt drawn as one batch. Each
sequence's every draw comes from the logits of the uncached model over its own context
(the rows do not mix: through the batched step decoder, the batched cached forward, and
past max_seq_len where the window slides), each sequence ends at its own stop, a batch of
one draws what the 1-D sampler draws, and bad settings are refused."""

import pytest
import torch

from ep_fp8 import generate as generate_mod
from ep_fp8.generate import generate, generate_samples, sample_next
from tests.model.test_kv_cache import DENSE_MHA, TINY, _model, _tokens
from tests.model.test_step_decoding import _eager_step_decoders


def _record_logits(monkeypatch) -> list[torch.Tensor]:
    """The logits generate_samples hands the sampler at each step, (samples, vocab)."""
    seen, real = [], generate_mod.sample_next

    def record(logits, *args, **kwargs):
        seen.append(logits.clone())
        return real(logits, *args, **kwargs)
    monkeypatch.setattr(generate_mod, "sample_next", record)
    return seen


@torch.no_grad()
def _uncached_logits(model, context: list[int]) -> torch.Tensor:
    window = model.args.max_seq_len
    return model(torch.tensor([context[-window:]]))[0, -1]


@pytest.mark.parametrize("args, prompt_len, max_new_tokens, step_decoder", [
    (TINY, 5, 8, True),          # the batched StepDecoder's steps
    (TINY, 5, 8, False),         # the batched cached forward's steps (a CPU's default)
    (TINY, 6, 20, True),         # past max_seq_len (16): the window slides
    (TINY, 16, 4, False),        # a prompt as long as the window: no step fits
    (DENSE_MHA, 3, 10, True),
], ids=["moe-steps", "moe-forwards", "moe-past-window", "moe-full-prompt", "dense-steps"])
def test_each_sample_is_drawn_from_the_uncached_logits_of_its_own_context(
        monkeypatch, args, prompt_len, max_new_tokens, step_decoder):
    model = _model(args)
    prompt = _tokens(1, prompt_len, seed=prompt_len)[0].tolist()
    made = _eager_step_decoders(monkeypatch) if step_decoder else []
    seen = _record_logits(monkeypatch)
    samples = generate_samples(model, prompt, max_new_tokens, 4, temperature=1.0,
                               generator=torch.Generator().manual_seed(3))
    assert len(samples) == 4 and all(len(s) == max_new_tokens for s in samples)
    assert len(seen) == max_new_tokens and all(s.shape == (4, args.vocab_size) for s in seen)
    if step_decoder:
        assert len(made) == (1 if prompt_len < args.max_seq_len else 0)
    for i, sample in enumerate(samples):
        for t in range(max_new_tokens):
            want = _uncached_logits(model, prompt + sample[:t])
            torch.testing.assert_close(seen[t][i], want, rtol=0, atol=1e-5)   # float32
    # Not vacuous: the sequences went different ways, so a row mixed up with another's
    # context would have been seen.
    assert len({tuple(s) for s in samples}) == 4


def test_each_sample_ends_at_its_own_stop_and_the_batch_when_all_have(monkeypatch):
    model = _model()
    seen = _record_logits(monkeypatch)
    samples = generate_samples(model, [3, 1, 4], 12, 8, temperature=1.0, allowed=2, stop=0,
                               generator=torch.Generator().manual_seed(0))
    for s in samples:
        assert 0 not in s[:-1]                              # nothing kept after the stop
        assert s[-1] == 0 or len(s) == 12
        assert set(s) <= {0, 1}                             # `allowed` holds in every row
    lengths = [len(s) for s in samples]
    assert len(set(lengths)) > 1, lengths                   # they ended apart
    assert len(seen) == max(lengths)                        # and no step after the last end
    assert any(len(s) < 12 for s in samples)


def test_a_batch_of_one_draws_what_the_one_dimensional_sampler_draws():
    """generate() now samples through a (1, vocab) batch: its draws must be those of the
    1-D call it made before, at every setting, from the same generator state."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        logits = torch.randn(50, generator=g) * 3
        temperature, top_k, allowed = [(1.0, 0, 50), (0.7, 8, 50), (1.3, 5, 20), (0.0, 0, 40)][trial % 4]
        one = torch.Generator().manual_seed(trial)
        batch = torch.Generator().manual_seed(trial)
        want = sample_next(logits, temperature, top_k, allowed, one)
        got = sample_next(logits[None], temperature, top_k, allowed, batch)
        assert isinstance(want, int) and got == [want]
        assert torch.equal(one.get_state(), batch.get_state())   # the same draws consumed


def test_a_batch_sampler_draws_one_token_per_row_within_its_limits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 40, generator=g)
    logits[:, 30:] = 50                      # the largest, but not allowed
    rows = sample_next(logits, 1.0, 3, 30, g)
    assert len(rows) == 6 and all(isinstance(t, int) for t in rows)
    top3 = logits[:, :30].topk(3, dim=-1).indices
    assert all(t in top3[i].tolist() for i, t in enumerate(rows))
    assert sample_next(logits, 0.0, 0, 30) == logits[:, :30].argmax(-1).tolist()


def test_one_sample_is_generates_continuation():
    model = _model()
    assert generate_samples(model, [3, 1, 4], 10, 1, temperature=0.8, top_k=6,
                            generator=torch.Generator().manual_seed(5)) == \
        [generate(model, [3, 1, 4], 10, temperature=0.8, top_k=6,
                  generator=torch.Generator().manual_seed(5))]


@pytest.mark.parametrize("samples", [0, -1, 1.5, "2"])
def test_a_bad_number_of_samples_is_refused_naming_it(samples):
    with pytest.raises(ValueError, match=rf"samples must be an int >= 1, got {samples!r}"):
        generate_samples(_model(), [3, 1], 4, samples)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("args, dtype, atol", [
    (DENSE_MHA, torch.float32, 1e-4),
    (TINY, torch.bfloat16, 0.25),
], ids=["dense-fp32", "dense+moe-bf16"])
def test_on_the_gpu_a_captured_batch_step_draws_each_sample_from_its_own_context(
        monkeypatch, args, dtype, atol):
    """The batch's steps as one CUDA graph replay (tolerances those of test_step_decoding's
    graph test: float32 kernels differ, bf16 rounds)."""
    import warnings

    model = _model(args).to("cuda", dtype)
    made, real = [], generate_mod._step_decoder

    def keep(*a):
        made.append(real(*a))
        return made[-1]
    monkeypatch.setattr(generate_mod, "_step_decoder", keep)
    seen = _record_logits(monkeypatch)
    prompt = [3, 1, 4, 1, 5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no fallback to eager steps
        samples = generate_samples(model, prompt, 10, 3, temperature=1.0,
                                   generator=torch.Generator("cuda").manual_seed(2))
    assert len(made) == 1 and made[0].graph is not None
    for i, sample in enumerate(samples):
        for t in range(10):
            with torch.no_grad():
                want = model(torch.tensor([prompt + sample[:t]], device="cuda"))[0, -1]
            torch.testing.assert_close(seen[t][i], want, rtol=0, atol=atol)
    assert len({tuple(s) for s in samples}) == 3
