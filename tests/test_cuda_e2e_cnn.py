"""The seed CNN (conv32-pool-conv64-pool-dense64-dense10) through gpuml.nn on the CUDA backend
against CpuBackend(float64) from the same float32 weights: logits, loss, every parameter gradient
and three SGD steps must agree, and a CUDA forward + backward must repeat bit for bit.

Tolerances: each layer's float32 result is within ~1e-6 relative of float64 (see
test_cuda_conv_pool.py's gamma bounds, far looser than the typical error), and seven layers
compound that mildly: 2e-4 for logits and loss. Gradients get 2e-3: a max-pool window whose two
largest inputs differ by ~1e-7 relative can pick a different winner in float32 than in float64,
moving one dy to a neighbouring cell; such a near-tie is rare and moves the norm-wise error of a
gradient by O(1e-3) at most at these sizes.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpuml.backend import get_backend
from gpuml.backend.cpu import CpuBackend
from gpuml.nn import Conv2D, Dense, Flatten, MaxPool2D, Sequential, SoftmaxCrossEntropy

cupy = pytest.importorskip("cupy")
try:
    _GPUS = cupy.cuda.runtime.getDeviceCount()
except Exception:
    _GPUS = 0
if _GPUS < 1:
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

pytestmark = pytest.mark.gpu

FWD_TOL = 2e-4
GRAD_TOL = 2e-3


def _seed_cnn() -> Sequential:
    return Sequential([
        Conv2D(32, 3, activation="relu"), MaxPool2D(2),
        Conv2D(64, 3, activation="relu"), MaxPool2D(2),
        Flatten(), Dense(64, activation="relu"), Dense(10),
    ])  # fmt: skip


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.isfinite(got).all()
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _step(model: Sequential, loss_fn: SoftmaxCrossEntropy, x, y) -> tuple[float, np.ndarray, dict]:
    be = model.backend
    logits = model.forward(x, training=True)
    loss, dlogits = loss_fn(logits, y)
    model.backward(dlogits)
    grads = {name: be.to_numpy(g) for name, _, g in model.named_parameters()}
    return float(be.to_numpy(loss)), be.to_numpy(logits), grads


@pytest.fixture(scope="module")
def models() -> tuple[Sequential, Sequential]:
    cuda, cpu = get_backend("cuda", dtype="float32"), CpuBackend(dtype="float64")
    gpu_model = _seed_cnn().build((1, 28, 28), cuda, seed=0)
    ref_model = _seed_cnn().build((1, 28, 28), cpu, seed=0)
    ref_model.load_state_dict(gpu_model.state_dict())  # the very float32 weights, widened
    return gpu_model, ref_model


def _batch(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((batch, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, batch).astype(np.int32)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_seed_cnn_forward_and_gradients_match_reference(models, batch: int) -> None:
    gpu_model, ref_model = models
    x, y = _batch(batch, seed=batch)
    got = _step(gpu_model, SoftmaxCrossEntropy(gpu_model.backend), *_to(gpu_model, x, y))
    want = _step(ref_model, SoftmaxCrossEntropy(ref_model.backend), *_to(ref_model, x, y))
    assert abs(got[0] - want[0]) <= FWD_TOL * abs(want[0])
    assert _rel(got[1], want[1]) <= FWD_TOL
    for name in want[2]:
        assert _rel(got[2][name], want[2][name]) <= GRAD_TOL, name


@pytest.mark.emulator_slow
def test_seed_cnn_step_is_bitwise_repeatable(models) -> None:
    gpu_model, _ = models
    x, y = _to(gpu_model, *_batch(256, seed=11))
    loss_fn = SoftmaxCrossEntropy(gpu_model.backend)
    first, second = _step(gpu_model, loss_fn, x, y), _step(gpu_model, loss_fn, x, y)
    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1], second[1])
    for name in first[2]:
        np.testing.assert_array_equal(first[2][name].view(np.uint32), second[2][name].view(np.uint32))


def test_seed_cnn_sgd_steps_match_reference() -> None:
    cuda, cpu = get_backend("cuda", dtype="float32"), CpuBackend(dtype="float64")
    gpu_model = _seed_cnn().build((1, 28, 28), cuda, seed=3)
    ref_model = _seed_cnn().build((1, 28, 28), cpu, seed=3)
    ref_model.load_state_dict(gpu_model.state_dict())
    x, y = _batch(32, seed=5)
    losses = {}
    for model in (gpu_model, ref_model):
        be, loss_fn = model.backend, SoftmaxCrossEntropy(model.backend)
        xd, yd = _to(model, x, y)
        losses[be.name] = []
        for _ in range(3):
            loss, _, _ = _step(model, loss_fn, xd, yd)
            params = list(model.named_parameters())
            be.sgd_step([p for _, p, _ in params], [g for _, _, g in params], lr=0.005)
            losses[be.name].append(loss)
    assert _rel(losses["cuda"], losses["cpu"]) <= FWD_TOL
    assert losses["cuda"][-1] < losses["cuda"][0]
    for (name, p, _), (_, q, _) in zip(gpu_model.named_parameters(), ref_model.named_parameters(), strict=True):
        assert _rel(cuda.to_numpy(p), cpu.to_numpy(q)) <= GRAD_TOL, name


def _to(model: Sequential, x: np.ndarray, y: np.ndarray) -> tuple:
    be = model.backend
    return be.asarray(x), be.asarray(y, dtype=np.int32)
