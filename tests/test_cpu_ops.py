"""CpuBackend ops against naive references written here: explicit loops over every index, on odd
shapes, in float32 and float64. Every `out=` buffer starts as NaN, so an element the op forgets
to write fails the comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gpuml.backend.base import conv_out_size
from gpuml.backend.cpu import CpuBackend
from gpuml.backend.cpu import conv as cpu_conv
from gpuml.backend.cpu import loops as cpu_loops
from gpuml.backend.rng import keep_mask
from gpuml.errors import ShapeError

DTYPES = ["float32", "float64"]
TOL = {"float32": 1e-5, "float64": 1e-12}


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.isfinite(got).all(), "non-finite (unwritten?) elements"
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-300))


def nan_buf(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return np.full(shape, np.nan, dtype=dtype)


def out_shape(x_shape, channels, kernel, stride, pad):
    """(N, channels, P, Q) of a convolution or pooling window over x_shape (N, C, H, W)."""
    P = conv_out_size(x_shape[2], kernel[0], stride[0], pad[0])
    return (x_shape[0], channels, P, conv_out_size(x_shape[3], kernel[1], stride[1], pad[1]))


def randn(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture(params=DTYPES)
def dt(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def be(dt: str) -> CpuBackend:
    return CpuBackend(dtype=dt)


# --------------------------------------------------------------------------- references


def conv_ref(x, w, b, dy, stride, pad):
    """y, dx, dw of a zero-padded cross-correlation, by direct loops over n,k,p,q,c,r,s."""
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    P, Q = conv_out_size(H, R, stride[0], pad[0]), conv_out_size(W, S, stride[1], pad[1])
    xl, wl, dyl = x.tolist(), w.tolist(), dy.tolist()
    y = np.zeros((N, K, P, Q))
    dx = np.zeros(x.shape)
    dw = np.zeros(w.shape)
    for n in range(N):
        for k in range(K):
            for p in range(P):
                for q in range(Q):
                    acc = 0.0 if b is None else float(b[k])
                    g = dyl[n][k][p][q]
                    for c in range(C):
                        for r in range(R):
                            h = p * stride[0] - pad[0] + r
                            if not 0 <= h < H:
                                continue
                            for s in range(S):
                                v = q * stride[1] - pad[1] + s
                                if 0 <= v < W:
                                    acc += xl[n][c][h][v] * wl[k][c][r][s]
                                    dx[n, c, h, v] += g * wl[k][c][r][s]
                                    dw[k, c, r, s] += g * xl[n][c][h][v]
                    y[n, k, p, q] = acc
    return y, dx, dw


def pool_windows(H, W, kernel, stride, pad):
    """(p, q, [(h, w) in-image cells of the window in row-major order]) for every window."""
    P, Q = conv_out_size(H, kernel[0], stride[0], pad[0]), conv_out_size(W, kernel[1], stride[1], pad[1])
    for p in range(P):
        for q in range(Q):
            cells = [
                (p * stride[0] - pad[0] + r, q * stride[1] - pad[1] + s)
                for r in range(kernel[0])
                for s in range(kernel[1])
            ]
            yield p, q, [(h, w) for h, w in cells if 0 <= h < H and 0 <= w < W]


def maxpool_ref(x, dy, kernel, stride, pad):
    N, C, H, W = x.shape
    y = np.zeros(dy.shape)
    am = np.zeros(dy.shape, dtype=np.int64)
    dx = np.zeros(x.shape)
    for n in range(N):
        for c in range(C):
            for p, q, cells in pool_windows(H, W, kernel, stride, pad):
                vals = [x[n, c, h, w] for h, w in cells]
                i = int(np.argmax(vals))  # first maximum
                h, w = cells[i]
                y[n, c, p, q], am[n, c, p, q] = vals[i], h * W + w
                dx[n, c, h, w] += dy[n, c, p, q]
    return y, am, dx


def avgpool_ref(x, dy, kernel, stride, pad):
    N, C, H, W = x.shape
    y = np.zeros(dy.shape)
    dx = np.zeros(x.shape)
    area = kernel[0] * kernel[1]
    for n in range(N):
        for c in range(C):
            for p, q, cells in pool_windows(H, W, kernel, stride, pad):
                y[n, c, p, q] = sum(float(x[n, c, h, w]) for h, w in cells) / area
                for h, w in cells:
                    dx[n, c, h, w] += dy[n, c, p, q] / area
    return y, dx


def matmul_ref(a, b):
    M, K = a.shape
    _, N = b.shape
    out = np.zeros((M, N))
    for i in range(M):
        for j in range(N):
            out[i, j] = sum(float(a[i, k]) * float(b[k, j]) for k in range(K))
    return out


# --------------------------------------------------------------------------- dense algebra


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("epilogue", ["none", "bias", "relu", "bias_relu", "accumulate"])
@pytest.mark.parametrize("mkn", [(7, 13, 5), (1, 9, 3)])
def test_matmul(be, dt, trans_a, trans_b, epilogue, mkn):
    rng = np.random.default_rng(1)
    M, K, N = mkn
    a = randn(rng, (K, M) if trans_a else (M, K), dt)
    b = randn(rng, (N, K) if trans_b else (K, N), dt)
    bias = randn(rng, (N,), dt) if "bias" in epilogue else None
    act = "relu" if "relu" in epilogue else None
    ref = matmul_ref(a.T if trans_a else a, b.T if trans_b else b)
    if epilogue == "accumulate":
        out = randn(rng, (M, N), dt)
        ref += out
    else:
        out = nan_buf((M, N), dt)
        ref = ref + (0 if bias is None else bias.astype(np.float64))
        ref = np.maximum(ref, 0) if act else ref
    got = be.matmul(
        a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, activation=act,
        accumulate=epilogue == "accumulate", out=out,
    )  # fmt: skip
    assert got is out
    assert rel_err(got, ref) < TOL[dt]
    if epilogue != "accumulate":
        fresh = be.matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, activation=act)
        assert fresh.dtype == np.dtype(dt) and rel_err(fresh, ref) < TOL[dt]


def test_matmul_errors(be, dt):
    a, b = np.zeros((32, 784), dt), np.zeros((700, 10), dt)
    with pytest.raises(ShapeError, match=r"matmul: a \(32, 784\) and b \(700, 10\) do not fit"):
        be.matmul(a, b)
    with pytest.raises(ShapeError, match=r"matmul: a \(32, 784\) and b.T \(10, 700\)"):
        be.matmul(a, b, trans_b=True)
    with pytest.raises(ShapeError, match="matmul: out buffer is"):
        be.matmul(a, np.zeros((784, 10), dt), out=np.zeros((32, 11), dt))
    with pytest.raises(ShapeError, match="matmul: bias"):
        be.matmul(a, np.zeros((784, 10), dt), bias=np.zeros(11, dt))
    with pytest.raises(ShapeError, match="matmul: b .* dtype"):
        be.matmul(a, np.zeros((784, 10), np.float16))
    with pytest.raises(ValueError, match="accumulate"):
        be.matmul(a, np.zeros((784, 10), dt), accumulate=True)


@pytest.mark.parametrize("shape", [(5, 7), (1, 3), (3, 4, 5, 6), (2, 3, 1, 1)])
def test_bias_grad(be, dt, shape):
    dy = randn(np.random.default_rng(2), shape, dt)
    ref = np.zeros(shape[1])
    for idx in np.ndindex(*shape):
        ref[idx[1]] += float(dy[idx])
    out = nan_buf((shape[1],), dt)
    assert be.bias_grad(dy, out=out) is out
    assert rel_err(out, ref) < TOL[dt]


def test_bias_grad_blocks_change_nothing(be, dt, monkeypatch):
    """bias_grad sums channels in blocks of accumulators; blocks of one channel or of all give the
    same bits."""
    dy = randn(np.random.default_rng(22), (6, 5, 4, 3), dt)
    whole = be.bias_grad(dy)
    for lanes in (1, 13, 10**6):
        monkeypatch.setattr(cpu_loops, "SUM_LANES", lanes)
        assert np.array_equal(be.bias_grad(dy), whole)


# --------------------------------------------------------------------------- convolution

CONV_CASES = [
    # x shape, w shape, stride, padding
    ((1, 1, 5, 7), (2, 1, 3, 3), (1, 1), (0, 0)),
    ((3, 2, 9, 8), (4, 2, 3, 3), (1, 1), (1, 1)),
    ((2, 3, 11, 7), (5, 3, 5, 5), (2, 2), (2, 2)),
    ((3, 4, 10, 13), (2, 4, 1, 1), (3, 3), (0, 0)),
    ((2, 3, 9, 10), (3, 3, 3, 5), (1, 2), (2, 1)),
    ((1, 2, 7, 7), (3, 2, 5, 3), (3, 1), (0, 2)),
    ((5, 1, 6, 6), (2, 1, 3, 3), (2, 2), (1, 1)),
    ((3, 2, 4, 4), (2, 2, 1, 1), (1, 1), (2, 2)),
    ((2, 4, 13, 13), (3, 4, 3, 3), (1, 1), (0, 0)),
    # 8+ input channels: forward and weight gradient go through the channels-last im2col
    ((2, 8, 9, 7), (3, 8, 3, 3), (1, 1), (1, 1)),
    ((3, 9, 8, 10), (2, 9, 3, 5), (2, 1), (2, 2)),
    ((1, 8, 7, 7), (2, 8, 5, 3), (3, 2), (0, 1)),
    ((2, 16, 6, 5), (3, 16, 1, 1), (1, 1), (0, 0)),
]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d(be, dt, case, relu):
    xs, ws, stride, pad = case
    rng = np.random.default_rng(3)
    x, w, b = randn(rng, xs, dt), randn(rng, ws, dt), randn(rng, (ws[0],), dt)
    y_shape = out_shape(xs, ws[0], ws[2:], stride, pad)
    dy = randn(rng, y_shape, dt)
    y_ref, dx_ref, dw_ref = conv_ref(x, w, b, dy, stride, pad)
    y = nan_buf(y_shape, dt)
    assert be.conv2d_fwd(x, w, b, stride, pad, activation="relu" if relu else None, out=y) is y
    assert rel_err(y, np.maximum(y_ref, 0) if relu else y_ref) < TOL[dt]
    dx, dw = nan_buf(xs, dt), nan_buf(ws, dt)
    assert be.conv2d_bwd_data(dy, w, xs, stride, pad, out=dx) is dx
    assert rel_err(dx, dx_ref) < TOL[dt]
    assert be.conv2d_bwd_weight(x, dy, ws, stride, pad, out=dw) is dw
    assert rel_err(dw, dw_ref) < TOL[dt]


def test_conv2d_no_bias_and_allocating(be, dt):
    rng = np.random.default_rng(4)
    x, w = randn(rng, (2, 3, 6, 5), dt), randn(rng, (4, 3, 3, 2), dt)
    dy = randn(rng, (2, 4, 6, 6), dt)
    y_ref, dx_ref, dw_ref = conv_ref(x, w, None, dy, (1, 1), (1, 1))
    y = be.conv2d_fwd(x, w, None, (1, 1), (1, 1))
    assert y.dtype == np.dtype(dt) and rel_err(y, y_ref) < TOL[dt]
    assert rel_err(be.conv2d_bwd_data(dy, w, x.shape, (1, 1), (1, 1)), dx_ref) < TOL[dt]
    assert rel_err(be.conv2d_bwd_weight(x, dy, w.shape, (1, 1), (1, 1)), dw_ref) < TOL[dt]


@pytest.mark.parametrize("channels", [3, 8])
def test_conv2d_batch_chunks(be, dt, monkeypatch, channels):
    """A batch whose im2col matrix passes the budget runs in chunks; dW sums over them."""
    monkeypatch.setattr(cpu_conv, "COL_BUDGET_BYTES", 2 * 9 * channels * 16 * np.dtype(dt).itemsize)  # 2 images
    rng = np.random.default_rng(5)
    x, w, b = randn(rng, (5, channels, 6, 6), dt), randn(rng, (2, channels, 3, 3), dt), randn(rng, (2,), dt)
    dy = randn(rng, (5, 2, 4, 4), dt)
    y_ref, dx_ref, dw_ref = conv_ref(x, w, b, dy, (1, 1), (0, 0))
    y, dx, dw = nan_buf(dy.shape, dt), nan_buf(x.shape, dt), nan_buf(w.shape, dt)
    assert rel_err(be.conv2d_fwd(x, w, b, (1, 1), (0, 0), out=y), y_ref) < TOL[dt]
    assert rel_err(be.conv2d_bwd_data(dy, w, x.shape, (1, 1), (0, 0), out=dx), dx_ref) < TOL[dt]
    assert rel_err(be.conv2d_bwd_weight(x, dy, w.shape, (1, 1), (0, 0), out=dw), dw_ref) < TOL[dt]


@pytest.mark.parametrize("channels", [3, 8])
def test_conv2d_same_bits_on_any_core_count(be, dt, monkeypatch, channels):
    """Convolution chunks run on helper threads, taken in whatever order the threads come free;
    one thread or three must give the same bits (the weight gradient sums chunks in order)."""
    monkeypatch.setattr(cpu_conv, "MIN_CHUNKS", 5)
    rng = np.random.default_rng(21)
    x, w, b = randn(rng, (7, channels, 6, 5), dt), randn(rng, (4, channels, 3, 3), dt), randn(rng, (4,), dt)
    dy = randn(rng, (7, 4, 6, 5), dt)

    def run() -> list[np.ndarray]:
        return [be.conv2d_fwd(x, w, b, (1, 1), (1, 1), activation="relu"),
                be.conv2d_bwd_data(dy, w, x.shape, (1, 1), (1, 1)),
                be.conv2d_bwd_weight(x, dy, w.shape, (1, 1), (1, 1))]

    monkeypatch.setattr(cpu_loops, "_WORKERS", 1)
    one = run()
    _, _, dw_ref = conv_ref(x, w, b, dy, (1, 1), (1, 1))
    assert rel_err(one[2], dw_ref) < TOL[dt]
    monkeypatch.setattr(cpu_loops, "_WORKERS", 3)
    for _ in range(3):
        for a, c in zip(one, run(), strict=True):
            assert np.array_equal(a, c)


def test_run_tasks_raises_and_restores_blas_threads(monkeypatch):
    """A failing chunk surfaces as its error, after every thread has stopped, and OpenBLAS gets its
    thread count back (run_tasks limits it to one meanwhile)."""
    fns = cpu_loops.blas_thread_functions()
    before = fns[0]() if fns else None
    monkeypatch.setattr(cpu_loops, "_WORKERS", 3)
    done: list[int] = []

    def task(worker: int, i: int) -> None:
        if fns:
            assert fns[0]() == 1
        if i == 4:
            raise RuntimeError("chunk 4")
        done.append(i)

    with pytest.raises(RuntimeError, match="chunk 4"):
        cpu_loops.run_tasks(task, 9)
    assert sorted(done) == [0, 1, 2, 3, 5, 6, 7, 8]
    if fns:
        assert fns[0]() == before


def test_conv2d_bwd_weight_sees_rewritten_input(be, dt):
    """conv2d_bwd_weight depends on its arguments alone: x rewritten in place after the forward
    (as a reused activation buffer is) gives the gradient of the new values."""
    rng = np.random.default_rng(6)
    x, w = randn(rng, (2, 2, 5, 5), dt), randn(rng, (3, 2, 3, 3), dt)
    dy = randn(rng, (2, 3, 3, 3), dt)
    be.conv2d_fwd(x, w, None, (1, 1), (0, 0))
    x[0, 1, 2, 2] += 1.0
    x[1] *= -1
    _, _, dw_ref = conv_ref(x, w, None, dy, (1, 1), (0, 0))
    assert rel_err(be.conv2d_bwd_weight(x, dy, w.shape, (1, 1), (0, 0)), dw_ref) < TOL[dt]


def test_conv2d_deterministic(be, dt):
    rng = np.random.default_rng(7)
    x, w = randn(rng, (4, 3, 9, 9), dt), randn(rng, (5, 3, 3, 3), dt)
    dy = randn(rng, (4, 5, 5, 5), dt)
    a = be.conv2d_bwd_weight(x, dy, w.shape, (2, 2), (1, 1))
    b = be.conv2d_bwd_weight(x, dy, w.shape, (2, 2), (1, 1))
    c, d = (be.conv2d_bwd_data(dy, w, x.shape, (2, 2), (1, 1)) for _ in range(2))
    assert np.array_equal(a, b) and np.array_equal(c, d)


def test_conv2d_errors(be, dt):
    x, w = np.zeros((2, 3, 8, 8), dt), np.zeros((4, 2, 3, 3), dt)
    with pytest.raises(ShapeError, match=r"conv2d_fwd: x \(2, 3, 8, 8\) and w \(4, 2, 3, 3\)"):
        be.conv2d_fwd(x, w, None, (1, 1), (0, 0))
    w = np.zeros((4, 3, 3, 3), dt)
    with pytest.raises(ShapeError, match="conv2d_fwd: x must be 4-D"):
        be.conv2d_fwd(np.zeros((3, 8, 8), dt), w, None, (1, 1), (0, 0))
    with pytest.raises(ShapeError, match="conv2d_fwd: bias"):
        be.conv2d_fwd(x, w, np.zeros(5, dt), (1, 1), (0, 0))
    with pytest.raises(ShapeError, match="conv2d_fwd: .*smaller than"):
        be.conv2d_fwd(np.zeros((2, 3, 2, 8), dt), w, None, (1, 1), (0, 0))
    with pytest.raises(ShapeError, match="conv2d_fwd: stride"):
        be.conv2d_fwd(x, w, None, (0, 1), (0, 0))
    with pytest.raises(ShapeError, match=r"conv2d_bwd_data: dy has shape \(2, 4, 5, 5\), expected \(2, 4, 6, 6\)"):
        be.conv2d_bwd_data(np.zeros((2, 4, 5, 5), dt), w, x.shape, (1, 1), (0, 0))
    with pytest.raises(ShapeError, match="conv2d_bwd_weight: out buffer"):
        be.conv2d_bwd_weight(x, np.zeros((2, 4, 6, 6), dt), w.shape, (1, 1), (0, 0), out=np.zeros((4, 3, 3), dt))
    with pytest.raises(ShapeError, match="conv2d_fwd: out buffer .* C-contiguous"):
        be.conv2d_fwd(x, w, None, (1, 1), (0, 0), out=np.zeros((2, 4, 6, 12), dt)[..., ::2])


# --------------------------------------------------------------------------- pooling

POOL_CASES = [
    # x shape, kernel, stride, padding
    ((2, 3, 8, 6), (2, 2), (2, 2), (0, 0)),
    ((1, 2, 7, 9), (2, 2), (2, 2), (0, 0)),
    ((3, 2, 9, 7), (3, 3), (2, 2), (1, 1)),
    ((2, 1, 6, 8), (3, 2), (1, 2), (1, 0)),
    ((1, 3, 5, 6), (2, 2), (1, 1), (0, 0)),
    ((2, 2, 10, 11), (3, 3), (3, 3), (0, 0)),
    ((1, 2, 4, 5), (1, 1), (1, 1), (0, 0)),
    ((2, 2, 9, 9), (5, 4), (2, 3), (2, 2)),
    ((2, 2, 7, 11), (2, 3), (2, 3), (0, 0)),  # tiled, uneven: rows and columns no window covers
]


@pytest.mark.parametrize("case", POOL_CASES)
def test_maxpool2d(be, dt, case):
    xs, kernel, stride, pad = case
    rng = np.random.default_rng(8)
    x = rng.permutation(np.prod(xs)).reshape(xs).astype(dt) - 7.5  # distinct values: no ties
    y_shape = out_shape(xs, xs[1], kernel, stride, pad)
    dy = randn(rng, y_shape, dt)
    y_ref, am_ref, dx_ref = maxpool_ref(x, dy, kernel, stride, pad)
    y, am = nan_buf(y_shape, dt), np.full(y_shape, -7, np.int32)
    got_y, got_am = be.maxpool2d_fwd(x, kernel, stride, pad, out=y, argmax=am)
    assert got_y is y and got_am is am
    assert np.array_equal(y, y_ref) and np.array_equal(am, am_ref)
    dx = nan_buf(xs, dt)
    assert be.maxpool2d_bwd(dy, am, xs, kernel, stride, pad, out=dx) is dx
    assert rel_err(dx, dx_ref) < TOL[dt]


@pytest.mark.parametrize("case", [((1, 1, 4, 4), (2, 2), (2, 2), (0, 0)), ((1, 1, 5, 5), (3, 3), (1, 1), (1, 1))])
def test_maxpool2d_ties_go_to_the_first(be, dt, case):
    xs, kernel, stride, pad = case
    x = np.zeros(xs, dt)  # every window is one big tie
    y, am = be.maxpool2d_fwd(x, kernel, stride, pad)
    _, am_ref, _ = maxpool_ref(x, np.zeros(y.shape), kernel, stride, pad)
    assert np.array_equal(am, am_ref)
    x[0, 0, 1, 0] = x[0, 0, 1, 1] = 2.0  # two equal maxima in the top-left window: (1, 0) wins
    y, am = be.maxpool2d_fwd(x, kernel, stride, pad)
    assert am[0, 0, 0, 0] == 1 * xs[3] + 0 and y[0, 0, 0, 0] == 2.0
    dy = np.zeros(y.shape, dt)
    dy[0, 0, 0, 0] = 1.0
    dx = be.maxpool2d_bwd(dy, am, xs, kernel, stride, pad)
    assert dx[0, 0, 1, 0] == 1.0 and dx.sum() == 1.0


def test_maxpool2d_padding_never_wins_and_nan_propagates(be, dt):
    x = -np.ones((1, 1, 4, 4), dt) * np.arange(1, 17, dtype=dt).reshape(1, 1, 4, 4)
    y, am = be.maxpool2d_fwd(x, (3, 3), (2, 2), (1, 1))
    assert (y < 0).all() and (am >= 0).all()
    for kernel, stride in (((2, 2), (2, 2)), ((3, 3), (1, 1))):
        x = np.ones((1, 1, 4, 4), dt)
        x[0, 0, 1, 1] = np.nan
        y, am = be.maxpool2d_fwd(x, kernel, stride, (0, 0))
        assert np.isnan(y[0, 0, 0, 0]) and am[0, 0, 0, 0] == 5


@pytest.mark.parametrize("case", POOL_CASES)
def test_avgpool2d(be, dt, case):
    xs, kernel, stride, pad = case
    rng = np.random.default_rng(9)
    x = randn(rng, xs, dt)
    y_shape = out_shape(xs, xs[1], kernel, stride, pad)
    dy = randn(rng, y_shape, dt)
    y_ref, dx_ref = avgpool_ref(x, dy, kernel, stride, pad)
    y, dx = nan_buf(y_shape, dt), nan_buf(xs, dt)
    assert be.avgpool2d_fwd(x, kernel, stride, pad, out=y) is y
    assert rel_err(y, y_ref) < TOL[dt]
    assert be.avgpool2d_bwd(dy, xs, kernel, stride, pad, out=dx) is dx
    assert rel_err(dx, dx_ref) < TOL[dt]


def test_maxpool2d_2x2_loop_gives_the_general_loops_bits(dt):
    """The two-pass 2x2 loop against the general loop on windows full of ties, -0.0 and NaNs."""
    from gpuml.backend.cpu import pool as cpu_pool

    rng = np.random.default_rng(23)
    for trial in range(60):
        x = rng.integers(-1, 2, (3, 4 + trial % 3, 6 + trial % 2)).astype(dt)
        x[rng.random(x.shape) < 0.3] = -0.0
        if trial % 2:
            x[rng.random(x.shape) < 0.15] = np.nan
        shape = (3, x.shape[1] // 2, x.shape[2] // 2)
        y2, a2 = np.empty(shape, dt), np.empty(shape, np.int32)
        y, a = np.empty(shape, dt), np.empty(shape, np.int32)
        cpu_pool.maxpool_fwd_2x2(x, y2, a2)
        cpu_pool.maxpool_fwd(x, 2, 2, 2, 2, 0, 0, y, a)
        assert np.array_equal(a2, a) and y2.tobytes() == y.tobytes(), trial


def test_avgpool2d_tiled_loops_give_the_general_loops_bits(dt):
    """Non-overlapping windows take avgpool_*_tiled; the general gather loops must agree bit for bit."""
    from gpuml.backend.cpu import pool as cpu_pool

    rng = np.random.default_rng(22)
    x = randn(rng, (6, 7, 11), dt)
    y_t, y_g = np.empty((6, 3, 3), dt), np.empty((6, 3, 3), dt)
    cpu_pool.avgpool_fwd_tiled(x, 2, 3, y_t)
    cpu_pool.avgpool_fwd(x, 2, 3, 2, 3, 0, 0, y_g)
    assert np.array_equal(y_t, y_g)
    dx_t, dx_g = nan_buf(x.shape, dt), nan_buf(x.shape, dt)
    cpu_pool.avgpool_bwd_tiled(y_t, 2, 3, dx_t)
    cpu_pool.avgpool_bwd(y_t, 2, 3, 2, 3, 0, 0, dx_g)
    assert np.array_equal(dx_t, dx_g)


def test_pool_errors(be, dt):
    x = np.zeros((2, 3, 8, 8), dt)
    with pytest.raises(ShapeError, match="maxpool2d_fwd: x must be 4-D"):
        be.maxpool2d_fwd(x[0], (2, 2), (2, 2), (0, 0))
    with pytest.raises(ShapeError, match="maxpool2d_fwd: padding .* half the kernel"):
        be.maxpool2d_fwd(x, (2, 2), (2, 2), (2, 0))
    with pytest.raises(ShapeError, match="avgpool2d_fwd: .*smaller than the kernel"):
        be.avgpool2d_fwd(x, (9, 2), (1, 1), (0, 0))
    with pytest.raises(ShapeError, match="maxpool2d_fwd: argmax buffer .* int32"):
        be.maxpool2d_fwd(x, (2, 2), (2, 2), (0, 0), argmax=np.zeros((2, 3, 4, 4), np.int64))
    with pytest.raises(ShapeError, match=r"maxpool2d_bwd: dy has shape \(2, 3, 3, 3\)"):
        be.maxpool2d_bwd(np.zeros((2, 3, 3, 3), dt), np.zeros((2, 3, 4, 4), np.int32), x.shape, (2, 2), (2, 2), (0, 0))
    with pytest.raises(ShapeError, match="avgpool2d_bwd: x_shape"):
        be.avgpool2d_bwd(np.zeros((2, 3, 4, 4), dt), (3, 8, 8), (2, 2), (2, 2), (0, 0))


# --------------------------------------------------------------------------- losses


def xent_ref(logits, labels, eps):
    B, K = logits.shape
    loss, grad = 0.0, np.zeros((B, K))
    for i in range(B):
        z = logits[i].astype(np.float64)
        logp = z - z.max() - math.log(sum(math.exp(v - z.max()) for v in z))
        t = np.full(K, eps / K)
        t[labels[i]] += 1 - eps
        loss -= float(t @ logp) / B
        grad[i] = (np.exp(logp) - t) / B
    return loss, grad


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("bk", [(1, 2), (7, 10), (33, 5), (5, 300), (3, 1001)])  # the last two: wide path
def test_softmax_xent(be, dt, eps, bk):
    rng = np.random.default_rng(10)
    logits = randn(rng, bk, dt) * 3
    labels = rng.integers(0, bk[1], bk[0]).astype(np.int32)
    loss_ref, grad_ref = xent_ref(logits, labels, eps)
    loss, grad = nan_buf((), dt), nan_buf(bk, dt)
    got_loss, got_grad = be.softmax_xent(logits, labels, label_smoothing=eps, loss=loss, dlogits=grad)
    assert got_loss is loss and got_grad is grad and loss.shape == () and loss.dtype == np.dtype(dt)
    assert abs(float(loss) - loss_ref) <= TOL[dt] * abs(loss_ref)
    assert rel_err(grad, grad_ref) < TOL[dt]
    fresh_loss, _ = be.softmax_xent(logits, labels, label_smoothing=eps)
    assert fresh_loss.shape == () and fresh_loss.dtype == np.dtype(dt)
    in_place = logits.copy()
    _, g = be.softmax_xent(in_place, labels, label_smoothing=eps, dlogits=in_place)
    assert g is in_place and rel_err(in_place, grad_ref) < TOL[dt]


def test_softmax_xent_is_stable(be, dt):
    logits = np.array([[1e4, -1e4, 0.0], [-3e4, -3e4 + 1, -3e4]], dtype=dt)
    labels = np.array([1, 0], np.int32)
    loss, grad = be.softmax_xent(logits, labels)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert abs(float(loss) - (2e4 + (1 + math.log(1 + 2 * math.exp(-1)))) / 2) < 1e-3


def test_softmax_xent_wide_is_stable_and_the_same_in_any_blocks_and_parts(be, dt, monkeypatch):
    """The wide path (NumPy exp on blocks of rows over the helper threads): a row trailing its
    max by 1e4 has softmax 0, not NaN; blocks of one row on 3 threads change no bit."""
    from gpuml.backend.cpu import losses as cpu_losses

    rng = np.random.default_rng(21)
    logits = randn(rng, (6, cpu_losses.WIDE_CLASSES + 3), dt) * 3
    logits[2, 7] = 1e4
    labels = rng.integers(0, logits.shape[1], 6).astype(np.int32)
    labels[2] = 5
    loss_ref, grad_ref = xent_ref(logits, labels, 0.1)
    loss, grad = be.softmax_xent(logits, labels, label_smoothing=0.1)
    assert abs(float(loss) - loss_ref) <= TOL[dt] * abs(loss_ref) and rel_err(grad, grad_ref) < TOL[dt]
    monkeypatch.setattr(cpu_losses, "WIDE_BLOCK", 1)
    monkeypatch.setattr(cpu_loops, "MIN_PART", 5)
    monkeypatch.setattr(cpu_loops, "_WORKERS", 3)
    loss2, grad2 = be.softmax_xent(logits, labels, label_smoothing=0.1)
    assert float(loss2) == float(loss) and np.array_equal(grad2, grad)


def test_softmax_xent_errors(be, dt):
    logits = np.zeros((4, 3), dt)
    with pytest.raises(ShapeError, match=r"softmax_xent: label 3 \(row 2\) is outside \[0, 3\)"):
        be.softmax_xent(logits, np.array([0, 1, 3, 2], np.int32))
    with pytest.raises(ShapeError, match=r"softmax_xent: label -1 \(row 0\)"):
        be.softmax_xent(logits, np.array([-1, 1, 2, 2], np.int32))
    with pytest.raises(ShapeError, match="softmax_xent: labels .* expected int32"):
        be.softmax_xent(logits, np.zeros(4, np.int64))
    with pytest.raises(ShapeError, match=r"softmax_xent: labels has shape \(5,\)"):
        be.softmax_xent(logits, np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="label_smoothing"):
        be.softmax_xent(logits, np.zeros(4, np.int32), label_smoothing=1.0)


def test_mse(be, dt):
    rng = np.random.default_rng(11)
    pred, target = randn(rng, (5, 3), dt), randn(rng, (5, 3), dt)
    diffs = [float(p) - float(t) for p, t in zip(pred.ravel(), target.ravel(), strict=True)]
    loss_ref = sum(d * d for d in diffs) / 15
    grad_ref = np.array([2 * d / 15 for d in diffs]).reshape(5, 3)
    loss, grad = nan_buf((), dt), nan_buf((5, 3), dt)
    assert be.mse(pred, target, loss=loss, dpred=grad) == (loss, grad)
    assert abs(float(loss) - loss_ref) <= TOL[dt] * loss_ref and rel_err(grad, grad_ref) < TOL[dt]
    with pytest.raises(ShapeError, match="mse: target"):
        be.mse(pred, target[:4])


def test_count_correct(be, dt):
    logits = np.array([[0, 2, 2], [5, 1, 0], [0, 0, 1], [3, 3, 3]], dtype=dt)
    labels = np.array([1, 0, 0, 0], np.int32)  # row 0 and row 3 tie: the first max counts
    out = nan_buf((), dt)
    assert be.count_correct(logits, labels, out=out) is out
    assert float(out) == 3.0 and out.dtype == np.dtype(dt)
    assert float(be.count_correct(logits, np.array([2, 1, 2, 2], np.int64))) == 1.0


# --------------------------------------------------------------------------- elementwise

ACT_REF = {
    "relu": (lambda x: max(x, 0.0), lambda y, g: g * (y > 0)),
    "tanh": (math.tanh, lambda y, g: g * (1 - y * y)),
    "sigmoid": (lambda x: 1 / (1 + math.exp(-x)) if x > -700 else 0.0, lambda y, g: g * y * (1 - y)),
}


@pytest.mark.parametrize("kind", list(ACT_REF))
def test_activations(be, dt, kind):
    rng = np.random.default_rng(12)
    x = randn(rng, (3, 4, 5), dt) * 4
    x.flat[:4] = [0.0, -1e3, 1e3, -80.0]
    fwd, bwd = ACT_REF[kind]
    y_ref = np.array([fwd(float(v)) for v in x.ravel()]).reshape(x.shape)
    y = nan_buf(x.shape, dt)
    with np.errstate(all="raise"):
        assert be.activation_fwd(kind, x, out=y) is y
    assert rel_err(y, y_ref) < TOL[dt]
    if kind == "sigmoid":
        assert abs(float(y.flat[3]) - math.exp(-80) / (1 + math.exp(-80))) < 1e-6 * math.exp(-80)
    dy = randn(rng, x.shape, dt)
    dx_ref = np.array([bwd(float(a), float(g)) for a, g in zip(y.ravel(), dy.ravel(), strict=True)])
    dx = nan_buf(x.shape, dt)
    assert be.activation_bwd(kind, y, dy, out=dx) is dx
    assert rel_err(dx, dx_ref.reshape(x.shape)) < TOL[dt]
    assert be.activation_fwd(kind, x, out=x) is x and rel_err(x, y_ref) < TOL[dt]  # out may be x
    assert be.activation_bwd(kind, y, dy, out=dy) is dy and rel_err(dy, dx.astype(np.float64)) == 0


def test_activation_errors(be, dt):
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        be.activation_fwd("gelu", np.zeros(3, dt))
    with pytest.raises(ShapeError, match=r"activation_bwd: dy has shape \(4,\), expected \(3,\)"):
        be.activation_bwd("relu", np.zeros(3, dt), np.zeros(4, dt))


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5])
def test_dropout(be, dt, p):
    rng = np.random.default_rng(13)
    x = randn(rng, (64, 33), dt)
    out, mask = nan_buf(x.shape, dt), np.full(x.shape, 7, np.uint8)
    got_out, got_mask = be.dropout_fwd(x, p, seed=1234, offset=99, out=out, mask=mask)
    assert got_out is out and got_mask is mask
    assert np.array_equal(mask.ravel(), keep_mask(1234, 99, x.size, p))
    scale = 1 / (1 - p)
    assert rel_err(out, x.astype(np.float64) * mask * scale) < TOL[dt]
    same_out, same_mask = be.dropout_fwd(x, p, seed=1234, offset=99)
    assert np.array_equal(same_mask, mask) and np.array_equal(same_out, out)
    if p == 0:
        assert mask.all() and np.array_equal(out, x)
    else:
        assert not np.array_equal(be.dropout_fwd(x, p, seed=1234, offset=99 + x.size)[1], mask)
        assert not np.array_equal(be.dropout_fwd(x, p, seed=1235, offset=99)[1], mask)
    dy = randn(rng, x.shape, dt)
    dx = nan_buf(x.shape, dt)
    assert be.dropout_bwd(dy, mask, p, out=dx) is dx
    assert rel_err(dx, dy.astype(np.float64) * mask * scale) < TOL[dt]


def test_dropout_keep_rate(be, dt):
    x = np.ones(200_000, dt)
    for p in (0.1, 0.5, 0.9):
        out, mask = be.dropout_fwd(x, p, seed=7, offset=2**40)
        assert abs(mask.mean() - (1 - p)) < 0.005
        assert np.allclose(out[mask == 1], 1 / (1 - p)) and (out[mask == 0] == 0).all()
    big_seed = 2**64 + 5  # seeds wrap mod 2**64, as in gpuml.backend.rng
    assert np.array_equal(be.dropout_fwd(x[:999], 0.3, seed=big_seed, offset=3)[1].ravel(), keep_mask(5, 3, 999, 0.3))
    with pytest.raises(ValueError, match="p must be in"):
        be.dropout_fwd(x, 1.0, seed=1, offset=0)


def test_ops_split_into_parts_are_bit_identical(be, dt, monkeypatch):
    """Large pooling and elementwise calls run in row ranges on helper threads; forcing 3 parts on
    small inputs must change nothing, bit for bit."""
    rng = np.random.default_rng(20)
    x, dy_act, dst = randn(rng, (3, 2, 8, 7), dt), randn(rng, (3, 2, 8, 7), dt), randn(rng, (3, 2, 8, 7), dt)

    def run() -> list[np.ndarray]:
        outs = []
        for kernel, stride, pad in (((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 1), (1, 1)), ((2, 3), (2, 3), (0, 0))):
            y, am = be.maxpool2d_fwd(x, kernel, stride, pad)
            g = np.linspace(-1, 1, y.size, dtype=dt).reshape(y.shape)
            outs += [y, am, be.maxpool2d_bwd(g, am, x.shape, kernel, stride, pad)]
            outs += [be.avgpool2d_fwd(x, kernel, stride, pad), be.avgpool2d_bwd(g, x.shape, kernel, stride, pad)]
        for kind in ("relu", "tanh", "sigmoid"):
            y = be.activation_fwd(kind, x)
            outs += [y, be.activation_bwd(kind, y, dy_act)]
        _, mask = be.dropout_fwd(x, 0.3, seed=1, offset=0)
        outs.append(be.dropout_bwd(dy_act, mask, 0.3))
        outs.append(be.add_(dst.copy(), x, alpha=0.7))
        outs.append(be.bias_grad(x))
        return outs

    whole = run()
    monkeypatch.setattr(cpu_loops, "MIN_PART", 5)
    monkeypatch.setattr(cpu_loops, "_WORKERS", 3)
    for a, b in zip(whole, run(), strict=True):
        assert np.array_equal(a, b)


def test_add_and_scale(be, dt):
    rng = np.random.default_rng(14)
    dst, src = randn(rng, (4, 5), dt), randn(rng, (4, 5), dt)
    ref = dst.astype(np.float64) + 0.3 * src.astype(np.float64)
    assert be.add_(dst, src, alpha=0.3) is dst and rel_err(dst, ref) < TOL[dt]
    assert be.scale_(dst, 2.5) is dst and rel_err(dst, ref * 2.5) < TOL[dt]
    assert be.scale_(dst, np.array(0.5, dtype=dt)) is dst and rel_err(dst, ref * 1.25) < TOL[dt]
    acc = np.zeros(3, dt)
    be.add_(acc[1:2], np.array(4.0, dt).reshape(1), alpha=2.0)
    assert acc.tolist() == [0, 8, 0]
    with pytest.raises(ShapeError, match="add_: dst .* C-contiguous"):
        be.add_(np.zeros((4, 6), dt)[:, ::2], np.zeros((4, 3), dt))
    with pytest.raises(ShapeError, match="add_: src"):
        be.add_(np.zeros(3, dt), np.zeros(4, dt))


# --------------------------------------------------------------------------- optimizers


def _params(dt, rng, shapes=((7, 3), (5,), (2, 3, 2, 2))):
    return [randn(rng, s, dt) for s in shapes]


def _run(be, dt, method, n_state, ref_update, **hyper):
    """Three steps of `method` against ref_update(p, g, states, step) on float64 copies."""
    rng = np.random.default_rng(15)
    params = _params(dt, rng)
    states = [[np.zeros_like(p) for p in params] for _ in range(n_state)]
    ref_p = [p.astype(np.float64) for p in params]
    ref_s = [[np.zeros(p.shape) for p in params] for _ in range(n_state)]
    for step in range(1, 4):
        grads = [randn(rng, p.shape, dt) for p in params]
        getattr(be, method)(params, grads, *states, **hyper, **({"step": step} if method == "adam_step" else {}))
        for i, g in enumerate(grads):
            ref_update(ref_p[i], g.astype(np.float64), [s[i] for s in ref_s], step)
        for got, ref in zip(params, ref_p, strict=True):
            assert rel_err(got, ref) < 10 * TOL[dt]


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_sgd(be, dt, wd):
    def ref(p, g, _s, _t):
        p -= 0.1 * (g + wd * p)

    _run(be, dt, "sgd_step", 0, ref, lr=0.1, weight_decay=wd)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_momentum(be, dt, nesterov, wd):
    def ref(p, g, s, _t):
        (v,) = s
        g = g + wd * p
        v[...] = 0.9 * v + g
        p -= 0.1 * (g + 0.9 * v if nesterov else v)

    _run(be, dt, "momentum_step", 1, ref, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=wd)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_adam(be, dt, decoupled, wd):
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8

    def ref(p, g, s, t):
        m, v = s
        if decoupled:
            p *= 1 - lr * wd
        else:
            g = g + wd * p
        m[...] = b1 * m + (1 - b1) * g
        v[...] = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p -= lr * m_hat / (np.sqrt(v_hat) + eps)

    _run(be, dt, "adam_step", 2, ref, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, decoupled=decoupled)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_rmsprop(be, dt, wd):
    def ref(p, g, s, _t):
        (sq,) = s
        g = g + wd * p
        sq[...] = 0.99 * sq + 0.01 * g * g
        p -= 0.01 * g / (np.sqrt(sq) + 1e-8)

    _run(be, dt, "rmsprop_step", 1, ref, lr=0.01, alpha=0.99, eps=1e-8, weight_decay=wd)


@pytest.mark.parametrize("method", ["sgd_step", "momentum_step", "adam_step", "rmsprop_step"])
def test_optimizer_split_into_parts_is_bit_identical(be, dt, method, monkeypatch):
    """Large tensors are updated in parts on helper threads; forcing 3 parts on small ones must
    change nothing, bit for bit."""
    hyper = {
        "sgd_step": {"lr": 0.1, "weight_decay": 0.01},
        "momentum_step": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        "adam_step": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "step": 2, "weight_decay": 0.1},
        "rmsprop_step": {"lr": 0.01, "alpha": 0.9, "eps": 1e-8, "weight_decay": 0.01},
    }[method]
    n_state = {"sgd_step": 0, "momentum_step": 1, "adam_step": 2, "rmsprop_step": 1}[method]
    results = []
    for min_part in (1 << 40, 5):
        monkeypatch.setattr(cpu_loops, "MIN_PART", min_part)
        monkeypatch.setattr(cpu_loops, "_WORKERS", 3)
        rng = np.random.default_rng(19)
        params = _params(dt, rng, shapes=((7, 3), (31,), (2,)))
        grads = [randn(rng, p.shape, dt) for p in params]
        states = [[np.abs(randn(rng, p.shape, dt)) for p in params] for _ in range(n_state)]
        getattr(be, method)(params, grads, *states, **hyper)
        results.append([*params, *(s for group in states for s in group)])
    for whole, parts in zip(*results, strict=True):
        assert np.array_equal(whole, parts)


def test_optimizer_errors(be, dt):
    p = [np.zeros((3, 2), dt)]
    with pytest.raises(ShapeError, match=r"sgd_step: grads\[0\] has shape \(2, 3\)"):
        be.sgd_step(p, [np.zeros((2, 3), dt)], lr=0.1)
    with pytest.raises(ShapeError, match="adam_step: 1 params but 0 state"):
        be.adam_step(p, [np.zeros((3, 2), dt)], [np.zeros((3, 2), dt)], [], lr=0.1, beta1=0.9,
                     beta2=0.99, eps=1e-8, step=1)  # fmt: skip
    with pytest.raises(ShapeError, match=r"sgd_step: params\[0\] .* C-contiguous"):
        be.sgd_step([np.zeros((3, 4), dt)[:, ::2]], [np.zeros((3, 2), dt)], lr=0.1)


def test_global_norm(be, dt):
    rng = np.random.default_rng(16)
    arrays = [randn(rng, s, dt) for s in ((3, 4), (7,), (40_001,), (2, 2, 3, 3))]
    ref = math.sqrt(sum(float(v) ** 2 for a in arrays for v in a.ravel()))
    norm = be.global_norm(arrays)
    assert norm.shape == () and norm.dtype == np.dtype(dt)
    assert abs(float(norm) - ref) <= TOL[dt] * ref


# --------------------------------------------------------------------------- data and arrays


def test_gather_batch(be, dt):
    rng = np.random.default_rng(17)
    images = rng.integers(0, 256, (11, 1, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 11).astype(np.int64)
    indices = np.array([10, 0, 3, 3, 7], np.int64)
    out_x, out_y = nan_buf((5, 1, 4, 3), dt), np.full(5, -1, np.int32)
    got_x, got_y = be.gather_batch(images, labels, indices, mean=0.25, std=0.5, out_x=out_x, out_y=out_y)
    assert got_x is out_x and got_y is out_y
    ref = np.array([[(v / 255 - 0.25) / 0.5 for v in images[i].ravel()] for i in indices]).reshape(5, 1, 4, 3)
    assert rel_err(out_x, ref) < TOL[dt] / 10
    assert out_y.tolist() == labels[indices].tolist()
    x, y = be.gather_batch(images, labels, indices.astype(np.int32), mean=0.0, std=1.0)
    assert x.dtype == np.dtype(dt) and y.dtype == np.int32 and x.max() <= 1.0
    with pytest.raises(IndexError, match="index 11 is outside the 11 samples"):
        be.gather_batch(images, labels, np.array([1, 11]), mean=0.0, std=1.0)
    with pytest.raises(ShapeError, match="gather_batch: images .* expected uint8"):
        be.gather_batch(images.astype(np.float32), labels, indices, mean=0.0, std=1.0)


def test_arrays_and_describe(be, dt):
    host = np.arange(6, dtype=np.float64).reshape(2, 3)
    dev = be.asarray(host)
    assert dev.dtype == np.dtype(dt) and dev.flags.c_contiguous
    host[0, 0] = 99
    assert dev[0, 0] == 0  # a copy, as a device transfer is
    assert be.asarray(np.arange(3)).dtype == np.arange(3).dtype
    assert be.asarray([1, 2], dtype=np.int32).dtype == np.int32
    back = be.to_numpy(dev)
    back[0, 1] = -1
    assert dev[0, 1] == 1
    assert be.describe().startswith("cpu (numpy ") and f"threads, {dt})" in be.describe()
    assert be.name == "cpu" and be.xp is np


def test_non_contiguous_inputs(be, dt):
    """Inputs may be strided views (copied on entry); results match the contiguous ones."""
    rng = np.random.default_rng(18)
    big = randn(rng, (2, 3, 9, 16), dt)
    x = big[..., ::2]
    w = randn(rng, (3, 4, 3, 3), dt).transpose(1, 0, 2, 3)
    xc, wc = np.ascontiguousarray(x), np.ascontiguousarray(w)
    assert np.array_equal(be.conv2d_fwd(x, w, None, (1, 1), (1, 1)), be.conv2d_fwd(xc, wc, None, (1, 1), (1, 1)))
    pooled = [be.maxpool2d_fwd(v, (2, 2), (2, 2), (0, 0))[1] for v in (x, xc)]
    assert np.array_equal(*pooled)
    a = randn(rng, (6, 5), dt)
    assert np.array_equal(be.matmul(a.T, a), be.matmul(np.ascontiguousarray(a.T), a))
