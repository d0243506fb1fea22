"""Split-K in one launch with the blocks finishing in another order (emulator only).

The single-launch split-K reductions (the dense GEMM's slices, the conv weight gradient's slices,
their column sums and bias gradients) rely on the last block of each output tile to finish adding
the slices, whichever block that is. The CPU emulator runs blocks in order, so the block with the
highest z would always be the last; with GPUML_EMU_BLOCK_ORDER=reverse it runs them last to first
(tests/cuda_emulator/cuda_emu.h), and z = 0 finishes each tile. The results must be the same bits
as in order: the slices are added in z order by whichever block is last.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu_util import GPU, backends, gemm_tol, nan_filled, on_both, rand_f32, rel_err

pytestmark = GPU


@pytest.fixture(autouse=True)
def _emulator_only() -> None:
    import cupy

    if not cupy.__version__.endswith("cpu-emulator"):
        pytest.skip("the block order is a switch of the CPU emulator (run with --cuda-emulator)")


def _poison_workspaces(cuda) -> None:
    """NaN into every float scratch buffer (the split-K slices), so a block that read a slice
    before it was written this launch shows up instead of finding the last launch's values."""
    for buf in cuda.__dict__.get("_scratch_buffers", {}).values():
        if buf.dtype.kind == "f":
            buf.fill(np.nan)


def _both_orders(monkeypatch: pytest.MonkeyPatch, run, cuda) -> tuple[list[np.ndarray], list[np.ndarray]]:
    monkeypatch.delenv("GPUML_EMU_BLOCK_ORDER", raising=False)
    forward = run()
    _poison_workspaces(cuda)
    monkeypatch.setenv("GPUML_EMU_BLOCK_ORDER", "reverse")
    backward = run()
    monkeypatch.delenv("GPUML_EMU_BLOCK_ORDER")
    return forward, backward


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("M,N,K,trans_a,trans_b", [(32, 70, 1000, False, False), (40, 33, 900, True, False),
                                                   (33, 129, 700, False, True)])
def test_dense_split_k_with_blocks_in_reverse(monkeypatch: pytest.MonkeyPatch, precision: str, M: int, N: int,
                                              K: int, trans_a: bool, trans_b: bool) -> None:
    from gpuml.backend.cuda import launch

    cuda, cpu = backends()
    cuda.set_precision(precision)
    cpu.set_precision(precision)
    plan = (launch.gemm_plan(M, N, K, trans_a, trans_b) if precision == "fp32"
            else launch.gemm_tc_plan(M, N, K, trans_a, trans_b, precision))
    assert plan.splits > 1  # the case is a split one
    gen = np.random.default_rng(M + N + K)
    a = rand_f32(gen, *((K, M) if trans_a else (M, K)))
    b = rand_f32(gen, *((N, K) if trans_b else (K, N)))
    mask = rand_f32(gen, M, N)
    (a_d, a_c), (b_d, b_c), (m_d, m_c) = on_both(a), on_both(b), on_both(mask)
    kw = dict(trans_a=trans_a, trans_b=trans_b)

    def run() -> list[np.ndarray]:
        out, sums = nan_filled(cuda, (M, N)), nan_filled(cuda, (N,))
        cuda.matmul(a_d, b_d, relu_mask=m_d, col_sums=sums, out=out, **kw)
        return [cuda.to_numpy(out), cuda.to_numpy(sums)]

    try:
        forward, backward = _both_orders(monkeypatch, run, cuda)
        want_sums = np.zeros(N)
        want = cpu.matmul(a_c, b_c, relu_mask=m_c, col_sums=want_sums, **kw)
    finally:
        cuda.set_precision("fp32")
        cpu.set_precision("fp32")
    for f, r in zip(forward, backward, strict=True):
        np.testing.assert_array_equal(f, r)
    # the reference rounds the same operands, so the FP32 summation bound holds in every precision
    assert rel_err(backward[0], want) <= gemm_tol(K)
    assert rel_err(backward[1], want_sums) <= gemm_tol(K)


@pytest.mark.parametrize("precision", ["fp32", "tf32"])
@pytest.mark.parametrize("x_shape,w_shape,stride,padding", [((11, 32, 13, 13), (64, 32, 3, 3), (1, 1), (0, 0)),
                                                            ((6, 3, 20, 17), (5, 3, 3, 3), (2, 1), (1, 1))])
def test_conv_weight_gradient_split_with_blocks_in_reverse(monkeypatch: pytest.MonkeyPatch, precision: str,
                                                           x_shape, w_shape, stride, padding) -> None:
    from gpuml.backend.base import conv_out_size
    from gpuml.backend.cuda import conv as cuda_conv

    cuda, cpu = backends()
    g = cuda_conv.conv_geometry("t", x_shape, w_shape, stride, padding)
    assert cuda_conv.conv_bwd_weight_plan(g).splits > 1  # the case is a split one
    y_shape = (x_shape[0], w_shape[0], conv_out_size(x_shape[2], w_shape[2], stride[0], padding[0]),
               conv_out_size(x_shape[3], w_shape[3], stride[1], padding[1]))
    gen = np.random.default_rng(sum(x_shape))
    x, dy, y = rand_f32(gen, *x_shape), rand_f32(gen, *y_shape), rand_f32(gen, *y_shape)
    (x_d, x_c), (dy_d, dy_c), (y_d, y_c) = on_both(x), on_both(dy), on_both(y)
    cuda.set_precision(precision)
    cpu.set_precision(precision)

    def run() -> list[np.ndarray]:
        dw, db = nan_filled(cuda, w_shape), nan_filled(cuda, (w_shape[0],))
        cuda.conv2d_bwd_weight(x_d, dy_d, w_shape, stride, padding, relu_mask=y_d, db=db, out=dw)
        return [cuda.to_numpy(dw), cuda.to_numpy(db)]

    try:
        forward, backward = _both_orders(monkeypatch, run, cuda)
        want_db = np.zeros(w_shape[0])
        want_dw = cpu.conv2d_bwd_weight(x_c, dy_c, w_shape, stride, padding, relu_mask=y_c, db=want_db)
    finally:
        cuda.set_precision("fp32")
        cpu.set_precision("fp32")
    for f, r in zip(forward, backward, strict=True):
        np.testing.assert_array_equal(f, r)
    terms = int(np.prod(y_shape)) // w_shape[0]
    assert rel_err(backward[0], want_dw) <= gemm_tol(terms)
    assert rel_err(backward[1], want_db) <= gemm_tol(terms)
