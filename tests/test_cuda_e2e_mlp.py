"""A few training steps of a 784-64-10 MLP (ReLU, softmax cross-entropy, momentum SGD) run with
the CUDA backend and with CpuBackend(float64) from the same float32 start: the losses must
agree step by step, as must the weights at the end."""

from __future__ import annotations

import numpy as np

from tests.gpu_util import GPU, backends, gemm_tol, rel_err

pytestmark = GPU


def _train(be, params: list, x: np.ndarray, y: np.ndarray, steps: int) -> tuple[list[float], list]:
    W1, b1, W2, b2 = (be.asarray(p) for p in params)
    vel = [be.zeros(p.shape) for p in (W1, b1, W2, b2)]
    xd, yd = be.asarray(x), be.asarray(y, dtype=np.int32)
    losses = []
    for _ in range(steps):
        h = be.matmul(xd, W1, bias=b1, activation="relu")
        logits = be.matmul(h, W2, bias=b2)
        loss, dlogits = be.softmax_xent(logits, yd, label_smoothing=0.05, dlogits=logits)
        dW2 = be.matmul(h, dlogits, trans_a=True)
        db2 = be.bias_grad(dlogits)
        dh = be.matmul(dlogits, W2, trans_b=True)
        dh = be.activation_bwd("relu", h, dh, out=dh)
        dW1 = be.matmul(xd, dh, trans_a=True)
        db1 = be.bias_grad(dh)
        be.momentum_step([W1, b1, W2, b2], [dW1, db1, dW2, db2], vel, lr=0.1, momentum=0.9)
        losses.append(float(be.to_numpy(loss)))
    return losses, [be.to_numpy(p) for p in (W1, b1, W2, b2)]


def train_both(cuda, cpu, steps: int = 5) -> tuple[list[float], list, list[float], list]:
    """_train on the CUDA backend (float32) and on the float64 reference from the same seeded start:
    (losses, params) of each."""
    gen = np.random.default_rng(0)
    x = gen.random((32, 784)).astype(np.float32)
    y = gen.integers(0, 10, 32)
    params = [
        (gen.standard_normal((784, 64)) * np.sqrt(2 / 784)).astype(np.float32), np.zeros(64, np.float32),
        (gen.standard_normal((64, 10)) * np.sqrt(2 / 64)).astype(np.float32), np.zeros(10, np.float32),
    ]  # fmt: skip
    got_losses, got_params = _train(cuda, params, x, y, steps=steps)
    want_losses, want_params = _train(cpu, [p.astype(np.float64) for p in params], x.astype(np.float64), y, steps)
    return got_losses, got_params, want_losses, want_params


def test_mlp_training_steps_match_reference() -> None:
    got_losses, got_params, want_losses, want_params = train_both(*backends())
    # float32 rounding of each step compounds mildly over 5 steps; 10x the single-GEMM bound
    assert rel_err(got_losses, want_losses) <= 10 * gemm_tol(784)
    assert got_losses[-1] < got_losses[0]
    for g, w in zip(got_params, want_params, strict=True):
        assert rel_err(g, w) <= 10 * gemm_tol(784)
