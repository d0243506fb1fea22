"""CUDA kernels where float32 rounding, not indexing, decides the answer: optimizer constants
formed on the device, softmax cross-entropy at large logit offsets, eps where it matters, and
the one-hot path of MSE. References are float64 (exact values where a case has one); bounds
are a few float32 roundings (U32 = 2^-24) of the quantity compared."""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu_util import GPU, U32, backends, gemm_tol, nan_filled, rel_err

pytestmark = GPU


def _scalar_state(cuda, *values: float) -> list[list]:
    return [[cuda.asarray(np.array([v], dtype=np.float32))] for v in values]


# ----------------------------------------------------------------------------- optimizer constants
@pytest.mark.parametrize("beta1,beta2", [(0.9, 0.999), (0.99, 0.9999)])
def test_adam_first_step_is_exact(beta1: float, beta2: float) -> None:
    """p = 0, g = 1, lr = 1, eps = 0, step 1: m = 1 - beta1, v = 1 - beta2 and p = -1 exactly.
    With 1 - beta formed from the float32 beta on the device, v was 1.29e-5 relatively small at
    beta2 = 0.999 and p = -1.0000068."""
    cuda, _ = backends()
    p, g, m, v = _scalar_state(cuda, 0.0, 1.0, 0.0, 0.0)
    cuda.adam_step(p, g, m, v, lr=1.0, beta1=beta1, beta2=beta2, eps=0.0, step=1)
    got_m, got_v, got_p = (float(cuda.to_numpy(a[0])[0]) for a in (m, v, p))
    assert abs(got_m - (1 - beta1)) <= 2 * U32 * (1 - beta1), got_m
    assert abs(got_v - (1 - beta2)) <= 2 * U32 * (1 - beta2), got_v
    assert abs(got_p + 1.0) <= 8 * U32, got_p


@pytest.mark.parametrize("alpha", [0.99, 0.999])
def test_rmsprop_first_step_is_exact(alpha: float) -> None:
    """p = 0, g = 1, lr = 1, eps = 0: s = 1 - alpha and p = -1 / sqrt(1 - alpha)."""
    cuda, _ = backends()
    p, g, s = _scalar_state(cuda, 0.0, 1.0, 0.0)
    cuda.rmsprop_step(p, g, s, lr=1.0, alpha=alpha, eps=0.0)
    got_s, got_p = (float(cuda.to_numpy(a[0])[0]) for a in (s, p))
    want_p = -1.0 / np.sqrt(1 - alpha)
    assert abs(got_s - (1 - alpha)) <= 2 * U32 * (1 - alpha), got_s
    assert abs(got_p - want_p) <= 4 * U32 * abs(want_p), got_p


# ----------------------------------------------------------------------------- eps where it matters
SHAPES = [(3,), (5, 7), (64,)]


def _eps_sensitive_sets(n_state: int, seed: int):
    """Gradients and second moments so small that sqrt(v) is below eps = 1e-3 (and exactly 0 for
    some elements): eps decides the step, so moving it (e.g. inside the square root) shows."""
    gen = np.random.default_rng(seed)
    params = [gen.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [(gen.standard_normal(s) * 1e-4).astype(np.float32) for s in SHAPES]
    state = [[(np.abs(gen.standard_normal(s)) * (1e-9 if k == n_state - 1 else 1e-5)).astype(np.float32)
              for s in SHAPES] for k in range(n_state)]
    for arrays in (grads, *state):
        arrays[1].reshape(-1)[::3] = 0.0  # g = 0 and an all-zero state: the step is m / eps
    host = [params, grads, *state]
    cuda, cpu = backends()
    return ([[cuda.asarray(a) for a in group] for group in host],
            [[cpu.asarray(a.astype(np.float64)) for a in group] for group in host], params)


@pytest.mark.parametrize(
    "method,n_state,kwargs",
    [
        ("adam_step", 2, dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-3, weight_decay=0.0, decoupled=False)),
        ("adam_step", 2, dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-3, weight_decay=0.01, decoupled=True)),
        ("rmsprop_step", 1, dict(lr=1e-2, alpha=0.99, eps=1e-3, weight_decay=0.0)),
    ],
)
def test_optimizer_eps_where_it_decides_the_step(method: str, n_state: int, kwargs: dict) -> None:
    dev, ref, p0 = _eps_sensitive_sets(n_state, seed=7)
    cuda, cpu = backends()
    steps = 3
    for step in range(1, steps + 1):
        extra = {"step": step} if method == "adam_step" else {}
        getattr(cuda, method)(*dev, **kwargs, **extra)
        getattr(cpu, method)(*ref, **kwargs, **extra)
    for i, (pd, pr, start) in enumerate(zip(dev[0], ref[0], p0, strict=True)):
        got = cuda.to_numpy(pd).astype(np.float64)
        allowed = 1e-5 * np.linalg.norm(pr - start) + 2 * steps * U32 * np.linalg.norm(pr)
        assert np.linalg.norm(got - pr) <= allowed, f"params[{i}]"


# ----------------------------------------------------------------------------- softmax_xent offsets
def _xent_case(cuda, cpu, logits: np.ndarray, labels: np.ndarray, eps: float):
    want_loss, want_d = cpu.softmax_xent(logits.astype(np.float64), labels, label_smoothing=eps)
    B, K = logits.shape
    loss, d = cuda.softmax_xent(cuda.asarray(logits), cuda.asarray(labels), label_smoothing=eps,
                                loss=nan_filled(cuda, ()), dlogits=nan_filled(cuda, (B, K)))
    return float(cuda.to_numpy(loss)), float(want_loss), cuda.to_numpy(d), want_d


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softmax_xent_single_class_at_large_logit(eps: float) -> None:
    """One class: the loss is exactly 0 at any logit (was 1.5e-5 at 1000.3 with eps 0.1)."""
    cuda, cpu = backends()
    for value in (1000.3, -1e4 - 0.7, 3.3e4):
        got, want, d, want_d = _xent_case(cuda, cpu, np.array([[value]], np.float32), np.zeros(1, np.int32), eps)
        assert abs(want) <= 1e-12 and abs(got) <= 1e-7, (value, got, want)
        assert np.abs(d).max() <= 1e-7


@pytest.mark.parametrize("B,K", [(9, 10), (3, 2048), (2, 2051)])  # warp kernel; block kernel vec4 / scalar
@pytest.mark.parametrize("offset", [1e4, -3e4])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_softmax_xent_large_offset_logits(B: int, K: int, offset: float, eps: float) -> None:
    """Logits offset + O(3): the loss (a few units) keeps float32's relative accuracy. Formed from
    unshifted logits it lost about 3e-4 at offset 1e4 (the sum of K logits near 1e4 alone is
    rounded to ulp(K * 1e4))."""
    cuda, cpu = backends()
    gen = np.random.default_rng(B * K)
    logits = (offset + gen.standard_normal((B, K)) * 3.0).astype(np.float32)
    labels = gen.integers(0, K, B).astype(np.int32)
    got, want, d, want_d = _xent_case(cuda, cpu, logits, labels, eps)
    # Every term of the shifted loss is >= 0 and a few roundings off: 64 u relative covers the
    # float32 sums of exp(x - m) and of x - m over the row (errors ~ u sqrt(K) with random data).
    assert abs(got - want) <= 64 * U32 * want, (got, want)
    assert rel_err(d, want_d) <= gemm_tol(K)


# ----------------------------------------------------------------------------- MSE on integer labels
def test_one_hot_writes_every_element() -> None:
    cuda, cpu = backends()
    labels = np.array([3, 0, 9, 9, 4], dtype=np.int32)
    out = nan_filled(cuda, (5, 10))
    got = cuda.one_hot(cuda.asarray(labels), 10, out=out)
    assert got is out
    np.testing.assert_array_equal(cuda.to_numpy(got), cpu.to_numpy(cpu.one_hot(cpu.asarray(labels), 10)))
    bad = cuda.to_numpy(cuda.one_hot(cuda.asarray(np.array([1, 10, -1], dtype=np.int32)), 10))
    assert (bad[0] == np.eye(10)[1]).all() and np.isnan(bad[1:]).all()  # out of range: a NaN row


def test_mse_loss_with_integer_labels_matches_cpu() -> None:
    """The MSE loss of gpuml.nn on integer labels (one-hot targets built on the device)."""
    from gpuml.nn.losses import MSE

    cuda, cpu = backends()
    gen = np.random.default_rng(11)
    outputs = gen.standard_normal((33, 10)).astype(np.float32)
    labels = gen.integers(0, 10, 33).astype(np.int32)
    dev_loss, cpu_loss = MSE(cuda), MSE(cpu)
    for _ in range(2):  # the second call reuses the loss's buffers
        loss, d = dev_loss(cuda.asarray(outputs), cuda.asarray(labels))
        want_loss, want_d = cpu_loss(cpu.asarray(outputs.astype(np.float64)), cpu.asarray(labels))
        assert rel_err(cuda.to_numpy(loss), cpu.to_numpy(want_loss)) <= 1e-6
        assert rel_err(cuda.to_numpy(d), cpu.to_numpy(want_d)) <= 1e-6
