"""The CPU backend writes no subnormal floats where they would otherwise arise and persist:
optimizer state decaying with zero gradients (m *= beta1 gets stuck in the subnormal range, where
x86 arithmetic takes a slow microcode path, issue 15), parameters under weight decay, and the
exp() underflow of softmax-cross-entropy gradients and sigmoid outputs. Values below the dtype's
smallest normal are flushed to zero; everything else is computed as before."""

from __future__ import annotations

import numpy as np
import pytest

from gpuml.backend.cpu import CpuBackend
from gpuml.optim import OPTIMIZERS

DTYPES = ["float32", "float64"]

# every optimizer with state (L2 weight decay would make dead units' gradients nonzero; the
# decoupled kind of AdamW does not), each decay rate 0.9 so 100 steps take a value from 1000x the
# smallest normal to ~2.6e-2 of it: deep in the subnormal range, not yet underflowed to zero
STATEFUL = [
    ("momentum", {"momentum": 0.9}),
    ("momentum", {"momentum": 0.9, "nesterov": True}),
    ("adam", {"beta1": 0.9, "beta2": 0.9}),
    ("adamw", {"beta1": 0.9, "beta2": 0.9, "weight_decay": 0.01}),
    ("rmsprop", {"alpha": 0.9}),
]


def subnormal_count(a: np.ndarray) -> int:
    mag = np.abs(a)
    return int(np.count_nonzero((mag < np.finfo(a.dtype).tiny) & (mag != 0)))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name,kw", STATEFUL)
def test_decaying_optimizer_state_is_flushed(dt: str, name: str, kw: dict) -> None:
    be = CpuBackend(dtype=dt)
    tiny = np.finfo(dt).tiny
    rng = np.random.default_rng(0)
    shape = (40, 25)
    params = [be.asarray(rng.standard_normal(shape))]
    grads = [be.zeros(shape)]
    live = rng.random(shape) < 0.5  # the other half: dead units, whose gradient is exactly zero
    opt = OPTIMIZERS[name](be, params, grads, **kw)
    for state, arrays in opt.state.items():  # state a run left behind, just above the subnormal range
        sign = 1 if state in ("v", "square_avg") else np.where(rng.random(shape) < 0.5, -1, 1)
        arrays[0][...] = rng.uniform(1, 1000, shape) * tiny * sign
    for _ in range(100):
        grads[0][...] = np.where(live, rng.standard_normal(shape), 0.0)
        opt.step(0.01)
    for state, arrays in opt.state.items():
        assert subnormal_count(arrays[0]) == 0, f"{name} {state}: subnormal values remain"
        assert np.count_nonzero(arrays[0][~live]) == 0, f"{name} {state}: dead units' state is not zero"
        assert np.all(arrays[0][live] != 0), f"{name} {state}: live units' state was flushed"
    assert subnormal_count(params[0]) == 0 and np.isfinite(params[0]).all()


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name,kw", [("sgd", {}), ("momentum", {"momentum": 0.5}), ("adamw", {})])
def test_parameters_decayed_by_weight_decay_are_flushed(dt: str, name: str, kw: dict) -> None:
    """lr * weight_decay = 0.1 shrinks a parameter with zero gradient by 0.9 a step (AdamW by its
    decoupled factor, the others through the L2 term; RMSprop and Adam divide that term by its
    own root mean square, so they do not shrink it geometrically)."""
    be = CpuBackend(dtype=dt)
    tiny = np.finfo(dt).tiny
    params = [be.asarray(np.linspace(1, 1000, 64) * tiny)]
    grads = [be.zeros((64,))]
    opt = OPTIMIZERS[name](be, params, grads, weight_decay=1.0, **kw)
    for _ in range(100):
        opt.step(0.1)
    assert subnormal_count(params[0]) == 0
    assert np.count_nonzero(params[0]) == 0


@pytest.mark.parametrize("dt", DTYPES)
def test_softmax_xent_gradient_underflow_is_flushed(dt: str) -> None:
    """A confident row's softmax of the other classes underflows: exp(-gap) is subnormal in
    float32 for gaps from 88 to 103 (float64: 708 to 745), below the smallest normal it is zero."""
    be = CpuBackend(dtype=dt)
    gaps = [90.0, 95.0, 100.0] if dt == "float32" else [710.0, 720.0, 740.0]
    logits = np.array([[0.0, -g, 1.0] for g in gaps], dtype=dt)
    labels = np.array([0, 2, 2], np.int32)
    loss, dlogits = be.softmax_xent(logits, labels)
    assert subnormal_count(dlogits) == 0
    assert np.all(dlogits[:, 1] == 0)
    ref = be.softmax_xent(logits[:, [0, 2]].copy(), np.array([0, 1, 1], np.int32))
    assert np.array_equal(dlogits[:, [0, 2]], ref[1]) and float(loss) == pytest.approx(float(ref[0]), rel=1e-6)


@pytest.mark.parametrize("dt", DTYPES)
def test_sigmoid_underflow_is_flushed(dt: str) -> None:
    be = CpuBackend(dtype=dt)
    far = 95.0 if dt == "float32" else 720.0
    x = np.array([-far, -far - 5, -2.0, 0.0, 3.0], dtype=dt)
    y = be.activation_fwd("sigmoid", x)
    assert subnormal_count(y) == 0 and y[0] == 0 and y[1] == 0
    assert np.allclose(y[2:], 1 / (1 + np.exp(-x[2:].astype(np.float64))), rtol=1e-6)


@pytest.mark.parametrize("name,kw,value", [("adam", {}, 1e-20), ("rmsprop", {}, 1e-20), ("adam", {}, 1e-36)])
def test_tiny_gradients_and_moments_leave_no_subnormal_state(name: str, kw: dict, value: float) -> None:
    """Gradients whose square is subnormal (1e-20 in float32) and moments whose step lr_t * m is
    (1e-36) enter the update as zero where they would only produce subnormals (issue 15: computing
    those on the way, even when the stored value was flushed, made Adam's loop up to 8x slower and
    the seed MLP's epochs 1.22-1.30x slower over 10 epochs). The state stays free of subnormals and
    the tiny gradients still reach Adam's m. The speed itself is a benchmark, not a unit test:
    `bench/subnormal_check.py` (figures in bench/RESULTS.md)."""
    be = CpuBackend(dtype="float32")
    rng = np.random.default_rng(0)
    n = 1 << 16
    tiny_g = rng.random(n) < 0.25
    params = [be.asarray(rng.standard_normal(n))]
    grads = [be.asarray(np.where(tiny_g, value, rng.standard_normal(n) * 1e-3))]
    opt = OPTIMIZERS[name](be, params, grads, **kw)
    opt.step(1e-3)
    if "m" in opt.state:  # where the gradients have held m: their own value
        opt.state["m"][0][...] = np.where(tiny_g, value, opt.state["m"][0])
    before = np.array(params[0], copy=True)
    for _ in range(3):
        opt.step(1e-3)
    assert np.all(np.isfinite(params[0])) and not np.array_equal(params[0][~tiny_g], before[~tiny_g])
    for state, arrays in opt.state.items():
        assert subnormal_count(arrays[0]) == 0, f"{name} {state}: subnormal values"
        if state == "m":
            assert np.all(arrays[0][tiny_g] != 0), "adam m: the tiny gradients did not reach m"
