"""augment_images on the GPU against the CPU backend (float64), NaN-poisoned output."""

from __future__ import annotations

import numpy as np
import pytest

from gpuml.backend.cpu import CpuBackend

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [(1, 1, 28, 28), (7, 3, 13, 9), (33, 2, 5, 31)])
@pytest.mark.parametrize("hflip", [False, True])
def test_augment_matches_cpu(shape: tuple[int, ...], hflip: bool) -> None:
    from gpuml.backend import get_backend

    gpu = get_backend("cuda")
    x = np.random.default_rng(0).standard_normal(shape)
    kw = dict(seed=11, offset=3 << 32, max_shift=2.5, max_rotate=15.0, max_scale=0.1, hflip=hflip, fill=-0.4)
    ref = CpuBackend(dtype="float64").augment_images(x, **kw)
    out = gpu.asarray(np.full(shape, np.nan, dtype=np.float32))
    got = gpu.to_numpy(gpu.augment_images(gpu.asarray(x.astype(np.float32)), out=out, **kw))
    # Coordinates are double on both sides; the difference is float32 input/output rounding.
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-6
