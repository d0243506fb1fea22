"""The counter-based generator every backend uses for dropout masks and device-side randomness.

uniform(seed, counter) = top 24 bits of splitmix64(seed + GOLDEN * (counter + 1)) / 2**24, all
arithmetic mod 2**64. Because it is a pure function of (seed, counter), the CPU backend and the
CUDA kernel (kernels/common.cuh: `gpuml_uniform`) produce the same numbers bit for bit, in any
launch order. Element i of a dropout call with offset o uses counter o + i.
"""

from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniform(seed: int, counters: np.ndarray) -> np.ndarray:
    """float64 uniforms in [0, 1) with 24-bit resolution, one per counter."""
    c = np.asarray(counters, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + GOLDEN * (c + np.uint64(1))
    return (splitmix64(z) >> np.uint64(40)).astype(np.float64) / float(1 << 24)


def keep_mask(seed: int, offset: int, n: int, p: float) -> np.ndarray:
    """uint8 mask of n elements: 1 where uniform >= p (kept with probability 1 - p)."""
    u = uniform(seed, np.arange(offset, offset + n, dtype=np.uint64))
    return (u >= p).astype(np.uint8)
