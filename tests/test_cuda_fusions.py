"""The fused forms of the CUDA ops (issue 9, fewer launches per step) against CpuBackend(float64)
running the same fused op, and against the unfused ops they replace: the ReLU-backward mask in
the GEMM epilogue, the bias gradient (column sums) in the dW GEMM and in conv2d_bwd_weight, the
ReLU mask in the conv backward gathers, split-K reduced in one launch, the loss/accuracy
accumulation in softmax_xent, the clip factor read by the optimizer kernels. Random shapes that
are no tile multiples, NaN-filled outputs, the float32 bounds of tests/gpu_util.py."""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu_util import GPU, backends, gemm_tol, nan_filled, on_both, rand_f32, rel_err

pytestmark = GPU




# ----------------------------------------------------------------------------- GEMM epilogues
# (M, N, K): the seed MLP's dx / dW shapes (split-K in one launch, no split), ragged small
# tiles, a split with ragged edges, the 64x64 tile split 2-way (slices of 144 and 116), and the
# 128x128 tile (scalar and float4 stores).
FUSED_SHAPES = [
    (32, 1024, 1024), (1024, 10, 32), (784, 1024, 32), (7, 33, 5), (33, 70, 1000), (1, 129, 4000),
    (520, 1030, 260), (1500, 1409, 33), (1536, 1540, 68),
]  # fmt: skip


@pytest.mark.parametrize("trans_a,trans_b", [(False, True), (True, False), (False, False), (True, True)])
@pytest.mark.parametrize("M,N,K", FUSED_SHAPES)
def test_matmul_relu_mask_and_col_sums(M: int, N: int, K: int, trans_a: bool, trans_b: bool) -> None:
    cuda, cpu = backends()
    gen = np.random.default_rng(M * 131 + N * 17 + K)
    a = rand_f32(gen, *((K, M) if trans_a else (M, K)))
    b = rand_f32(gen, *((N, K) if trans_b else (K, N)))
    mask = rand_f32(gen, M, N)  # about half the entries > 0
    a_d, a_c = on_both(a)
    b_d, b_c = on_both(b)
    mask_d, mask_c = on_both(mask)
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
    assert launch.gemm_plan(M, N, K, False, False).splits > 1
    gen = np.random.default_rng(K)
    a, b, bias = rand_f32(gen, M, K), rand_f32(gen, K, N), rand_f32(gen, N)
    a_d, a_c = on_both(a)
    b_d, b_c = on_both(b)
    bias_d, bias_c = on_both(bias)
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
    logits = rand_f32(gen, B, K, scale=3.0)
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
    x, dy = rand_f32(gen, 13, 45), rand_f32(gen, 13, 10)

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


# ----------------------------------------------------------------------------- conv backward
# (x shape, w shape, stride, padding): the seed CNN's two layers (their bwd_weight splits the
# N*P*Q reduction: one launch with the slices added by the last block), two channel tiles, and
# an odd strided one-split case.
CONV_FUSED_CASES = [
    ((9, 1, 28, 28), (32, 1, 3, 3), (1, 1), (0, 0)),
    ((11, 32, 13, 13), (64, 32, 3, 3), (1, 1), (0, 0)),
    ((2, 5, 20, 9), (70, 5, 3, 2), (1, 1), (1, 0)),
    ((3, 3, 11, 9), (7, 3, 3, 5), (2, 1), (1, 2)),
]


@pytest.mark.parametrize("case", CONV_FUSED_CASES)
def test_conv_backward_with_relu_mask_and_bias_gradient(case: tuple) -> None:
    """conv2d_bwd_weight(relu_mask=y, db=) and conv2d_bwd_data(relu_mask=y): each ONE launch,
    equal to activation_bwd + conv backward + bias_grad on the float64 reference."""
    from gpuml.backend.base import conv_out_size
    from gpuml.backend.cuda import conv as cuda_conv

    cuda, cpu = backends()
    x_shape, w_shape, stride, padding = case
    y_shape = (x_shape[0], w_shape[0], conv_out_size(x_shape[2], w_shape[2], stride[0], padding[0]),
               conv_out_size(x_shape[3], w_shape[3], stride[1], padding[1]))
    gen = np.random.default_rng(sum(x_shape) + sum(w_shape))
    x, w, dy, y = rand_f32(gen, *x_shape), rand_f32(gen, *w_shape), rand_f32(gen, *y_shape), rand_f32(gen, *y_shape)
    (x_d, x_c), (w_d, w_c), (dy_d, dy_c), (y_d, y_c) = (on_both(a) for a in (x, w, dy, y))

    dw, db = nan_filled(cuda, w_shape), nan_filled(cuda, (w_shape[0],))
    before = cuda.launch_count
    cuda.conv2d_bwd_weight(x_d, dy_d, w_shape, stride, padding, relu_mask=y_d, db=db, out=dw)
    dx = cuda.conv2d_bwd_data(dy_d, w_d, x_shape, stride, padding, relu_mask=y_d, out=nan_filled(cuda, x_shape))
    assert cuda.launch_count - before == 2

    want_db = np.zeros(w_shape[0])
    want_dw = cpu.conv2d_bwd_weight(x_c, dy_c, w_shape, stride, padding, relu_mask=y_c, db=want_db)
    want_dx = cpu.conv2d_bwd_data(dy_c, w_c, x_shape, stride, padding, relu_mask=y_c)
    dz = cpu.activation_bwd("relu", y_c, dy_c)  # the unfused ops give the same reference
    np.testing.assert_array_equal(want_dw, cpu.conv2d_bwd_weight(x_c, dz, w_shape, stride, padding))
    np.testing.assert_array_equal(want_db, cpu.bias_grad(dz))
    np.testing.assert_array_equal(want_dx, cpu.conv2d_bwd_data(dz, w_c, x_shape, stride, padding))

    terms = int(np.prod(y_shape)) // w_shape[0]
    assert rel_err(cuda.to_numpy(dw), want_dw) <= gemm_tol(terms)
    assert rel_err(cuda.to_numpy(db), want_db) <= gemm_tol(terms)
    assert rel_err(cuda.to_numpy(dx), want_dx) <= gemm_tol(w_shape[0] * w_shape[2] * w_shape[3])
    # deterministic: the split slices are added in a fixed order, not in arrival order
    g = cuda_conv.conv_geometry("t", x_shape, w_shape, stride, padding)
    if cuda_conv.conv_bwd_weight_plan(g).splits > 1:
        again = nan_filled(cuda, w_shape)
        cuda.conv2d_bwd_weight(x_d, dy_d, w_shape, stride, padding, relu_mask=y_d, db=db, out=again)
        np.testing.assert_array_equal(cuda.to_numpy(again), cuda.to_numpy(dw))


def test_cnn_stack_fuses_relu_backward_and_bias_gradient_into_the_conv_kernels() -> None:
    """conv(relu) -> maxpool -> conv(relu) -> flatten -> dense: no activation_bwd or bias_grad
    launch in backward, and the gradients match the float64 reference."""
    from gpuml.nn.layers import Conv2D, Dense, Flatten, MaxPool2D

    cuda, cpu = backends()
    gen = np.random.default_rng(12)
    x, dy = rand_f32(gen, 3, 2, 12, 11), rand_f32(gen, 3, 5)

    def stack():
        return [Conv2D(6, 3, activation="relu"), MaxPool2D(2), Conv2D(7, 3, padding=1, activation="relu"),
                Flatten(), Dense(5)]

    model, got = _grads(cuda, stack(), x, dy)
    before = cuda.launch_count
    model.backward(cuda.asarray(dy))
    # dense dW+db, dense dx, conv2 dW+db, conv2 dx, pool bwd, conv1 dW+db
    assert cuda.launch_count - before == 6
    _, want = _grads(cpu, stack(), x, dy)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= gemm_tol(3 * 10 * 9)


# ----------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping, and a factor of exactly 1
@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam", "rmsprop"])
def test_clip_factor_read_inside_the_optimizer_kernel(opt: str, max_norm: float) -> None:
    """grad_clip_factor (one launch: norm and factor) + step(grad_scale=factor) (one launch)
    gives the same bits as clip_grad_norm_ (scaling the gradients in place) + step, and the
    float64 reference's numbers; the gradients are left unscaled."""
    cuda, cpu = backends()
    gen = np.random.default_rng(len(opt))
    shapes = [(37, 11), (11,), (5, 3, 3, 3), (1,)]
    params = [rand_f32(gen, *s) for s in shapes]
    grads = [rand_f32(gen, *s) for s in shapes]
    kw = {"sgd": dict(lr=0.1), "momentum": dict(lr=0.1, momentum=0.9, nesterov=True),
          "adam": dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, step=3, weight_decay=0.01),
          "rmsprop": dict(lr=0.01, alpha=0.99, eps=1e-8)}[opt]
    n_state = {"sgd": 0, "momentum": 1, "adam": 2, "rmsprop": 1}[opt]

    def run(be, fused: bool):
        p = [be.asarray(a.astype(be.dtype)) for a in params]
        g = [be.asarray(a.astype(be.dtype)) for a in grads]
        state = [[be.zeros(a.shape) for a in params] for _ in range(n_state)]
        before = getattr(be, "launch_count", 0)
        if fused:
            norm, factor = be.grad_clip_factor(g, max_norm)
            getattr(be, f"{opt}_step")(p, g, *state, grad_scale=factor, **kw)
            assert getattr(be, "launch_count", 2) - before == 2
        else:
            norm = be.clip_grad_norm_(g, max_norm)
            getattr(be, f"{opt}_step")(p, g, *state, **kw)
        return float(be.to_numpy(norm)), [be.to_numpy(a) for a in p], [be.to_numpy(a) for a in g]

    norm, fused_p, fused_g = run(cuda, True)
    norm_unfused, unfused_p, _ = run(cuda, False)
    assert norm == norm_unfused
    for a, b in zip(fused_p, unfused_p, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fused_g, grads, strict=True):
        np.testing.assert_array_equal(a, b)  # the gradients themselves are not scaled
    want_norm, want_p, _ = run(cpu, True)
    assert rel_err(norm, want_norm) <= 1e-6
    for a, b in zip(fused_p, want_p, strict=True):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("B,K", [(1, 3), (1000, 10), (77, 1500)])
def test_count_correct_in_one_launch(B: int, K: int) -> None:
    """The per-block counts added by the last block: one launch over many blocks (1000 rows:
    125 blocks), the CPU backend's count (first max on ties)."""
    cuda, cpu = backends()
    gen = np.random.default_rng(B)
    logits = np.round(rand_f32(gen, B, K), 1)  # rounded: ties happen
    labels = gen.integers(0, K, B).astype(np.int32)
    before = cuda.launch_count
    got = cuda.count_correct(cuda.asarray(logits), cuda.asarray(labels), out=nan_filled(cuda, ()))
    assert cuda.launch_count - before == 1
    assert float(cuda.to_numpy(got)) == float(cpu.count_correct(logits.astype(np.float64), labels))
