"""Finite-difference gradient checks (float64, CPU backend) for every layer and loss, through
the layer API the trainer uses: parameter grads and input grads."""

from __future__ import annotations

import numpy as np
import pytest

from gpuml.backend.cpu import CpuBackend
from gpuml.nn import layers as L
from gpuml.nn.losses import MSE, SoftmaxCrossEntropy
from gpuml.nn.model import Sequential

BE = CpuBackend(dtype="float64")
EPS = 1e-6


def _weighted(model: Sequential, x: np.ndarray, r: np.ndarray) -> float:
    """Scalar objective sum(r * model(x)); its gradient w.r.t. the output is r."""
    return float(np.sum(r * model.forward(x.copy(), training=True, step=3)))


def _fd_check(model: Sequential, x: np.ndarray, rng: np.random.Generator, n_probe: int = 12) -> None:
    y = model.forward(x, training=True, step=3)
    r = rng.standard_normal(y.shape)
    # Input gradient: make every layer produce it.
    for layer in model.layers:
        layer.need_input_grad = True
    model.forward(x, training=True, step=3)
    dx = None
    dy = r.copy()
    for layer in reversed(model.layers):
        dy = layer.backward(dy)
    dx = np.array(dy)
    grads = {name: np.array(g) for name, _, g in model.named_parameters()}
    checks = [("x", x, dx)] + [(name, p, grads[name]) for name, p, _ in model.named_parameters()]
    for name, arr, analytic in checks:
        flat = arr.reshape(-1)
        for i in rng.choice(flat.size, size=min(n_probe, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + EPS
            up = _weighted(model, x, r)
            flat[i] = old - EPS
            down = _weighted(model, x, r)
            flat[i] = old
            numeric = (up - down) / (2 * EPS)
            got = analytic.reshape(-1)[i]
            assert abs(got - numeric) <= 1e-6 + 1e-5 * abs(numeric), (name, i, got, numeric)


def _model(layers: list[L.Layer], shape: tuple[int, ...]) -> Sequential:
    return Sequential(layers).build(shape, BE, seed=1)


@pytest.mark.parametrize("activation", [None, "relu", "tanh", "sigmoid"])
def test_dense(activation: str | None) -> None:
    rng = np.random.default_rng(0)
    m = _model([L.Dense(7, activation=activation)], (5,))
    for p in m.layers[0].params.values():  # non-zero bias so relu kinks are not at 0
        p += rng.standard_normal(p.shape) * 0.1
    _fd_check(m, rng.standard_normal((3, 5)), rng)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 0), (3, 2, 1), ((2, 3), 1, (1, 0)), (1, 1, 0), (5, 2, 2)])
def test_conv2d(kernel, stride, padding) -> None:
    rng = np.random.default_rng(1)
    m = _model([L.Conv2D(4, kernel, stride=stride, padding=padding, activation="tanh")], (3, 7, 6))
    _fd_check(m, rng.standard_normal((2, 3, 7, 6)), rng)


def test_conv2d_relu_same_padding() -> None:
    rng = np.random.default_rng(2)
    m = _model([L.Conv2D(3, 3, padding="same", activation="relu")], (2, 5, 5))
    m.layers[0].params["b"][...] = 0.3
    _fd_check(m, rng.standard_normal((2, 2, 5, 5)), rng)


@pytest.mark.parametrize("cls", [L.MaxPool2D, L.AvgPool2D])
@pytest.mark.parametrize("size,stride,padding", [(2, None, 0), (3, 2, 1), ((2, 3), (1, 2), 0)])
def test_pooling(cls, size, stride, padding) -> None:
    rng = np.random.default_rng(3)
    m = _model([L.Conv2D(2, 1), cls(size, stride=stride, padding=padding)], (2, 7, 8))
    # distinct values: no ties, so max-pool's gradient is well defined
    x = rng.permutation(2 * 2 * 7 * 8).reshape(2, 2, 7, 8) / 10.0
    _fd_check(m, x, rng)


def test_flatten_dropout_activation_stack() -> None:
    rng = np.random.default_rng(4)
    m = _model([L.Conv2D(3, 3, activation="relu"), L.Flatten(), L.Dropout(0.4), L.Activation("sigmoid"),
                L.Dense(4)], (1, 6, 6))
    m.layers[0].params["b"][...] = 0.2
    _fd_check(m, rng.standard_normal((3, 1, 6, 6)), rng)


def test_dropout_is_identity_in_eval_and_seeded_in_training() -> None:
    m = _model([L.Dropout(0.5)], (1000,))
    x = np.ones((2, 1000))
    assert np.array_equal(m.forward(x, training=False), x)
    a = np.array(m.forward(x, training=True, step=7))
    b = np.array(m.forward(x, training=True, step=7))
    c = np.array(m.forward(x, training=True, step=8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(np.unique(a)) <= {0.0, 2.0} and 0.4 < (a == 0).mean() < 0.6


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_softmax_cross_entropy_loss(smoothing: float) -> None:
    rng = np.random.default_rng(5)
    loss_fn = SoftmaxCrossEntropy(BE, label_smoothing=smoothing)
    logits = rng.standard_normal((4, 6))
    labels = np.array([0, 5, 2, 2], dtype=np.int32)
    loss, d = loss_fn(logits, labels)
    d = np.array(d)
    for i in range(logits.size):
        lp, lm = logits.copy().reshape(-1), logits.copy().reshape(-1)
        lp[i] += EPS
        lm[i] -= EPS
        num = (float(loss_fn(lp.reshape(4, 6), labels)[0]) - float(loss_fn(lm.reshape(4, 6), labels)[0])) / (2 * EPS)
        assert abs(d.reshape(-1)[i] - num) < 1e-7
    # the loss itself against the formula
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    t = np.full((4, 6), smoothing / 6)
    t[np.arange(4), labels] += 1 - smoothing
    assert float(loss_fn(logits, labels)[0]) == pytest.approx(-(t * np.log(p)).sum(1).mean(), rel=1e-12)


def test_mse_loss_with_integer_labels() -> None:
    rng = np.random.default_rng(6)
    loss_fn = MSE(BE)
    out = rng.standard_normal((3, 4))
    labels = np.array([1, 0, 3], dtype=np.int32)
    loss, d = loss_fn(out, labels)
    target = np.eye(4)[labels]
    assert float(loss) == pytest.approx(((out - target) ** 2).mean(), rel=1e-12)
    assert np.allclose(d, 2 * (out - target) / out.size, rtol=1e-12)
