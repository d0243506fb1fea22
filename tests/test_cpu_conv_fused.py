"""The CPU convolution backward with its ReLU backward (relu_mask=) and bias gradient (db=) fused
into the pass that lays dz out for the GEMMs (cpu/conv.py Dz, conv_loops.gather_dz): the same
values as the unfused ops (activation_bwd, then the convolution, then bias_grad), a NaN dy under a
closed mask giving 0, and the same bits on any core count, in every chunking and layout path."""

from __future__ import annotations

import numpy as np
import pytest

from gpuml.backend.cpu import CpuBackend
from gpuml.backend.cpu import conv as cpu_conv
from gpuml.backend.cpu import loops as cpu_loops
from tests.test_cpu_ops import TOL, conv_ref, nan_buf, randn, rel_err


@pytest.fixture(params=["float32", "float64"])
def dt(request: pytest.FixtureRequest) -> str:
    return request.param


def _case(dt: str, channels: int, seed: int):
    rng = np.random.default_rng(seed)
    x = randn(rng, (7, channels, 7, 6), dt)
    w = randn(rng, (5, channels, 3, 3), dt)
    y = randn(rng, (7, 5, 5, 4), dt)  # the layer's ReLU output: about half of it closes the mask
    dy = randn(rng, (7, 5, 5, 4), dt)
    dy[y <= 0] *= 1e3  # masked-out gradients are large: a leak shows
    return x, w, y, dy


# channels 3: per-image GEMMs on dz laid out as dy; 8: channels-last im2col, channel-major dz
@pytest.mark.parametrize("channels", [3, 8])
@pytest.mark.parametrize("min_chunks", [1, 3])
def test_fused_relu_mask_and_bias_grad_match_the_unfused_ops(dt, monkeypatch, channels, min_chunks):
    monkeypatch.setattr(cpu_conv, "MIN_CHUNKS", min_chunks)
    be = CpuBackend(dtype=dt)
    x, w, y, dy = _case(dt, channels, 3)
    dz = np.where(y > 0, dy, 0).astype(dt)
    _, dx_ref, dw_ref = conv_ref(x, w, None, dz, (1, 1), (0, 0))
    db_ref = dz.astype(np.float64).sum(axis=(0, 2, 3))

    db, dw, dx = nan_buf((5,), dt), nan_buf(w.shape, dt), nan_buf(x.shape, dt)
    be.conv2d_bwd_weight(x, dy, w.shape, (1, 1), (0, 0), relu_mask=y, db=db, out=dw)
    be.conv2d_bwd_data(dy, w, x.shape, (1, 1), (0, 0), relu_mask=y, out=dx)
    assert rel_err(dw, dw_ref) < TOL[dt]
    assert rel_err(dx, dx_ref) < TOL[dt]
    assert rel_err(db, db_ref) < TOL[dt]
    # the inputs are read, never written
    assert np.array_equal(dy, _case(dt, channels, 3)[3])


@pytest.mark.parametrize("channels", [3, 8])
def test_fused_bias_grad_without_mask_and_nan_under_a_closed_mask(dt, channels):
    be = CpuBackend(dtype=dt)
    x, w, y, dy = _case(dt, channels, 4)
    db = nan_buf((5,), dt)
    be.conv2d_bwd_weight(x, dy, w.shape, (1, 1), (0, 0), db=db)
    assert rel_err(db, dy.astype(np.float64).sum(axis=(0, 2, 3))) < TOL[dt]

    closed = np.argwhere(y <= 0)[0]
    dy_nan = dy.copy()
    dy_nan[tuple(closed)] = np.nan  # the select drops it (activation_bwd's semantics)
    db_nan, dw = nan_buf((5,), dt), nan_buf(w.shape, dt)
    be.conv2d_bwd_weight(x, dy_nan, w.shape, (1, 1), (0, 0), relu_mask=y, db=db_nan, out=dw)
    dx = be.conv2d_bwd_data(dy_nan, w, x.shape, (1, 1), (0, 0), relu_mask=y)
    assert np.isfinite(db_nan).all() and np.isfinite(dw).all() and np.isfinite(dx).all()
    dy_nan[tuple(closed)] = np.nan
    open_ = np.argwhere(y > 0)[0]
    dy_nan[tuple(open_)] = np.nan  # under an open mask a NaN passes
    be.conv2d_bwd_weight(x, dy_nan, w.shape, (1, 1), (0, 0), relu_mask=y, db=db_nan, out=dw)
    assert np.isnan(db_nan[open_[1]]) and np.isnan(dw[open_[1]]).any()


@pytest.mark.parametrize("channels", [3, 8])
def test_fused_backward_same_bits_on_any_core_count(dt, monkeypatch, channels):
    monkeypatch.setattr(cpu_conv, "MIN_CHUNKS", 4)
    be = CpuBackend(dtype=dt)
    x, w, y, dy = _case(dt, channels, 5)

    def run() -> list[np.ndarray]:
        db = nan_buf((5,), dt)
        dw = be.conv2d_bwd_weight(x, dy, w.shape, (1, 1), (0, 0), relu_mask=y, db=db)
        return [db, dw.copy(), be.conv2d_bwd_data(dy, w, x.shape, (1, 1), (0, 0), relu_mask=y).copy()]

    monkeypatch.setattr(cpu_loops, "_WORKERS", 1)
    one = run()
    monkeypatch.setattr(cpu_loops, "_WORKERS", 3)
    for _ in range(3):
        for a, c in zip(one, run(), strict=True):
            assert np.array_equal(a, c)
