"""Helpers of the CUDA-vs-reference tests: a clean skip without CuPy or a GPU, the backends under
test, and the error measure with its bounds.

Error measure: ||out - ref|| / ||ref|| (Frobenius), ref from CpuBackend(dtype="float64") fed the
very float32 values the GPU got, so only the GPU's float32 arithmetic is measured.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import pytest

#: float32 unit roundoff
U32 = 2.0**-24
#: ops with a few roundings per element (activations, dropout, optimizer updates, gathers)
ELEMENTWISE_TOL = 1e-6


def gemm_tol(K: int) -> float:
    """Bound for a product with K-term dot products accumulated in float32.

    Each of the K additions rounds with relative error <= u = 2^-24 of the running sum. With
    random-sign data the running sums grow like sqrt(k) and the rounding errors add like a random
    walk, so the expected relative error of a dot product is about u * sqrt(K / 2) (2.7e-6 at
    K = 4096; the worst case K * u is never approached with random data). We allow 4 u sqrt(K),
    and never less than 1e-5 (which also covers short dot products of nearly cancelling terms
    in the norm-wise measure).
    """
    return max(1e-5, 4.0 * U32 * math.sqrt(max(K, 1)))


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    from gpuml.backend import cuda_status

    return cuda_status()[0]


#: mark a whole module: `pytestmark = GPU`
GPU = [pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA GPU")]


@functools.lru_cache(maxsize=1)
def backends() -> tuple[Any, Any]:
    """(CudaBackend float32, CpuBackend float64), created once per test session."""
    from gpuml.backend.cpu import CpuBackend
    from gpuml.backend.cuda import CudaBackend

    return CudaBackend(), CpuBackend(dtype="float64")


def rel_err(out: Any, ref: Any) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(out).all(), "GPU output holds NaN/Inf (an element was never written?)"
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


def nan_filled(cuda: Any, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
    """An output buffer full of NaN, so an element the kernel forgets shows up."""
    return cuda.asarray(np.full(shape, np.nan, dtype=dtype))


def rand_f32(gen: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    """Standard-normal float32 test data of `shape`, times `scale`."""
    return (gen.standard_normal(shape) * scale).astype(np.float32)


def on_both(x: np.ndarray) -> tuple[Any, Any]:
    """`x` on the CUDA backend (float32) and on the CPU reference (float64)."""
    cuda, cpu = backends()
    return cuda.asarray(x), cpu.asarray(x.astype(np.float64))
