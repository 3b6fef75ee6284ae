"""ep_fp8.rng: generator seeds distinct within a stream and unrelated across seeds."""

import torch

from ep_fp8 import rng
from ep_fp8.train.data import MarkovSource

N = 1 << 16


def _seeds(seed, stream, indices):
    return [rng.generator_seed(seed, stream, i) for i in indices]


def test_one_stream_is_a_bijection_of_the_index():
    # Training counts up from 0, held-out samples count down from -2: never the same seed
    # below 2^32 indices, and 2^32 apart always the same (what 32 bits allow).
    up = _seeds(7, "data", range(N))
    down = _seeds(7, "data", range(-2, -2 - N, -1))
    assert all(0 <= s < 2**32 for s in up + down)
    assert len(set(up) | set(down)) == 2 * N
    assert rng.generator_seed(7, "data", 5) == rng.generator_seed(7, "data", 5 + 2**32)
    assert rng.generator_seed(7, "data", -2) == rng.generator_seed(7, "data", 2**32 - 2)


def test_seeds_and_streams_are_not_shifted_copies_of_each_other():
    # A seed of the form seed * c + index made seed s + 1's sequence seed s's shifted by c
    # (and seeds 2^32 apart equal): the difference between two sequences is then constant.
    pairs = [((0, "data"), (1, "data")), ((0, "data"), (2**32, "data")),
             ((3, "data"), (3 + 2**40, "data")), ((0, "data"), (0, "init"))]
    for (s1, t1), (s2, t2) in pairs:
        a, b = _seeds(s1, t1, range(N)), _seeds(s2, t2, range(N))
        diffs = {(y - x) % 2**32 for x, y in zip(a[:100], b[:100])}
        assert len(diffs) > 1, ((s1, t1), (s2, t2))
        # Two unrelated bijections share about N^2 / 2^32 = 1 of their first N seeds.
        assert len(set(a) & set(b)) < 20, ((s1, t1), (s2, t2))


def test_markov_samples_depend_on_every_bit_of_the_seed():
    base = MarkovSource(64, 4, 16, seed=0).get([0, 1, 2])
    again = MarkovSource(64, 4, 16, seed=0).get([0, 1, 2])
    far = MarkovSource(64, 4, 16, seed=2**32).get([0, 1, 2])
    assert torch.equal(base, again)
    assert not torch.equal(base, far)
    # Neighbouring seeds: seed 1's samples are not seed 0's from some later index on.
    assert not torch.equal(MarkovSource(64, 4, 16, seed=1).get([0, 1, 2]),
                           MarkovSource(64, 4, 16, seed=0).get([1_000_003, 1_000_004, 1_000_005]))
