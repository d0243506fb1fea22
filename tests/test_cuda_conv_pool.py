"""CUDA conv2d and pooling kernels against the float64 CPU backend (marker gpu; skipped cleanly
without CuPy or a GPU).

Inputs are drawn in float32 and handed to the reference as the same values in float64, so the
only error is the kernels' own rounding. Error bound: every output is a sum of L products (or
window terms) accumulated in the kernel's dtype, in whatever order, so
|out - ref| <= gamma_L * (|a| . |b|) elementwise, gamma_L = L u / (1 - L u), u = 2^-24
[Higham, Accuracy and Stability of Numerical Algorithms, sec. 3.1]. Taking norms, the tests assert
||out - ref|| <= gamma_L ||ref_abs||, ref_abs being the same op run on |inputs|; reported as
relative error against ||ref||. L is C*R*S (+1 for the bias) forward, K*R*S for bwd_data,
N*P*Q for bwd_weight (the split-K partials and their fixed-order reduce are one such order).
An indexing bug gives an O(1) relative error, far above bounds of 1e-7 .. 1e-3.
Every output buffer is NaN-poisoned before the launch, so an element a kernel skips shows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gpuml.backend import get_backend
from gpuml.backend.cpu import CpuBackend
from gpuml.errors import ShapeError

cupy = pytest.importorskip("cupy")
try:
    _GPUS = cupy.cuda.runtime.getDeviceCount()
except Exception:  # a CuPy without a usable driver raises here
    _GPUS = 0
if _GPUS < 1:
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

pytestmark = pytest.mark.gpu

U32 = 2.0**-24  # float32 unit roundoff

# (x shape, w shape, stride, padding)
CONV_CASES = [
    ((1, 1, 5, 5), (1, 1, 1, 1), (1, 1), (0, 0)),
    ((1, 3, 7, 7), (4, 3, 3, 3), (1, 1), (1, 1)),
    ((3, 1, 9, 11), (5, 1, 5, 5), (2, 2), (2, 2)),
    ((5, 3, 13, 9), (7, 3, 3, 5), (2, 1), (1, 2)),
    ((7, 3, 8, 15), (6, 3, 5, 3), (1, 2), (0, 1)),
    ((1, 66, 9, 7), (70, 66, 3, 3), (2, 2), (1, 1)),  # two channel tiles in fwd and bwd_data
    ((3, 5, 31, 33), (9, 5, 1, 1), (2, 2), (0, 0)),  # 1x1 stride 2: dx is 0 on every hole
    ((2, 4, 6, 6), (3, 4, 4, 4), (3, 3), (2, 2)),  # even kernel, stride 3
    ((9, 1, 28, 28), (32, 1, 3, 3), (1, 1), (0, 0)),  # seed CNN conv1 geometry (split bwd_w)
    ((11, 32, 13, 13), (64, 32, 3, 3), (1, 1), (0, 0)),  # seed CNN conv2 geometry
    ((2, 64, 56, 56), (64, 64, 3, 3), (1, 1), (1, 1)),  # ResNet stage geometry
]


def _random_conv_cases(count: int, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        R, S = (int(v) for v in rng.choice([1, 2, 3, 5], 2))
        sh, sw = (int(v) for v in rng.integers(1, 3, 2))
        ph, pw = (int(v) for v in rng.integers(0, 3, 2))
        H, W = (int(v) for v in rng.integers(3, 21, 2))
        if H + 2 * ph < R or W + 2 * pw < S:
            continue
        N, C, K = int(rng.choice([1, 2, 3, 5])), int(rng.choice([1, 3, 4, 17])), int(rng.choice([1, 3, 8, 33, 65]))
        cases.append(((N, C, H, W), (K, C, R, S), (sh, sw), (ph, pw)))
    return cases


CONV_CASES += _random_conv_cases(10, seed=2024)

# (x shape, kernel, stride, padding)
POOL_CASES = [
    ((1, 1, 5, 5), (2, 2), (2, 2), (0, 0)),
    ((3, 3, 7, 9), (3, 3), (2, 2), (1, 1)),
    ((2, 1, 11, 8), (3, 2), (2, 1), (1, 1)),
    ((5, 3, 6, 6), (5, 5), (2, 3), (2, 2)),
    ((1, 2, 13, 13), (2, 2), (2, 2), (1, 0)),
    ((2, 2, 9, 9), (1, 1), (2, 2), (0, 0)),
    ((4, 3, 17, 15), (3, 3), (1, 1), (1, 1)),  # overlapping windows
    ((7, 32, 26, 26), (2, 2), (2, 2), (0, 0)),  # seed CNN pool1 geometry
]


@pytest.fixture(scope="module")
def gpu():
    return get_backend("cuda", dtype="float32")


@pytest.fixture(scope="module")
def ref() -> CpuBackend:
    return CpuBackend(dtype="float64")


def _gamma(terms: int) -> float:
    nu = terms * U32
    return nu / (1.0 - nu)


def _draw(rng: np.random.Generator, shape: tuple, dtype: type = np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _poisoned(shape: tuple, dtype: type = np.float32):
    return cupy.full(shape, np.nan, dtype=dtype)


def _assert_within(got: Any, want: np.ndarray, want_abs: np.ndarray, terms: int) -> None:
    got = (cupy.asnumpy(got) if isinstance(got, cupy.ndarray) else got).astype(np.float64)
    assert got.shape == want.shape
    assert np.isfinite(got).all(), "an output element was not written (NaN poison survived)"
    err, scale, bound = np.linalg.norm(got - want), np.linalg.norm(want), _gamma(terms)
    assert err <= bound * np.linalg.norm(want_abs), (
        f"relative error {err / scale:.2e} > bound {bound * np.linalg.norm(want_abs) / scale:.2e}"
    )


def _y_shape(case: tuple) -> tuple[int, int, int, int]:
    (N, _, H, W), (K, _, R, S), (sh, sw), (ph, pw) = case
    return (N, K, (H + 2 * ph - R) // sh + 1, (W + 2 * pw - S) // sw + 1)


def _conv_id(case: tuple) -> str:
    x, w, s, p = case
    return f"x{'x'.join(map(str, x))}-w{'x'.join(map(str, w))}-s{s[0]}{s[1]}-p{p[0]}{p[1]}"


# ------------------------------------------------------------------------------------ conv2d


@pytest.mark.parametrize("bias, activation", [(False, None), (True, None), (True, "relu")])
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv2d_fwd_matches_cpu(gpu, ref, case: tuple, bias: bool, activation: str | None) -> None:
    x_shape, w_shape, stride, padding = case
    rng = np.random.default_rng(1)
    x, w, b = _draw(rng, x_shape), _draw(rng, w_shape), _draw(rng, (w_shape[0],))
    b_dev = gpu.asarray(b) if bias else None
    out = gpu.conv2d_fwd(gpu.asarray(x), gpu.asarray(w), b_dev, stride, padding, activation=activation,
                         out=_poisoned(_y_shape(case)))
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    want = ref.conv2d_fwd(x64, w64, b64 if bias else None, stride, padding, activation=activation)
    want_abs = ref.conv2d_fwd(np.abs(x64), np.abs(w64), np.abs(b64) if bias else None, stride, padding)
    _assert_within(out, want, want_abs, int(np.prod(w_shape[1:])) + 1)


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv2d_bwd_data_matches_cpu(gpu, ref, case: tuple) -> None:
    x_shape, w_shape, stride, padding = case
    rng = np.random.default_rng(2)
    w, dy = _draw(rng, w_shape), _draw(rng, _y_shape(case))
    dx = gpu.conv2d_bwd_data(gpu.asarray(dy), gpu.asarray(w), x_shape, stride, padding, out=_poisoned(x_shape))
    w64, dy64 = w.astype(np.float64), dy.astype(np.float64)
    want = ref.conv2d_bwd_data(dy64, w64, x_shape, stride, padding)
    want_abs = ref.conv2d_bwd_data(np.abs(dy64), np.abs(w64), x_shape, stride, padding)
    _assert_within(dx, want, want_abs, w_shape[0] * w_shape[2] * w_shape[3])


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
def test_conv2d_bwd_weight_matches_cpu(gpu, ref, case: tuple) -> None:
    x_shape, w_shape, stride, padding = case
    rng = np.random.default_rng(3)
    x, dy = _draw(rng, x_shape), _draw(rng, _y_shape(case))
    dw = gpu.conv2d_bwd_weight(gpu.asarray(x), gpu.asarray(dy), w_shape, stride, padding, out=_poisoned(w_shape))
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    want = ref.conv2d_bwd_weight(x64, dy64, w_shape, stride, padding)
    want_abs = ref.conv2d_bwd_weight(np.abs(x64), np.abs(dy64), w_shape, stride, padding)
    _assert_within(dw, want, want_abs, int(np.prod(_y_shape(case))) // w_shape[0])


@pytest.mark.parametrize(
    "case",
    [pytest.param(((256, 32, 13, 13), (64, 32, 3, 3), (1, 1), (0, 0)),  # 29 splits + reduce
                  marks=pytest.mark.emulator_slow),
     pytest.param(((256, 1, 28, 28), (32, 1, 3, 3), (1, 1), (0, 0)),  # 492 splits + reduce
                  marks=pytest.mark.emulator_slow),
     ((3, 3, 7, 7), (4, 3, 3, 3), (1, 1), (1, 1))],  # a single split
    ids=_conv_id,
)
def test_conv2d_is_bitwise_deterministic(gpu, ref, case: tuple) -> None:
    x_shape, w_shape, stride, padding = case
    rng = np.random.default_rng(4)
    x, w, dy = (gpu.asarray(_draw(rng, s)) for s in (x_shape, w_shape, _y_shape(case)))
    runs = []
    for _ in range(2):
        dw = gpu.conv2d_bwd_weight(x, dy, w_shape, stride, padding, out=_poisoned(w_shape))
        y = gpu.conv2d_fwd(x, w, None, stride, padding, out=_poisoned(_y_shape(case)))
        dx = gpu.conv2d_bwd_data(dy, w, x_shape, stride, padding, out=_poisoned(x_shape))
        runs.append([cupy.asnumpy(a).view(np.uint32) for a in (dw, y, dx)])
    for first, second in zip(*runs, strict=True):
        np.testing.assert_array_equal(first, second)
    x64, dy64 = (cupy.asnumpy(a).astype(np.float64) for a in (x, dy))
    _assert_within(runs[0][0].view(np.float32), ref.conv2d_bwd_weight(x64, dy64, w_shape, stride, padding),
                   ref.conv2d_bwd_weight(np.abs(x64), np.abs(dy64), w_shape, stride, padding),
                   int(np.prod(_y_shape(case))) // w_shape[0])


def test_conv2d_allocates_when_out_is_none_and_returns_out_when_given(gpu) -> None:
    rng = np.random.default_rng(5)
    x, w = gpu.asarray(_draw(rng, (2, 3, 8, 8))), gpu.asarray(_draw(rng, (4, 3, 3, 3)))
    y = gpu.conv2d_fwd(x, w, None, (1, 1), (1, 1))
    assert isinstance(y, cupy.ndarray) and y.shape == (2, 4, 8, 8) and y.dtype == np.float32
    buf = _poisoned((2, 4, 8, 8))
    assert gpu.conv2d_fwd(x, w, None, (1, 1), (1, 1), out=buf) is buf
    np.testing.assert_array_equal(cupy.asnumpy(buf), cupy.asnumpy(y))


# ------------------------------------------------------------------------------------ pooling


def _pool_id(case: tuple) -> str:
    x, k, s, p = case
    return f"x{'x'.join(map(str, x))}-k{k[0]}{k[1]}-s{s[0]}{s[1]}-p{p[0]}{p[1]}"


def _pool_y_shape(case: tuple) -> tuple[int, int, int, int]:
    (N, C, H, W), (kh, kw), (sh, sw), (ph, pw) = case
    return (N, C, (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1)


def _covering(case: tuple) -> int:
    """The most windows that can cover one input cell."""
    _, (kh, kw), (sh, sw), _ = case
    return -(-kh // sh) * -(-kw // sw)


@pytest.mark.parametrize("case", POOL_CASES, ids=_pool_id)
def test_maxpool2d_matches_cpu(gpu, ref, case: tuple) -> None:
    x_shape, kernel, stride, padding = case
    rng = np.random.default_rng(6)
    x, dy = _draw(rng, x_shape), _draw(rng, _pool_y_shape(case))
    y_shape = _pool_y_shape(case)
    y, am = gpu.maxpool2d_fwd(gpu.asarray(x), kernel, stride, padding, out=_poisoned(y_shape),
                              argmax=cupy.full(y_shape, -7, dtype=np.int32))
    want_y, want_am = ref.maxpool2d_fwd(x.astype(np.float64), kernel, stride, padding)
    np.testing.assert_array_equal(cupy.asnumpy(y), want_y)  # a max is exact
    np.testing.assert_array_equal(cupy.asnumpy(am), want_am)
    dx = gpu.maxpool2d_bwd(gpu.asarray(dy), am, x_shape, kernel, stride, padding, out=_poisoned(x_shape))
    dy64 = dy.astype(np.float64)
    want = ref.maxpool2d_bwd(dy64, want_am, x_shape, kernel, stride, padding)
    want_abs = ref.maxpool2d_bwd(np.abs(dy64), want_am, x_shape, kernel, stride, padding)
    _assert_within(dx, want, want_abs, _covering(case))


@pytest.mark.parametrize("case", POOL_CASES, ids=_pool_id)
def test_avgpool2d_matches_cpu(gpu, ref, case: tuple) -> None:
    x_shape, kernel, stride, padding = case
    rng = np.random.default_rng(7)
    x, dy = _draw(rng, x_shape), _draw(rng, _pool_y_shape(case))
    y = gpu.avgpool2d_fwd(gpu.asarray(x), kernel, stride, padding, out=_poisoned(_pool_y_shape(case)))
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    want = ref.avgpool2d_fwd(x64, kernel, stride, padding)
    want_abs = ref.avgpool2d_fwd(np.abs(x64), kernel, stride, padding)
    _assert_within(y, want, want_abs, kernel[0] * kernel[1] + 1)
    dx = gpu.avgpool2d_bwd(gpu.asarray(dy), x_shape, kernel, stride, padding, out=_poisoned(x_shape))
    want = ref.avgpool2d_bwd(dy64, x_shape, kernel, stride, padding)
    want_abs = ref.avgpool2d_bwd(np.abs(dy64), x_shape, kernel, stride, padding)
    _assert_within(dx, want, want_abs, _covering(case) + 1)


@pytest.mark.parametrize(
    "kernel, stride, padding", [((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)), ((3, 2), (2, 1), (1, 1))]
)
def test_maxpool2d_ties_route_each_gradient_to_one_input(gpu, ref, kernel, stride, padding) -> None:
    rng = np.random.default_rng(8)
    x = np.round(rng.standard_normal((3, 2, 9, 10))).astype(np.float32)  # many equal maxima
    x[0, 0, :2, :2] = [[0.0, 5.0], [5.0, 1.0]]  # window (0, 0) of a 2x2 pool: a tie at cells 1 and W
    x[1, 1] = 0.0  # a plane of ties only
    x_shape, y_shape = x.shape, _pool_y_shape((x.shape, kernel, stride, padding))
    y, am = gpu.maxpool2d_fwd(gpu.asarray(x), kernel, stride, padding, out=_poisoned(y_shape),
                              argmax=cupy.full(y_shape, -7, dtype=np.int32))
    want_y, want_am = ref.maxpool2d_fwd(x.astype(np.float64), kernel, stride, padding)
    am_host = cupy.asnumpy(am)
    np.testing.assert_array_equal(am_host, want_am)
    np.testing.assert_array_equal(cupy.asnumpy(y), want_y)
    if kernel == (2, 2):
        assert am_host[0, 0, 0, 0] == 1  # the first of the tied cells in row-major window order
        assert (am_host[1, 1] == 2 * x.shape[3] * np.arange(y_shape[2])[:, None]
                + 2 * np.arange(y_shape[3])[None, :]).all()  # all-equal windows: the top-left cell
    dy = np.ones(y_shape)
    dx = cupy.asnumpy(gpu.maxpool2d_bwd(gpu.asarray(dy), am, x_shape, kernel, stride, padding,
                                        out=_poisoned(x_shape)))
    np.testing.assert_array_equal(dx, ref.maxpool2d_bwd(dy.astype(np.float64), want_am, x_shape, kernel,
                                                        stride, padding))
    # each window's unit gradient lands on exactly one input: the total is the window count
    assert dx.sum() == np.prod(y_shape)
    if kernel == (2, 2):
        assert set(np.unique(dx)) <= {0.0, 1.0} and dx[0, 0, 0, 1] == 1.0 and dx[0, 0, 1, 0] == 0.0


# ------------------------------------------------------------------------------------ checks


def test_bad_arguments_raise_shape_error_naming_the_op(gpu) -> None:
    x = gpu.asarray(np.zeros((2, 3, 8, 8), np.float32))
    w = gpu.asarray(np.zeros((4, 3, 3, 3), np.float32))
    with pytest.raises(ShapeError, match="^conv2d_fwd: x .* must be C-contiguous"):
        gpu.conv2d_fwd(x.transpose(0, 1, 3, 2), w, None, (1, 1), (0, 0))
    with pytest.raises(ShapeError, match="^conv2d_fwd: x must be a device array"):
        gpu.conv2d_fwd(np.zeros((2, 3, 8, 8), np.float32), w, None, (1, 1), (0, 0))
    with pytest.raises(ShapeError, match="^conv2d_fwd: w .* has dtype float64"):
        gpu.conv2d_fwd(x, w.astype(np.float64), None, (1, 1), (0, 0))
    with pytest.raises(ShapeError, match=r"^conv2d_fwd: out buffer has shape \(2, 4, 8, 8\)"):
        gpu.conv2d_fwd(x, w, None, (1, 1), (0, 0), out=_poisoned((2, 4, 8, 8)))
    with pytest.raises(ShapeError, match=r"^conv2d_bwd_data: dy has shape"):
        gpu.conv2d_bwd_data(_poisoned((2, 4, 5, 5)), w, (2, 3, 8, 8), (1, 1), (0, 0))
    with pytest.raises(ShapeError, match="^conv2d_bwd_weight: .* do not fit"):
        gpu.conv2d_bwd_weight(x, _poisoned((2, 4, 6, 6)), (4, 2, 3, 3), (1, 1), (0, 0))
    with pytest.raises(ShapeError, match="^maxpool2d_bwd: argmax .* has dtype float32, expected int32"):
        gpu.maxpool2d_bwd(_poisoned((2, 3, 4, 4)), _poisoned((2, 3, 4, 4)), (2, 3, 8, 8), (2, 2), (2, 2), (0, 0))
    with pytest.raises(ShapeError, match="^avgpool2d_fwd: padding"):
        gpu.avgpool2d_fwd(x, (2, 2), (2, 2), (2, 2))


def test_outputs_overlapping_inputs_are_refused(gpu) -> None:
    x = gpu.asarray(np.zeros((2, 4, 8, 8), np.float32))
    w = gpu.asarray(np.zeros((4, 4, 1, 1), np.float32))
    with pytest.raises(ShapeError, match=r"^conv2d_fwd: out buffer \(2, 4, 8, 8\) overlaps x"):
        gpu.conv2d_fwd(x, w, None, (1, 1), (0, 0), out=x)
    with pytest.raises(ShapeError, match="^conv2d_bwd_data: out buffer .* overlaps dy"):
        gpu.conv2d_bwd_data(x, w, (2, 4, 8, 8), (1, 1), (0, 0), out=x)
    with pytest.raises(ShapeError, match="^avgpool2d_fwd: out buffer .* overlaps x"):
        gpu.avgpool2d_fwd(x, (2, 2), (2, 2), (0, 0), out=x.reshape(-1)[: 2 * 4 * 16].reshape(2, 4, 4, 4))
