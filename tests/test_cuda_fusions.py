"""The fused forms of the CUDA ops (issue 9, fewer launches per step) against CpuBackend(float64)
running the same fused op, and against the unfused ops they replace: the ReLU-backward mask in
the GEMM epilogue, the bias gradient (column sums) in the dW GEMM and in conv2d_bwd_weight, the
ReLU mask in the conv backward gathers, split-K reduced in one launch, the loss/accuracy
accumulation in softmax_xent, the clip factor read by the optimizer kernels. Random shapes that
are no tile multiples, NaN-filled outputs, the float32 bounds of tests/gpu_util.py."""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu_util import GPU, backends, gemm_tol, nan_filled, rel_err

pytestmark = GPU


def _rand(gen: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (gen.standard_normal(shape) * scale).astype(np.float32)


def _both(x: np.ndarray):
    cuda, cpu = backends()
    return cuda.asarray(x), cpu.asarray(x.astype(np.float64))


# ----------------------------------------------------------------------------- GEMM epilogues
# (M, N, K): the seed MLP's dx / dW shapes (split-K in one launch, no split), ragged small
# tiles, a split with ragged edges, and the 128x128 kernels (scalar and float4).
FUSED_SHAPES = [
    (32, 1024, 1024), (1024, 10, 32), (784, 1024, 32), (7, 33, 5), (33, 70, 1000), (1, 129, 4000),
    (1500, 1409, 33), (1536, 1540, 68),
]  # fmt: skip


@pytest.mark.parametrize("trans_a,trans_b", [(False, True), (True, False), (False, False), (True, True)])
@pytest.mark.parametrize("M,N,K", FUSED_SHAPES)
def test_matmul_relu_mask_and_col_sums(M: int, N: int, K: int, trans_a: bool, trans_b: bool) -> None:
    cuda, cpu = backends()
    gen = np.random.default_rng(M * 131 + N * 17 + K)
    a = _rand(gen, *((K, M) if trans_a else (M, K)))
    b = _rand(gen, *((N, K) if trans_b else (K, N)))
    mask = _rand(gen, M, N)  # about half the entries > 0
    a_d, a_c = _both(a)
    b_d, b_c = _both(b)
    mask_d, mask_c = _both(mask)
    kw = dict(trans_a=trans_a, trans_b=trans_b)
    out, sums = nan_filled(cuda, (M, N)), nan_filled(cuda, (N,))
    got = cuda.matmul(a_d, b_d, relu_mask=mask_d, col_sums=sums, out=out, **kw)
    want_sums = np.zeros(N)
    want = cpu.matmul(a_c, b_c, relu_mask=mask_c, col_sums=want_sums, **kw)
    assert got is out
    # the reference fused op is the unfused pair of ops
    unfused = cpu.activation_bwd("relu", mask_c, cpu.matmul(a_c, b_c, **kw))
    np.testing.assert_array_equal(want, unfused)
    np.testing.assert_array_equal(want_sums, cpu.bias_grad(np.ascontiguousarray(b_c.T if trans_b else b_c)))
    got_h = cuda.to_numpy(got)
    assert np.all(got_h[mask <= 0] == 0.0)
    assert rel_err(got_h, want) <= gemm_tol(K)
    assert rel_err(cuda.to_numpy(sums), want_sums) <= gemm_tol(K)


@pytest.mark.parametrize("M,N,K", [(32, 1024, 784), (32, 10, 1024), (33, 70, 1000)])
def test_split_k_in_one_launch_is_deterministic(M: int, N: int, K: int) -> None:
    """The split-K shapes reduce in the GEMM's own launch, with the same bits on every call,
    bias and ReLU applied once, after the slices are added."""
    from gpuml.backend.cuda import launch

    cuda, cpu = backends()
    assert launch.gemm_plan(M, N, K, False, False, False).splits > 1
    gen = np.random.default_rng(K)
    a, b, bias = _rand(gen, M, K), _rand(gen, K, N), _rand(gen, N)
    a_d, a_c = _both(a)
    b_d, b_c = _both(b)
    bias_d, bias_c = _both(bias)
    before = cuda.launch_count
    first = cuda.to_numpy(cuda.matmul(a_d, b_d, bias=bias_d, activation="relu", out=nan_filled(cuda, (M, N))))
    assert cuda.launch_count - before == 1
    again = cuda.to_numpy(cuda.matmul(a_d, b_d, bias=bias_d, activation="relu", out=nan_filled(cuda, (M, N))))
    np.testing.assert_array_equal(first, again)
    assert rel_err(first, cpu.matmul(a_c, b_c, bias=bias_c, activation="relu")) <= gemm_tol(K)


# ----------------------------------------------------------------------------- softmax_xent
@pytest.mark.parametrize("B,K", [(1, 10), (33, 10), (1000, 10), (7, 1023), (7, 32000), (3, 32001)])
@pytest.mark.parametrize("alias", [False, True])
def test_softmax_xent_accumulates_loss_sum_and_correct_count(B: int, K: int, alias: bool) -> None:
    """One launch: dlogits, the mean loss, acc[0] += B * loss and acc[1] += correct, with ties
    (first max wins) and rows whose label is the argmax; equal to the CPU backend's fused op
    and to the separate count_correct / add_ it replaces."""
    cuda, cpu = backends()
    gen = np.random.default_rng(B + K)
    logits = _rand(gen, B, K, scale=3.0)
    labels = gen.integers(0, K, B).astype(np.int32)
    logits[: B // 2, 0] = logits[: B // 2].max(axis=1) + 1.0  # some rows predict class 0 ...
    labels[: B // 3] = 0  # ... and some of those are labelled 0
    if K > 2:
        logits[-1, 1] = logits[-1, 2] = logits[-1].max() + 1.0  # a tie: class 1 wins
        labels[-1] = 1
    acc0 = np.array([2.5, 7.0], np.float32)
    want_acc = acc0.astype(np.float64)
    want_loss, want_d = cpu.softmax_xent(logits.astype(np.float64), labels, label_smoothing=0.1,
                                         accumulate=want_acc)
    correct = int(np.count_nonzero(np.argmax(logits, axis=1) == labels))
    assert want_acc[1] == acc0[1] + correct
    np.testing.assert_allclose(want_acc[0], float(acc0[0]) + B * float(want_loss), rtol=1e-12)

    x, acc = cuda.asarray(logits), cuda.asarray(acc0)
    d_out = x if alias else nan_filled(cuda, (B, K))
    before = cuda.launch_count
    loss, d = cuda.softmax_xent(x, cuda.asarray(labels), label_smoothing=0.1, loss=nan_filled(cuda, ()),
                                dlogits=d_out, accumulate=acc)
    assert cuda.launch_count - before == 1
    got_acc = cuda.to_numpy(acc)
    assert got_acc[1] == want_acc[1]
    assert rel_err(cuda.to_numpy(loss), want_loss) <= 1e-5
    assert rel_err(got_acc[0], want_acc[0]) <= 1e-5
    assert rel_err(cuda.to_numpy(d), want_d) <= gemm_tol(K)


# ----------------------------------------------------------------------------- layer stacks
def _grads(backend, layers, x: np.ndarray, dy: np.ndarray) -> list[np.ndarray]:
    from gpuml.nn.model import Sequential

    model = Sequential(layers).build(x.shape[1:], backend, seed=3)
    out = model.forward_buffered(backend.asarray(x.astype(backend.dtype)), training=True)
    assert out.shape == dy.shape
    model.backward(backend.asarray(dy.astype(backend.dtype)))
    return model, [backend.to_numpy(g) for _, _, g in model.named_parameters()]


def test_dense_relu_stack_fuses_the_relu_backward_and_bias_gradient() -> None:
    """Dense(relu) -> Dense(relu) -> Dense: the upper layers' dx GEMMs apply the ReLU mask of the
    layer below and the dW GEMMs write db, so backward launches 2 GEMMs per layer (1 for the
    first) and nothing else; the gradients match the float64 reference."""
    from gpuml.nn.layers import Dense

    cuda, cpu = backends()
    gen = np.random.default_rng(11)
    x, dy = _rand(gen, 13, 45), _rand(gen, 13, 10)

    def stack():
        return [Dense(37, activation="relu"), Dense(29, activation="relu"), Dense(10)]

    model, got = _grads(cuda, stack(), x, dy)
    assert [layer.relu_grad_fused for layer in model.layers] == [True, True, False]
    before = cuda.launch_count
    model.backward(cuda.asarray(dy))
    assert cuda.launch_count - before == 5
    _, want = _grads(cpu, stack(), x, dy)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= gemm_tol(45)
