"""Decoding steps at a position held on the device (ep_fp8.model.StepCache) and the
StepDecoder generate() captures in a CUDA graph: the logits of the cached forward at
every position, generate()'s tokens unchanged, and misuse refused before anything runs.
The graph itself needs a GPU; its step runs the same arithmetic eagerly on the CPU."""

import dataclasses

import pytest
import torch

from ep_fp8 import generate as generate_mod
from ep_fp8.generate import StepDecoder, generate
from ep_fp8.model import KVCache, StepCache
from ep_fp8.model.layers import rope_cos_sin
from tests.model.test_kv_cache import DENSE_MHA, TINY, _forward_lengths, _generate_uncached, _model, _tokens


def _copy(cache):
    twin = KVCache(cache.args, cache.batch_size, max_len=cache.max_len, dtype=cache.dtype,
                   device=cache.device)
    for mine, theirs in zip(twin.k + twin.v, cache.k + cache.v):
        mine.copy_(theirs)
    twin.length = cache.length
    return twin


@pytest.mark.parametrize("args", [TINY, DENSE_MHA], ids=["moe-gqa", "dense-mha"])
def test_steps_at_a_device_position_give_the_logits_and_cache_of_cached_forwards(args):
    model = _model(args)
    tokens = _tokens(2, 16, seed=5)
    cache = KVCache.for_model(model, 2)
    position = torch.zeros((), dtype=torch.int64)
    with torch.no_grad():
        model(tokens[:, :5], cache=cache)
        stepped = _copy(cache)
        for i in range(5, 16):
            want = model(tokens[:, i:i + 1], cache=cache)
            position.fill_(i)
            got = model(tokens[:, i:i + 1], cache=stepped.at(position))
            # float32; the masked attention over all 16 slots sums in another order.
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            assert stepped.length == 5        # a step leaves the length to its caller
        full = model(tokens)
    # The first block's keys and values bit for bit (the same inputs), the second's up to
    # the rounding of the first block's attention.
    assert torch.equal(stepped.k[0], cache.k[0]) and torch.equal(stepped.v[0], cache.v[0])
    for mine, theirs in zip(stepped.k + stepped.v, cache.k + cache.v):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    # Not vacuous: the positions' logits differ by far more than the tolerance.
    assert (full[:, 1:] - full[:, :-1]).abs().amax() > 1e-2


def test_a_step_ignores_slots_past_its_position():
    """Slots after the position hold stale keys and values (a reset cache, a warm-up
    step): the mask must keep them out."""
    model = _model()
    tokens = _tokens(1, 9, seed=2)
    with torch.no_grad():
        clean = KVCache.for_model(model, 1)
        model(tokens[:, :8], cache=clean)
        want = model(tokens[:, 8:], cache=clean)
        dirty = KVCache.for_model(model, 1)
        for t in dirty.k + dirty.v:
            t.normal_(0, 30)
        model(tokens[:, :8], cache=dirty)
        got = model(tokens[:, 8:], cache=dirty.at(torch.tensor(8)))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("start", [0, 7, 1000, 2**20])
def test_rotary_rows_from_a_device_position_are_those_of_an_int_start(start):
    cos, sin = rope_cos_sin(3, 8, 10000.0, torch.device("cpu"), start=start)
    cos_t, sin_t = rope_cos_sin(3, 8, 10000.0, torch.device("cpu"), start=torch.tensor(start))
    assert torch.equal(cos_t, cos) and torch.equal(sin_t, sin)


def test_a_step_cache_that_does_not_fit_is_refused_naming_why():
    model = _model()
    cache = KVCache.for_model(model, 1)
    with pytest.raises(ValueError, match=r"0-d int64 tensor on the cache's device \(cpu\), "
                                         r"got int"):
        cache.at(3)
    with pytest.raises(ValueError, match=r"got torch.int32 of shape \(\) on cpu"):
        cache.at(torch.tensor(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"got torch.int64 of shape \(1,\) on cpu"):
        cache.at(torch.tensor([3]))
    with pytest.raises(TypeError, match="cache must be a KVCache, got dict"):
        StepCache({}, torch.tensor(0))
    step = cache.at(torch.tensor(0))
    with torch.no_grad():
        with pytest.raises(ValueError, match="takes one new position per sequence, got 2"):
            model(_tokens(1, 2), cache=step)
        with pytest.raises(ValueError, match="the cache holds 1 sequences, the tokens 2"):
            model(_tokens(2, 1), cache=step)
        with pytest.raises(ValueError, match=r"holds torch.bfloat16, the model computes in"):
            model(_tokens(1, 1), cache=KVCache(TINY, 1, dtype=torch.bfloat16).at(torch.tensor(0)))
    assert all(not t.any() for t in cache.k + cache.v)    # refused before anything was written


def test_a_step_decoder_is_refused_what_it_cannot_run():
    model = _model()
    with pytest.raises(ValueError, match="StepDecoder takes a KVCache, got dict"):
        StepDecoder(model, {}, capture=False)
    with pytest.raises(ValueError, match="needs the model on a CUDA device, not cpu"):
        StepDecoder(model, KVCache.for_model(model, 1), capture=True)
    cache = KVCache.for_model(model, 1, max_len=4)
    steps = StepDecoder(model, cache, capture=False)
    with torch.no_grad():
        model(_tokens(1, 3), cache=cache)
        with pytest.raises(ValueError, match=r"one token per sequence \(1\), got \[5, 6\]"):
            steps([5, 6])
        assert cache.length == 3
        assert steps([5]).shape == (1, TINY.vocab_size)
        with pytest.raises(ValueError, match=r"position 4 is past the cache's size \(4 positions\)"):
            steps(6)
    assert cache.length == 4
    two = StepDecoder(model, KVCache.for_model(model, 2), capture=False)
    with torch.no_grad(), pytest.raises(ValueError, match=r"one token per sequence \(2\), got 5"):
        two(5)                  # an int stands for the one sequence of a batch of one only


def test_a_batch_step_decoder_gives_each_sequence_the_logits_of_its_own_cached_forward():
    model = _model()
    tokens = _tokens(3, 12, seed=11)
    batch = KVCache.for_model(model, 3)
    alone = [KVCache.for_model(model, 1) for _ in range(3)]
    steps = StepDecoder(model, batch, capture=False)
    with torch.no_grad():
        model(tokens[:, :4], cache=batch)
        for i, cache in enumerate(alone):
            model(tokens[i:i + 1, :4], cache=cache)
        for t in range(4, 12):
            got = steps(tokens[:, t].tolist())
            assert got.shape == (3, TINY.vocab_size)
            for i, cache in enumerate(alone):
                want = model(tokens[i:i + 1, t:t + 1], cache=cache)[0, -1]
                torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)   # float32
        assert batch.length == 12
        # Not vacuous: the three sequences' logits differ.
        assert (got[0] - got[1]).abs().max() > 1e-2 and (got[1] - got[2]).abs().max() > 1e-2


def test_no_graph_is_captured_off_a_gpu():
    from ep_fp8.generate import graph_problem

    assert graph_problem(_model(DENSE_MHA), torch.float32, torch.device("cpu")) == \
        "CUDA graphs need a CUDA device, not cpu"


def _eager_step_decoders(monkeypatch):
    """generate() runs its steps through an uncaptured StepDecoder (the CPU has no
    graphs); returns the decoders made."""
    made = []

    def eager(model, cache, cuda_graph):
        made.append(StepDecoder(model, cache, capture=False))
        return made[-1]
    monkeypatch.setattr(generate_mod, "_step_decoder", eager)
    return made


@pytest.mark.parametrize("prompt_len, max_new_tokens", [(5, 30), (1, 20), (15, 4), (20, 8), (3, 1)])
def test_generate_through_step_decoding_gives_the_uncached_loops_tokens(monkeypatch, prompt_len,
                                                                       max_new_tokens):
    model = _model()
    window = model.args.max_seq_len
    prompt = _tokens(1, prompt_len, seed=prompt_len)[0].tolist()
    expected = _generate_uncached(model, prompt, max_new_tokens, temperature=0)
    made = _eager_step_decoders(monkeypatch)
    lengths = _forward_lengths(model)
    assert generate(model, prompt, max_new_tokens, temperature=0) == expected
    # A decoder only where some step can fit: a prompt shorter than the window and a
    # second token to draw.
    assert len(made) == (1 if prompt_len < window and max_new_tokens > 1 else 0)
    # Its steps are the one-position forwards (after its own two warm-up-free calls: none
    # without capture), the window's forwards past max_seq_len are ordinary ones.
    context, want = min(prompt_len, window), [min(prompt_len, window)]
    for _ in range(max_new_tokens - 1):
        want.append(1 if context < window else window)
        context = min(context + 1, window)
    assert lengths == want


def test_sampled_generate_through_step_decoding_draws_what_the_uncached_loop_draws(monkeypatch):
    model = _model()
    prompt = [3, 1, 4, 1, 5]
    expected = _generate_uncached(model, prompt, 25, temperature=0.7, top_k=8,
                                  generator=torch.Generator().manual_seed(9))
    _eager_step_decoders(monkeypatch)
    assert generate(model, prompt, 25, temperature=0.7, top_k=8,
                    generator=torch.Generator().manual_seed(9)) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("args, dtype, atol", [
    (DENSE_MHA, torch.float32, 1e-4),
    (TINY, torch.bfloat16, 0.25),
    (dataclasses.replace(TINY, n_dense_layers=0), torch.bfloat16, 0.25),
], ids=["dense-fp32", "dense+moe-bf16", "moe-only-bf16"])
def test_on_the_gpu_captured_steps_give_the_eager_cached_logits_and_tokens(args, dtype, atol):
    """The CUDA graph's replays against eager cached forwards at each position (float32 to
    1e-4: the kernels differ, masked over all slots or not; bf16 to the tolerance of the
    cached-forward test in test_kv_cache), and generate() with and without the graph
    drawing the same tokens, past the window too (float32 only: bf16 rounding may swap
    close logits)."""
    import warnings

    from torch.nn.attention import sdpa_kernel

    from ep_fp8.generate import _DECODING_ATTENTION

    model = _model(args).to("cuda", dtype)
    tokens = _tokens(1, 16, seed=8).cuda()
    eager, graphed = KVCache.for_model(model, 1), KVCache.for_model(model, 1)
    with torch.no_grad(), sdpa_kernel(_DECODING_ATTENTION):
        steps = StepDecoder(model, graphed, capture=True)
        assert steps.graph is not None
        model(tokens[:, :4], cache=eager)
        model(tokens[:, :4], cache=graphed)
        for i in range(4, 16):
            want = model(tokens[:, i:i + 1], cache=eager)[0, -1]
            got = steps(int(tokens[0, i]))[0].clone()
            torch.testing.assert_close(got, want, rtol=0, atol=atol)
        assert graphed.length == 16
    if dtype == torch.float32:
        prompt = tokens[0, :5].tolist()
        with warnings.catch_warnings():
            warnings.simplefilter("error")      # no fallback to eager steps
            with_graph = generate(model, prompt, 30, temperature=0)
        assert with_graph == generate(model, prompt, 30, temperature=0, cuda_graph=False)
        assert len(set(with_graph)) >= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_a_capture_that_fails_falls_back_to_eager_steps_with_a_warning(monkeypatch):
    model = _model(DENSE_MHA).cuda()
    prompt = [3, 1, 4, 1, 5]
    expected = generate(model, prompt, 12, temperature=0, cuda_graph=False)

    def fail(self):
        raise RuntimeError("simulated capture failure\nmore detail")
    monkeypatch.setattr(StepDecoder, "_capture", fail)
    with pytest.warns(UserWarning, match=r"decoding without a CUDA graph: its capture failed "
                                         r"\(simulated capture failure\)$"):
        assert generate(model, prompt, 12, temperature=0) == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_float32_experts_decode_without_a_graph():
    """torch's float32 grouped matmul reads its offsets on the host: generate() keeps
    such a model's steps eager (no capture attempted, no warning), with the same tokens."""
    import warnings

    from ep_fp8.generate import graph_problem

    model = _model().cuda()
    assert "reads its group offsets on the host" in graph_problem(model, torch.float32,
                                                                  torch.device("cuda"))
    assert graph_problem(_model(DENSE_MHA), torch.float32, torch.device("cuda")) == ""
    assert graph_problem(model, torch.bfloat16, torch.device("cuda")) == ""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate(model, [3, 1, 4], 10, temperature=0) == \
            generate(model, [3, 1, 4], 10, temperature=0, cuda_graph=False)


@pytest.mark.parametrize("dtype, bf16_on_device, advice", [
    (torch.float32, True, True),        # an H200: a bf16 export would decode with a graph
    (torch.float32, False, False),      # an older GPU: a bf16 export would not either
    (torch.bfloat16, False, False),     # already bf16, on an older GPU
], ids=["fp32-sm90", "fp32-sm80", "bf16-sm80"])
def test_the_command_lines_note_advises_a_bf16_export_only_where_it_would_help(
        monkeypatch, dtype, bf16_on_device, advice):
    from ep_fp8.ops import backends

    monkeypatch.setattr(backends, "grouped_mm_on_device",
                        lambda d, device: bf16_on_device and d == torch.bfloat16)
    model = _model().to(dtype)
    note = generate_mod._graph_note(model, torch.device("cuda"))
    assert note.startswith("note: decoding without a CUDA graph: the experts' grouped matmul")
    assert note.endswith("; a model exported with --dtype bfloat16 decodes with one") == advice
    assert generate_mod._graph_note(_model(DENSE_MHA), torch.device("cuda")) == ""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_a_capture_that_fails_inside_falls_back_and_a_later_capture_works(monkeypatch):
    """A real failure during the capture (torch's float32 grouped matmul copies its offsets
    to the host, which graph_problem is made to overlook here): a warning, the eager
    steps' tokens, and a graph that still captures afterwards in the same process."""
    model = _model().cuda()
    prompt = [3, 1, 4, 1, 5]
    expected = generate(model, prompt, 12, temperature=0, cuda_graph=False)
    monkeypatch.setattr(generate_mod, "graph_problem", lambda *args: "")
    with pytest.warns(UserWarning, match="decoding without a CUDA graph: its capture failed"):
        assert generate(model, prompt, 12, temperature=0) == expected
    monkeypatch.undo()
    dense = _model(DENSE_MHA).cuda()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate(dense, prompt, 12, temperature=0) == \
            generate(dense, prompt, 12, temperature=0, cuda_graph=False)
