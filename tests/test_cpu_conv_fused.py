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


# channels 3: the fallback to the two ops; 8 and 11: one pass for both gradients (channels-last)
@pytest.mark.parametrize("channels", [3, 8, 11])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("min_chunks", [1, 3])
def test_both_gradients_in_one_pass_equal_the_two_ops_bit_for_bit(monkeypatch, channels, precision, min_chunks):
    """conv2d_bwd (a layer's weight and input gradients in one run_tasks, dz laid out once) gives
    exactly the bits of conv2d_bwd_weight then conv2d_bwd_data, with the ReLU mask, the bias
    gradient, stride and padding, in every precision, on 1 or 3 workers; outputs NaN-poisoned."""
    monkeypatch.setattr(cpu_conv, "MIN_CHUNKS", min_chunks)
    be = CpuBackend(dtype="float32")
    be.precision = precision
    rng = np.random.default_rng(9)
    x = randn(rng, (7, channels, 9, 8), "float32")
    w = randn(rng, (5, channels, 3, 2), "float32")
    stride, padding = (2, 1), (1, 0)
    y = randn(rng, (7, 5, 5, 7), "float32")
    dy = randn(rng, (7, 5, 5, 7), "float32")
    want_db = nan_buf((5,), "float32")
    want_dw = be.conv2d_bwd_weight(x, dy, w.shape, stride, padding, relu_mask=y, db=want_db,
                                   out=nan_buf(w.shape, "float32"))
    want_dx = be.conv2d_bwd_data(dy, w, x.shape, stride, padding, relu_mask=y, out=nan_buf(x.shape, "float32"))
    for workers in (1, 3):
        monkeypatch.setattr(cpu_loops, "_WORKERS", workers)
        db, dw, dx = nan_buf((5,), "float32"), nan_buf(w.shape, "float32"), nan_buf(x.shape, "float32")
        got = be.conv2d_bwd(x, dy, w, stride, padding, relu_mask=y, db=db, dw=dw, dx=dx)
        assert got[0] is dw and got[1] is dx
        np.testing.assert_array_equal(dw, want_dw)
        np.testing.assert_array_equal(dx, want_dx)
        np.testing.assert_array_equal(db, want_db)


def test_one_pass_is_what_a_conv_layer_runs(monkeypatch) -> None:
    """A Conv2D layer that needs both gradients asks for them at once (one run_tasks for the
    channels-last layer); a first layer (no input gradient) or a frozen one does not."""
    from gpuml.nn.layers import Conv2D

    calls = []
    real = cpu_conv.conv2d_bwd
    monkeypatch.setattr(cpu_conv, "conv2d_bwd", lambda *a: calls.append("both") or real(*a))
    be = CpuBackend()
    rng = np.random.default_rng(2)
    for need_dx, trainable, want in [(True, True, ["both"]), (False, True, []), (True, False, [])]:
        calls.clear()
        layer = Conv2D(6, 3, activation="relu", name="c")
        layer.build((9, 8, 8), be, rng)
        layer.need_input_grad, layer.trainable = need_dx, trainable
        layer.link_previous(None)
        y = layer.forward(randn(rng, (4, 9, 8, 8), "float32"), training=True)
        dx = layer.backward(randn(rng, y.shape, "float32"))
        assert calls == want and (dx is not None) == need_dx
