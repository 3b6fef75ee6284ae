"""Seeds for torch generators: one per (seed, stream, index), distinct where it matters.

torch's CPU generator keeps only the low 32 bits of the seed it is given, so a seed formed
as `seed * c + index` makes two runs whose seeds differ by 2^32 draw the same numbers, and
two runs with neighbouring seeds draw the same numbers shifted by c indices. Here the
seed of index i is a_s * i + b_s modulo 2^32, with (a_s odd, b_s) taken from a hash of
the whole seed and the stream's name: for one (seed, stream) the map is a bijection, so
indices that differ modulo 2^32 never share a generator; two seeds (or two streams) map
through unrelated bijections, so neither's sequence is a shifted copy of the other's.
Any two of them still share about N^2 / 2^32 of their first N generator seeds, which is
what 32 bits allow.
"""

from __future__ import annotations

import functools
import hashlib

import torch

_MASK = 2**32 - 1
# Named in the data sources' fingerprints, so that a run resumed from a checkpoint written
# while the same seed drew other samples says so. 1: seed * 1_000_003 + index; 2: this map.
VERSION = 2


@functools.lru_cache(maxsize=64)
def _affine(seed: int, stream: str) -> tuple[int, int]:
    digest = hashlib.blake2b(f"{seed}/{stream}".encode(), digest_size=8).digest()
    h = int.from_bytes(digest, "little")
    return (h & _MASK) | 1, h >> 32


def generator_seed(seed: int, stream: str, index: int) -> int:
    """The 32-bit generator seed of `index` (any int, negative too) in `stream` under `seed`."""
    a, b = _affine(seed, stream)
    return (a * index + b) & _MASK


def generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A CPU torch.Generator seeded with generator_seed(seed, stream, index)."""
    return torch.Generator().manual_seed(generator_seed(seed, stream, index))
