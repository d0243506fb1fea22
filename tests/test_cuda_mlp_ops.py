"""Every MLP-path CUDA kernel against CpuBackend(float64): odd, non-tile-multiple shapes, all
transposes and epilogues, NaN-filled outputs, aliasing. Bounds: see tests/gpu_util.py."""

from __future__ import annotations

import numpy as np
import pytest

from gpuml.backend import rng
from gpuml.errors import ShapeError
from tests.gpu_util import ELEMENTWISE_TOL, GPU, U32, backends, gemm_tol, nan_filled, on_both, rand_f32, rel_err

pytestmark = GPU




# ----------------------------------------------------------------------------- matmul
GEMM_SHAPES = [
    (1, 1, 1), (7, 33, 5), (33, 127, 1000), (127, 33, 7), (32, 1024, 784), (32, 10, 1024),
    (784, 1024, 32), (1, 4097, 3), (130, 257, 0),
    (520, 1030, 20),    # 9 x 17 tiles of 64 x 64: the medium tile (gemm_tiles.h), ragged edges
    (1500, 1409, 33),   # 12 x 12 big tiles: the 128x128 tile, ragged edges, scalar stores
    (1536, 1540, 68),   # the same tile with 16-byte copies and float4 stores (ld % 4 == 0)
]  # fmt: skip
EPILOGUES = [(False, None), (True, None), (True, "relu"), (False, "relu")]


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
def test_matmul_matches_reference(M: int, N: int, K: int, trans_a: bool, trans_b: bool) -> None:
    cuda, cpu = backends()
    gen = np.random.default_rng(M * 7919 + N * 31 + K)
    a = rand_f32(gen, *((K, M) if trans_a else (M, K)))
    b = rand_f32(gen, *((N, K) if trans_b else (K, N)))
    bias = rand_f32(gen, N)
    a_d, a_c = on_both(a)
    b_d, b_c = on_both(b)
    bias_d, bias_c = on_both(bias)
    for use_bias, act in EPILOGUES:
        out = nan_filled(cuda, (M, N))
        kw = dict(trans_a=trans_a, trans_b=trans_b, activation=act)
        got = cuda.matmul(a_d, b_d, bias=bias_d if use_bias else None, out=out, **kw)
        want = cpu.matmul(a_c, b_c, bias=bias_c if use_bias else None, **kw)
        assert got is out
        assert rel_err(cuda.to_numpy(got), want) <= gemm_tol(K), (use_bias, act)


@pytest.mark.parametrize("M,N,K", [(7, 33, 5), (32, 1024, 784), (1500, 1409, 33), (1536, 1540, 68)])
def test_matmul_accumulate(M: int, N: int, K: int) -> None:
    cuda, cpu = backends()
    gen = np.random.default_rng(5)
    a, b, c0 = rand_f32(gen, K, M), rand_f32(gen, K, N), rand_f32(gen, M, N)
    out = cuda.asarray(c0)
    cuda.matmul(cuda.asarray(a), cuda.asarray(b), trans_a=True, accumulate=True, out=out)
    want = c0.astype(np.float64) + a.astype(np.float64).T @ b.astype(np.float64)
    assert rel_err(cuda.to_numpy(out), want) <= gemm_tol(K)


def test_matmul_misaligned_views_take_the_scalar_path() -> None:
    """Operands starting 4 bytes past a 16-byte boundary (the vec4 kernel would fault)."""
    cuda, cpu = backends()
    gen = np.random.default_rng(9)
    M, N, K = 1536, 1540, 68
    a, b = rand_f32(gen, M, K), rand_f32(gen, K, N)
    a_buf = cuda.asarray(np.concatenate([[0.0], a.ravel()]).astype(np.float32))
    a_view = a_buf[1:].reshape(M, K)
    got = cuda.matmul(a_view, cuda.asarray(b))
    assert rel_err(cuda.to_numpy(got), cpu.matmul(a.astype(np.float64), b.astype(np.float64))) <= gemm_tol(K)


def test_matmul_shape_errors() -> None:
    cuda, _ = backends()
    a, b = cuda.zeros((3, 4)), cuda.zeros((5, 6))
    with pytest.raises(ShapeError, match="matmul"):
        cuda.matmul(a, b)
    with pytest.raises(ShapeError, match="out"):
        cuda.matmul(a, cuda.zeros((4, 6)), out=cuda.zeros((3, 5)))
    with pytest.raises(ShapeError, match="dtype"):
        cuda.matmul(cuda.zeros((3, 4), dtype=np.float64), cuda.zeros((4, 2)))


# ----------------------------------------------------------------------------- softmax_xent
@pytest.mark.parametrize("B,K", [(1, 10), (33, 10), (1000, 10), (7, 1023), (7, 32000), (3, 32001)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("alias", [False, True])
def test_softmax_xent(B: int, K: int, eps: float, alias: bool) -> None:
    cuda, cpu = backends()
    gen = np.random.default_rng(B * K)
    logits = rand_f32(gen, B, K, scale=3.0)
    labels = gen.integers(0, K, B).astype(np.int32)
    want_loss, want_d = cpu.softmax_xent(logits.astype(np.float64), labels, label_smoothing=eps)
    x = cuda.asarray(logits)
    d_out = x if alias else nan_filled(cuda, (B, K))
    loss, d = cuda.softmax_xent(x, cuda.asarray(labels), label_smoothing=eps,
                                loss=nan_filled(cuda, ()), dlogits=d_out)
    assert d is d_out
    # loss: a log-sum-exp per row (a few roundings) and a double-precision mean.
    assert rel_err(cuda.to_numpy(loss), want_loss) <= 1e-5
    # dlogits: exp and one division per element, the row sum accumulated over K in float32.
    assert rel_err(cuda.to_numpy(d), want_d) <= gemm_tol(K)


def test_count_correct_first_max_on_ties() -> None:
    cuda, cpu = backends()
    gen = np.random.default_rng(3)
    for B, K in [(1, 10), (37, 10), (1000, 10), (5, 32000)]:
        logits = np.round(rand_f32(gen, B, K)).astype(np.float32)  # many ties
        labels = gen.integers(0, K, B).astype(np.int32)
        labels[: B // 2] = np.argmax(logits[: B // 2], axis=1)
        got = cuda.count_correct(cuda.asarray(logits), cuda.asarray(labels), out=nan_filled(cuda, ()))
        want = cpu.count_correct(logits.astype(np.float64), labels)
        assert float(cuda.to_numpy(got)) == float(want)


def test_mse() -> None:
    cuda, cpu = backends()
    gen = np.random.default_rng(4)
    for shape in [(1,), (7, 33), (1000, 3, 5)]:
        p, t = rand_f32(gen, *shape), rand_f32(gen, *shape)
        loss, d = cuda.mse(cuda.asarray(p), cuda.asarray(t), loss=nan_filled(cuda, ()),
                           dpred=nan_filled(cuda, shape))
        wl, wd = cpu.mse(p.astype(np.float64), t.astype(np.float64))
        assert rel_err(cuda.to_numpy(loss), wl) <= 1e-6
        assert rel_err(cuda.to_numpy(d), wd) <= ELEMENTWISE_TOL


# ----------------------------------------------------------------------------- elementwise
@pytest.mark.parametrize("kind", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize("shape", [(1,), (7, 33), (127, 1000)])
def test_activations(kind: str, shape: tuple[int, ...]) -> None:
    cuda, cpu = backends()
    gen = np.random.default_rng(len(shape))
    x, dy = rand_f32(gen, *shape, scale=2.0), rand_f32(gen, *shape)
    y = cuda.activation_fwd(kind, cuda.asarray(x), out=nan_filled(cuda, shape))
    y_ref = cpu.activation_fwd(kind, x.astype(np.float64))
    assert rel_err(cuda.to_numpy(y), y_ref) <= ELEMENTWISE_TOL
    y32 = cuda.to_numpy(y)  # the backward reads the GPU's own y
    dx = cuda.activation_bwd(kind, y, cuda.asarray(dy), out=nan_filled(cuda, shape))
    dx_ref = cpu.activation_bwd(kind, y32.astype(np.float64), dy.astype(np.float64))
    assert rel_err(cuda.to_numpy(dx), dx_ref) <= ELEMENTWISE_TOL
    x_d = cuda.asarray(x)  # in place: out = x
    assert cuda.activation_fwd(kind, x_d, out=x_d) is x_d
    assert rel_err(cuda.to_numpy(x_d), y_ref) <= ELEMENTWISE_TOL


@pytest.mark.parametrize("n,offset", [(1, 0), (7, 3), (4097, 123456789), (1000, 2**40)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout_mask_is_bit_identical_to_rng(n: int, offset: int, p: float) -> None:
    cuda, cpu = backends()
    gen = np.random.default_rng(n)
    x, dy = rand_f32(gen, n), rand_f32(gen, n)
    seed = 0xDEADBEEF12345678
    y, mask = cuda.dropout_fwd(cuda.asarray(x), p, seed, offset, out=nan_filled(cuda, (n,)))
    want_mask = rng.keep_mask(seed, offset, n, p)
    np.testing.assert_array_equal(cuda.to_numpy(mask), want_mask)
    y_ref, _ = cpu.dropout_fwd(x.astype(np.float64), p, seed, offset)
    assert rel_err(cuda.to_numpy(y), y_ref) <= ELEMENTWISE_TOL
    dx = cuda.dropout_bwd(cuda.asarray(dy), mask, p, out=nan_filled(cuda, (n,)))
    dx_ref = cpu.dropout_bwd(dy.astype(np.float64), want_mask, p)
    assert rel_err(cuda.to_numpy(dx), dx_ref) <= ELEMENTWISE_TOL


@pytest.mark.parametrize("shape", [(1, 1), (1000, 33), (7, 4097), (3, 5, 7, 9), (1, 1, 1, 1), (64, 32, 14, 14)])
def test_bias_grad(shape: tuple[int, ...]) -> None:
    cuda, cpu = backends()
    dy = rand_f32(np.random.default_rng(sum(shape)), *shape)
    got = cuda.bias_grad(cuda.asarray(dy), out=nan_filled(cuda, (shape[1],)))
    want = cpu.bias_grad(dy.astype(np.float64))
    # float32 sums of N * H * W terms: the gemm bound with K = that count
    assert rel_err(cuda.to_numpy(got), want) <= gemm_tol(dy.size // shape[1])
    again = cuda.bias_grad(cuda.asarray(dy))
    np.testing.assert_array_equal(cuda.to_numpy(again), cuda.to_numpy(got))  # deterministic


def test_add_and_scale() -> None:
    cuda, _ = backends()
    gen = np.random.default_rng(6)
    a, b = rand_f32(gen, 33, 127), rand_f32(gen, 33, 127)
    d = cuda.asarray(a)
    cuda.add_(d, cuda.asarray(b), alpha=-0.5)
    assert rel_err(cuda.to_numpy(d), a.astype(np.float64) - 0.5 * b) <= ELEMENTWISE_TOL
    cuda.scale_(d, 3.0)
    cuda.scale_(d, cuda.asarray(np.float32(0.25)))
    assert rel_err(cuda.to_numpy(d), 0.75 * (a.astype(np.float64) - 0.5 * b)) <= ELEMENTWISE_TOL


def test_global_norm() -> None:
    cuda, cpu = backends()
    gen = np.random.default_rng(7)
    arrays = [rand_f32(gen, *s) for s in [(7, 33), (1,), (4097,), (1000, 3)]]
    got = cuda.global_norm([cuda.asarray(a) for a in arrays])
    want = cpu.global_norm([a.astype(np.float64) for a in arrays])
    assert rel_err(cuda.to_numpy(got), want) <= 1e-6  # double accumulation: one final rounding


@pytest.mark.parametrize("max_norm", [0.5, 1e4])
def test_clip_grad_norm(max_norm: float) -> None:
    cuda, cpu = backends()
    gen = np.random.default_rng(9)
    arrays = [rand_f32(gen, *s) for s in [(7, 33), (1,), (1000, 3)]]
    dev = [cuda.asarray(a) for a in arrays]
    ref = [a.astype(np.float64) for a in arrays]
    norm = cuda.clip_grad_norm_(dev, max_norm)
    want_norm = cpu.clip_grad_norm_(ref, max_norm)
    assert rel_err(cuda.to_numpy(norm), want_norm) <= 1e-6
    for d, r in zip(dev, ref):
        assert rel_err(cuda.to_numpy(d), r) <= ELEMENTWISE_TOL


def test_gather_batch() -> None:
    cuda, cpu = backends()
    gen = np.random.default_rng(8)
    images = gen.integers(0, 256, (1000, 1, 28, 28)).astype(np.uint8)
    for label_dtype in (np.uint8, np.int32, np.int64):
        labels = gen.integers(0, 10, 1000).astype(label_dtype)
        for index_dtype in (np.int32, np.int64):
            idx = gen.permutation(1000)[:33].astype(index_dtype)
            x, y = cuda.gather_batch(cuda.asarray(images), cuda.asarray(labels), cuda.asarray(idx),
                                     mean=0.2860, std=0.3530, out_x=nan_filled(cuda, (33, 1, 28, 28)))
            wx, wy = cpu.gather_batch(images, labels, idx, mean=0.2860, std=0.3530)
            assert rel_err(cuda.to_numpy(x), wx) <= ELEMENTWISE_TOL
            np.testing.assert_array_equal(cuda.to_numpy(y), wy)
            assert cuda.to_numpy(y).dtype == np.int32


# ----------------------------------------------------------------------------- optimizers
PARAM_SHAPES = [(7, 33), (33,), (1,), (1000, 3)]


def _param_sets(n_state: int, seed: int):
    gen = np.random.default_rng(seed)
    host = [[rand_f32(gen, *s) for s in PARAM_SHAPES] for _ in range(2)]
    host += [[np.abs(rand_f32(gen, *s)) * 0.1 for s in PARAM_SHAPES] for _ in range(n_state)]
    cuda, cpu = backends()
    return ([[cuda.asarray(a) for a in group] for group in host],
            [[cpu.asarray(a.astype(np.float64)) for a in group] for group in host], host[0])


@pytest.mark.parametrize(
    "method,n_state,kwargs",
    [
        ("sgd_step", 0, dict(lr=0.1, weight_decay=0.01)),
        ("momentum_step", 1, dict(lr=0.05, momentum=0.9, nesterov=False, weight_decay=0.001)),
        ("momentum_step", 1, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.0)),
        ("adam_step", 2, dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=False)),
        ("adam_step", 2, dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True)),
        ("rmsprop_step", 1, dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.001)),
    ],
)
def test_optimizer_steps(method: str, n_state: int, kwargs: dict) -> None:
    dev, ref, p0 = _param_sets(n_state, seed=n_state)
    cuda, cpu = backends()
    for step in (1, 2, 3):  # several steps: the state must be carried over correctly
        extra = {"step": step} if method == "adam_step" else {}
        getattr(cuda, method)(*dev, **kwargs, **extra)
        getattr(cpu, method)(*ref, **kwargs, **extra)
    steps = 3
    for i, (pd, pr, start) in enumerate(zip(dev[0], ref[0], p0, strict=True)):
        # The update itself (a few float32 roundings) is held to 1e-5 of its size; on top of that
        # the parameter is stored in float32, so each step rounds p by up to u |p|, which for
        # Adam's ~1e-3-sized steps is a large fraction of the change.
        got = cuda.to_numpy(pd).astype(np.float64)
        allowed = 1e-5 * np.linalg.norm(pr - start) + 2 * steps * U32 * np.linalg.norm(pr)
        assert np.linalg.norm(got - pr) <= allowed, f"params[{i}]"
    for s, (sd, sr) in enumerate(zip(dev[2:], ref[2:], strict=True)):
        for i in range(len(PARAM_SHAPES)):
            assert rel_err(cuda.to_numpy(sd[i]), sr[i]) <= 1e-5, f"state {s}[{i}]"


def test_describe_names_gpu_and_cupy() -> None:
    cuda, _ = backends()
    text = cuda.describe()
    assert text.startswith("cuda:") and "CuPy" in text and "sm_" in text
