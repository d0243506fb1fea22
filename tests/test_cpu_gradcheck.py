"""Finite-difference gradient checks of CpuBackend's backward ops in float64.

Each check takes a scalar objective L(x) = sum(G * f(x)) for a fixed random G (or the loss itself
for the losses), and compares the backend's backward op with central differences of its forward
op on every input element (the shapes are small enough to probe them all)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from gpuml.backend.cpu import CpuBackend

BE = CpuBackend(dtype="float64")
H = 1e-6


def fd_grad(f: Callable[[], float], x: np.ndarray) -> np.ndarray:
    """Central differences of the scalar f() with respect to every element of x (perturbed in
    place and restored)."""
    grad = np.zeros(x.shape)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + H
        up = f()
        flat[i] = old - H
        down = f()
        flat[i] = old
        gflat[i] = (up - down) / (2 * H)
    return grad


def assert_close(analytic: np.ndarray, numeric: np.ndarray, tol: float = 1e-7) -> None:
    err = np.linalg.norm(analytic - numeric) / max(np.linalg.norm(numeric), 1e-12)
    assert err < tol, f"relative error {err:.2e}"


@pytest.mark.parametrize(
    "xs, ws, stride, pad",
    [
        ((2, 3, 7, 6), (4, 3, 3, 3), (1, 1), (1, 1)),
        ((1, 2, 8, 9), (3, 2, 3, 2), (2, 3), (0, 2)),
        ((3, 1, 6, 5), (2, 1, 5, 5), (1, 2), (2, 2)),
        ((2, 8, 5, 6), (2, 8, 3, 3), (2, 1), (1, 0)),
    ],
)
def test_conv2d(xs, ws, stride, pad):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal(xs), rng.standard_normal(ws), rng.standard_normal(ws[0])
    y = BE.conv2d_fwd(x, w, b, stride, pad)
    g = rng.standard_normal(y.shape)

    def objective() -> float:
        return float(np.sum(g * BE.conv2d_fwd(x, w, b, stride, pad)))

    assert_close(BE.conv2d_bwd_data(g, w, xs, stride, pad), fd_grad(objective, x))
    assert_close(BE.conv2d_bwd_weight(x, g, ws, stride, pad), fd_grad(objective, w))
    assert_close(BE.bias_grad(g), fd_grad(objective, b))


def test_conv2d_fused_relu():
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((2, 2, 6, 6)), rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
    y = BE.conv2d_fwd(x, w, b, (1, 1), (1, 1), activation="relu")
    g = rng.standard_normal(y.shape)

    def objective() -> float:
        return float(np.sum(g * BE.conv2d_fwd(x, w, b, (1, 1), (1, 1), activation="relu")))

    dz = BE.activation_bwd("relu", y, g)
    assert_close(BE.conv2d_bwd_data(dz, w, x.shape, (1, 1), (1, 1)), fd_grad(objective, x))
    assert_close(BE.conv2d_bwd_weight(x, dz, w.shape, (1, 1), (1, 1)), fd_grad(objective, w))


POOLS = [
    ((2, 2, 6, 7), (2, 2), (2, 2), (0, 0)),
    ((1, 2, 7, 6), (3, 3), (2, 2), (1, 1)),
    ((2, 1, 5, 6), (3, 2), (1, 1), (1, 1)),
    ((1, 2, 9, 8), (3, 3), (3, 3), (0, 0)),
]


@pytest.mark.parametrize("xs, kernel, stride, pad", POOLS)
def test_maxpool2d(xs, kernel, stride, pad):
    rng = np.random.default_rng(2)
    # distinct values at least 1e-3 apart, so no tie flips within +-H
    x = rng.permutation(np.prod(xs)).reshape(xs) * 1e-3 + rng.uniform(0, 1e-4, xs)
    y, argmax = BE.maxpool2d_fwd(x, kernel, stride, pad)
    g = rng.standard_normal(y.shape)

    def objective() -> float:
        return float(np.sum(g * BE.maxpool2d_fwd(x, kernel, stride, pad)[0]))

    assert_close(BE.maxpool2d_bwd(g, argmax, xs, kernel, stride, pad), fd_grad(objective, x))


@pytest.mark.parametrize("xs, kernel, stride, pad", POOLS)
def test_avgpool2d(xs, kernel, stride, pad):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(xs)
    g = rng.standard_normal(BE.avgpool2d_fwd(x, kernel, stride, pad).shape)

    def objective() -> float:
        return float(np.sum(g * BE.avgpool2d_fwd(x, kernel, stride, pad)))

    assert_close(BE.avgpool2d_bwd(g, xs, kernel, stride, pad), fd_grad(objective, x))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softmax_xent(eps):
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((5, 7)) * 2
    labels = rng.integers(0, 7, 5).astype(np.int32)
    _, dlogits = BE.softmax_xent(logits, labels, label_smoothing=eps)

    def objective() -> float:
        return float(BE.softmax_xent(logits, labels, label_smoothing=eps)[0])

    assert_close(dlogits, fd_grad(objective, logits))


def test_mse():
    rng = np.random.default_rng(5)
    pred, target = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    _, dpred = BE.mse(pred, target)
    assert_close(dpred, fd_grad(lambda: float(BE.mse(pred, target)[0]), pred))


@pytest.mark.parametrize("kind", ["relu", "tanh", "sigmoid"])
def test_activations(kind):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 5)) * 2
    x[np.abs(x) < 1e-3] = 0.5  # keep relu's kink out of reach of +-H
    g = rng.standard_normal(x.shape)
    y = BE.activation_fwd(kind, x)
    numeric = fd_grad(lambda: float(np.sum(g * BE.activation_fwd(kind, x))), x)
    assert_close(BE.activation_bwd(kind, y, g), numeric)


def test_dropout():
    rng = np.random.default_rng(7)
    x, g = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    _, mask = BE.dropout_fwd(x, 0.4, seed=3, offset=10)
    numeric = fd_grad(lambda: float(np.sum(g * BE.dropout_fwd(x, 0.4, seed=3, offset=10)[0])), x)
    assert_close(BE.dropout_bwd(g, mask, 0.4), numeric)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_matmul(trans_a, trans_b, activation):
    """Gradients of act(op(a) @ op(b) + bias), computed with the backend's own matmul the way a
    Dense layer's backward does, against finite differences."""
    rng = np.random.default_rng(8)
    M, K, N = 4, 6, 3
    a = rng.standard_normal((K, M) if trans_a else (M, K))
    b = rng.standard_normal((N, K) if trans_b else (K, N))
    bias = rng.standard_normal(N)

    def fwd() -> np.ndarray:
        return BE.matmul(a, b, trans_a=trans_a, trans_b=trans_b, bias=bias, activation=activation)

    y = fwd()
    g = rng.standard_normal(y.shape)
    dz = BE.activation_bwd("relu", y, g) if activation else g

    def objective() -> float:
        return float(np.sum(g * fwd()))

    # d op(a) = dz @ op(b).T and d op(b) = op(a).T @ dz, transposed back where op transposed
    if trans_a:
        da = BE.matmul(b, dz, trans_a=trans_b, trans_b=True)
    else:
        da = BE.matmul(dz, b, trans_b=not trans_b)
    if trans_b:
        db = BE.matmul(dz, a, trans_a=True, trans_b=trans_a)
    else:
        db = BE.matmul(a, dz, trans_a=not trans_a)
    assert_close(da, fd_grad(objective, a))
    assert_close(db, fd_grad(objective, b))
    assert_close(BE.bias_grad(dz), fd_grad(objective, bias))
