"""The CPU backend validates an op's arguments once per signature (shapes, strides, dtypes,
writeability, static arguments): a training step repeats its signatures, so after its first run
no argument checks run at all, while a call that differs in anything checked is still refused."""

from __future__ import annotations

import numpy as np
import pytest

from gpuml.backend.cpu import CpuBackend
from gpuml.backend.cpu import checks as cpu_checks
from gpuml.errors import ShapeError
from gpuml.nn.layers import Conv2D, Dense, Flatten, MaxPool2D
from gpuml.nn.losses import SoftmaxCrossEntropy
from gpuml.nn.model import Sequential
from gpuml.optim import Adam


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ops whose arguments were checked (one entry per ArgChecks made), in call order."""
    made: list[str] = []

    class Counting(cpu_checks.ArgChecks):
        def __init__(self, dtype, op, key=None, known=None) -> None:
            made.append(op)
            super().__init__(dtype, op, key, known)

    monkeypatch.setattr(cpu_checks, "ArgChecks", Counting)
    return made


def _step(model: Sequential, loss_fn: SoftmaxCrossEntropy, opt: Adam, x: np.ndarray, y: np.ndarray) -> None:
    out = model.forward_buffered(x, training=True)
    _, dout = loss_fn(out, y)
    model.backward(dout)
    opt.step(1e-3)


def test_a_training_step_checks_nothing_after_its_first_run(validations: list[str]) -> None:
    be = CpuBackend()
    model = Sequential([Conv2D(4, 3, activation="relu"), MaxPool2D(2), Flatten(), Dense(16, activation="relu"),
                        Dense(10)]).build((1, 12, 12), be, seed=0)
    loss_fn = SoftmaxCrossEntropy(be)
    params = [p for _, p, _ in model.trainable_parameters()]
    opt = Adam(be, params, [g for _, _, g in model.trainable_parameters()])
    rng = np.random.default_rng(0)
    x = be.asarray(rng.standard_normal((8, 1, 12, 12)))
    y = be.asarray(rng.integers(0, 10, 8).astype(np.int32))
    _step(model, loss_fn, opt, x, y)
    first = len(validations)
    assert first >= 8, validations  # conv, pool, matmuls, loss, adam ... each checked once
    for _ in range(3):
        _step(model, loss_fn, opt, x, y)
    assert validations[first:] == []  # no per-step argument checks however many a call has
    before = [p.copy() for p in params]
    _step(model, loss_fn, opt, x, y)
    assert any(not np.array_equal(a, b) for a, b in zip(before, params))  # the step still trains


def test_a_repeated_signature_still_computes_the_same_results(validations: list[str]) -> None:
    be = CpuBackend()
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal((7, 3)).astype(np.float32)
    out = np.full((5, 3), np.nan, np.float32)
    first = be.matmul(a, b, out=out).copy()
    out.fill(np.nan)
    assert np.array_equal(be.matmul(a, b, out=out), first)
    assert validations == ["matmul"]
    big = rng.standard_normal((5, 14)).astype(np.float32)
    strided = big[:, ::2]  # a new signature (strides): checked, copied, same product
    assert np.array_equal(be.matmul(strided, b), np.ascontiguousarray(strided) @ b)
    assert validations == ["matmul", "matmul"]


@pytest.mark.parametrize("bad", ["shape", "dtype", "read-only", "strided", "static"])
def test_a_call_differing_in_anything_checked_is_refused_after_a_good_one(bad: str) -> None:
    be = CpuBackend()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = np.empty((2, 3, 4, 4), np.float32)
    am = np.empty((2, 3, 4, 4), np.int32)
    be.maxpool2d_fwd(x, (2, 2), (2, 2), (0, 0), out=out, argmax=am)  # remembered as good
    kernel, pad = (2, 2), (0, 0)
    if bad == "shape":
        out = np.empty((2, 3, 4, 5), np.float32)
    elif bad == "dtype":
        out = out.astype(np.float64)
    elif bad == "read-only":
        out.setflags(write=False)
    elif bad == "strided":
        out = np.empty((2, 3, 4, 8), np.float32)[..., ::2]
    else:
        kernel, pad = (2, 2), (2, 2)  # padding more than half the window
    with pytest.raises(ShapeError, match="maxpool2d_fwd"):
        be.maxpool2d_fwd(x, kernel, (2, 2), pad, out=out, argmax=am)


def test_value_checks_run_on_every_call() -> None:
    """Labels and indices are data, not signature: a trusted signature still checks them."""
    be = CpuBackend()
    logits = np.zeros((3, 4), np.float32)
    labels = np.array([0, 1, 2], np.int32)
    loss, d = be.empty(()), be.empty((3, 4))
    be.softmax_xent(logits, labels, loss=loss, dlogits=d)
    labels[1] = 4
    with pytest.raises(ShapeError, match=r"label 4 \(row 1\) is outside \[0, 4\)"):
        be.softmax_xent(logits, labels, loss=loss, dlogits=d)
    images = np.zeros((5, 2), np.uint8)
    targets = np.arange(5)
    idx = np.array([0, 4], np.int64)
    be.gather_batch(images, targets, idx, mean=0.0, std=1.0)
    idx[1] = 5
    with pytest.raises(IndexError, match="index 5 is outside the 5 samples"):
        be.gather_batch(images, targets, idx, mean=0.0, std=1.0)


def test_optimizer_lists_are_checked_once_and_a_changed_list_again(validations: list[str]) -> None:
    be = CpuBackend()
    p = [np.ones((3, 2), np.float32), np.ones(2, np.float32)]
    g = [np.ones((3, 2), np.float32), np.ones(2, np.float32)]
    m = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]
    v = [np.zeros((3, 2), np.float32), np.zeros(2, np.float32)]
    for step in (1, 2, 3):
        be.adam_step(p, g, m, v, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, step=step)
    assert validations == ["adam_step"]
    with pytest.raises(ShapeError, match=r"state\[1\] has shape \(3,\), expected \(2,\)"):
        be.adam_step(p, g, m, [v[0], np.zeros(3, np.float32)], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, step=4)


def test_optimizer_views_are_reused_only_for_the_very_same_arrays() -> None:
    """adam_step reuses the last step's flat views when it is handed the same array objects; a
    new array, even of the same signature, gets views of its own (else the update would land in
    the old array), and a changed one is checked again."""
    be = CpuBackend()
    shapes = [(3, 2), (2,)]
    p = [np.ones(s, np.float32) for s in shapes]
    g = [np.full(s, 0.5, np.float32) for s in shapes]
    m = [np.zeros(s, np.float32) for s in shapes]
    v = [np.zeros(s, np.float32) for s in shapes]
    kw = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8)
    be.adam_step(p, g, m, v, step=1, **kw)
    be.adam_step(p, g, m, v, step=2, **kw)
    after_two = [a.copy() for a in p]
    fresh = [np.ones(s, np.float32) for s in shapes]  # same signature, other arrays
    m2 = [np.zeros(s, np.float32) for s in shapes]
    v2 = [np.zeros(s, np.float32) for s in shapes]
    be.adam_step(fresh, g, m2, v2, step=1, **kw)
    for a, b in zip(p, after_two):
        np.testing.assert_array_equal(a, b)  # the old parameters were not touched
    ref = CpuBackend()
    want = [np.ones(s, np.float32) for s in shapes]
    ref.adam_step(want, g, [np.zeros(s, np.float32) for s in shapes], [np.zeros(s, np.float32) for s in shapes],
                  step=1, **kw)
    for a, b in zip(fresh, want):
        np.testing.assert_array_equal(a, b)  # the new ones were updated, as on a fresh backend
    with pytest.raises(ShapeError, match=r"grads\[0\] has shape \(2, 3\), expected \(3, 2\)"):
        be.adam_step(fresh, [np.ones((2, 3), np.float32), g[1]], m2, v2, step=2, **kw)
