"""Every conv kernel (kernels/conv_core.cuh: three ops x the CONV tile rows of gemm_tiles.h) in each
precision against CpuBackend(float64) in the same precision, through the fused forms the training
step uses (bias + ReLU forward; ReLU mask in both backward gathers; bias gradient with dw).

Each case is a shape the launcher maps to the named tile (asserted, so a table change cannot turn
the test into a duplicate), not a tile multiple, with strides and padding where the tile allows;
outputs start as NaN. In tf32 / bf16 the reference rounds the same operands as the kernels (x and
w forward, dz and w for dx, x and dz for dw; gpuml/backend/cpu/precision.py), so the operands agree
bit for bit and the bound is the FP32 summation bound gemm_tol(L) of tests/gpu_util.py, L the
reduction length; a kernel that skipped the rounding (the tf32 mma reads only the top bits) is off
by ~2^-11 or ~2^-8 relative and fails it, which the last check makes sure of on the unrounded
reference. The bias gradient is the FP32 sum of the unrounded dz in every precision.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu_util import GPU, gemm_tol, nan_filled, rand_f32, rel_err

pytestmark = GPU

#: relative size of one operand rounding: half an ulp of the format's 10 / 7 mantissa bits
ROUNDING = {"tf32": 2.0**-11, "bf16": 2.0**-8}
#: (op, tile) -> (x shape, w shape, stride, padding)
TILE_CASES = {
    ("fwd", "large"): ((2, 1, 66, 66), (65, 1, 3, 3), (1, 1), (0, 0)),  # 64 x 2 tiles of 128 x 64
    ("fwd", "medium"): ((2, 1, 66, 67), (20, 1, 3, 3), (1, 1), (0, 0)),  # 20 filters: 32 wide
    ("fwd", "small"): ((3, 3, 9, 8), (5, 3, 3, 2), (2, 1), (1, 0)),
    ("bwd_data", "large"): ((2, 65, 64, 64), (1, 65, 3, 3), (1, 1), (1, 1)),
    ("bwd_data", "medium"): ((2, 20, 64, 65), (3, 20, 3, 3), (1, 1), (1, 1)),
    ("bwd_data", "small"): ((3, 5, 9, 7), (4, 5, 3, 3), (2, 2), (1, 1)),  # stride holes
    ("bwd_weight", "large"): ((1, 456, 5, 5), (129, 456, 3, 3), (1, 1), (0, 0)),
    ("bwd_weight", "medium"): ((1, 228, 5, 6), (65, 228, 3, 3), (1, 1), (0, 1)),
    ("bwd_weight", "small"): ((4, 3, 20, 41), (8, 3, 3, 3), (1, 2), (1, 1)),  # N*P*Q split in 3
}
PRECISIONS = ["fp32", "tf32", "bf16"]


def _backends(precision: str):
    from gpuml.backend.cpu import CpuBackend
    from gpuml.backend.cuda import CudaBackend

    cuda, cpu = CudaBackend(), CpuBackend(dtype="float64")
    if precision != "fp32":
        cuda.set_precision(precision)
        cpu.set_precision(precision)
    return cuda, cpu


def _y_shape(x_shape: tuple, w_shape: tuple, stride: tuple, padding: tuple) -> tuple:
    (N, _, H, W), (K, _, R, S) = x_shape, w_shape
    return (N, K, (H + 2 * padding[0] - R) // stride[0] + 1, (W + 2 * padding[1] - S) // stride[1] + 1)


def _check(precision: str, got: np.ndarray, want: np.ndarray, exact: np.ndarray, terms: int) -> None:
    assert rel_err(got, want) <= gemm_tol(terms)
    if precision != "fp32" and terms >= 20:  # the rounding is really there: the FP32 operands are further off
        assert gemm_tol(terms) < rel_err(got, exact) <= 4 * ROUNDING[precision]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("op,tile", list(TILE_CASES), ids=[f"{o}-{t}" for o, t in TILE_CASES])
def test_conv_tile_matches_rounded_reference(op: str, tile: str, precision: str) -> None:
    from gpuml.backend.cpu import CpuBackend
    from gpuml.backend.cuda import conv as cuda_conv

    x_shape, w_shape, stride, padding = TILE_CASES[(op, tile)]
    g = cuda_conv.conv_geometry("t", x_shape, w_shape, stride, padding)
    plan = cuda_conv.conv_plan(op, g, precision)
    assert plan.kernel == f"conv2d_{op}_{precision}_{tile}"
    cuda, cpu = _backends(precision)
    exact_cpu = CpuBackend(dtype="float64")
    y_shape = _y_shape(*TILE_CASES[(op, tile)])
    gen = np.random.default_rng(sum(x_shape) * 7 + sum(w_shape))
    x, w, b = rand_f32(gen, *x_shape), rand_f32(gen, *w_shape), rand_f32(gen, w_shape[0])
    dy, y = rand_f32(gen, *y_shape), rand_f32(gen, *y_shape)  # y: the ReLU mask, about half > 0
    d = {k: cuda.asarray(v) for k, v in dict(x=x, w=w, b=b, dy=dy, y=y).items()}
    h = {k: v.astype(np.float64) for k, v in dict(x=x, w=w, b=b, dy=dy, y=y).items()}
    before = cuda.launch_count
    if op == "fwd":
        out = cuda.conv2d_fwd(d["x"], d["w"], d["b"], stride, padding, activation="relu", out=nan_filled(cuda, y_shape))
        args = (h["x"], h["w"], h["b"], stride, padding)
        want, exact = (be.conv2d_fwd(*args, activation="relu") for be in (cpu, exact_cpu))
        terms = int(np.prod(w_shape[1:])) + 1
    elif op == "bwd_data":
        out = cuda.conv2d_bwd_data(d["dy"], d["w"], x_shape, stride, padding, relu_mask=d["y"],
                                   out=nan_filled(cuda, x_shape))
        args = (h["dy"], h["w"], x_shape, stride, padding)
        want, exact = (be.conv2d_bwd_data(*args, relu_mask=h["y"]) for be in (cpu, exact_cpu))
        terms = w_shape[0] * w_shape[2] * w_shape[3]
    else:
        db = nan_filled(cuda, (w_shape[0],))
        out = cuda.conv2d_bwd_weight(d["x"], d["dy"], w_shape, stride, padding, relu_mask=d["y"], db=db,
                                     out=nan_filled(cuda, w_shape))
        args = (h["x"], h["dy"], w_shape, stride, padding)
        want_db, exact_db = np.zeros(w_shape[0]), np.zeros(w_shape[0])
        want = cpu.conv2d_bwd_weight(*args, relu_mask=h["y"], db=want_db)
        exact = exact_cpu.conv2d_bwd_weight(*args, relu_mask=h["y"], db=exact_db)
        terms = int(np.prod(y_shape)) // w_shape[0]
        np.testing.assert_array_equal(want_db, exact_db)  # db: the unrounded dz in every precision
        assert rel_err(cuda.to_numpy(db), want_db) <= gemm_tol(terms)
        if plan.splits > 1:  # the slices are added in a fixed order: the same bits again
            again = cuda.conv2d_bwd_weight(d["x"], d["dy"], w_shape, stride, padding, relu_mask=d["y"],
                                           out=nan_filled(cuda, w_shape))
            np.testing.assert_array_equal(cuda.to_numpy(again), cuda.to_numpy(out))
            before += 1
    assert cuda.launch_count - before == 1  # the fused op is one launch
    _check(precision, cuda.to_numpy(out), want, exact, terms)


def _random_cases(count: int, seed: int) -> list[tuple]:
    """Shapes that are no tile multiples, strides 1-2, padding 0-2, kernels 1-5 (as
    tests/test_cuda_conv_pool.py draws them)."""
    gen = np.random.default_rng(seed)
    cases: list[tuple] = []
    while len(cases) < count:
        R, S = (int(v) for v in gen.choice([1, 2, 3, 5], 2))
        stride, padding = tuple(int(v) for v in gen.integers(1, 3, 2)), tuple(int(v) for v in gen.integers(0, 3, 2))
        H, W = (int(v) for v in gen.integers(3, 21, 2))
        if H + 2 * padding[0] >= R and W + 2 * padding[1] >= S:
            N, C, K = int(gen.choice([1, 2, 3, 5])), int(gen.choice([1, 3, 4, 17])), int(gen.choice([1, 3, 8, 33, 65]))
            cases.append(((N, C, H, W), (K, C, R, S), stride, padding))
    return cases


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("case", _random_cases(5, seed=13))
def test_conv_tf32_bf16_random_shapes(case: tuple, precision: str) -> None:
    """fwd (bias + ReLU), bwd_data and bwd_weight (ReLU mask, bias gradient) in tf32 / bf16 on random
    shapes against the rounded-operand reference."""
    x_shape, w_shape, stride, padding = case
    cuda, cpu = _backends(precision)
    y_shape = _y_shape(*case)
    gen = np.random.default_rng(sum(x_shape) + sum(w_shape))
    x, w, b = rand_f32(gen, *x_shape), rand_f32(gen, *w_shape), rand_f32(gen, w_shape[0])
    dy, y = rand_f32(gen, *y_shape), rand_f32(gen, *y_shape)
    h = {k: v.astype(np.float64) for k, v in dict(x=x, w=w, b=b, dy=dy, y=y).items()}
    got = cuda.conv2d_fwd(cuda.asarray(x), cuda.asarray(w), cuda.asarray(b), stride, padding, activation="relu",
                          out=nan_filled(cuda, y_shape))
    want = cpu.conv2d_fwd(h["x"], h["w"], h["b"], stride, padding, activation="relu")
    assert rel_err(cuda.to_numpy(got), want) <= gemm_tol(int(np.prod(w_shape[1:])) + 1)
    got = cuda.conv2d_bwd_data(cuda.asarray(dy), cuda.asarray(w), x_shape, stride, padding, relu_mask=cuda.asarray(y),
                               out=nan_filled(cuda, x_shape))
    want = cpu.conv2d_bwd_data(h["dy"], h["w"], x_shape, stride, padding, relu_mask=h["y"])
    assert rel_err(cuda.to_numpy(got), want) <= gemm_tol(w_shape[0] * w_shape[2] * w_shape[3])
    db, want_db = nan_filled(cuda, (w_shape[0],)), np.zeros(w_shape[0])
    got = cuda.conv2d_bwd_weight(cuda.asarray(x), cuda.asarray(dy), w_shape, stride, padding,
                                 relu_mask=cuda.asarray(y), db=db, out=nan_filled(cuda, w_shape))
    want = cpu.conv2d_bwd_weight(h["x"], h["dy"], w_shape, stride, padding, relu_mask=h["y"], db=want_db)
    terms = int(np.prod(y_shape)) // w_shape[0]
    assert rel_err(cuda.to_numpy(got), want) <= gemm_tol(terms)
    assert rel_err(cuda.to_numpy(db), want_db) <= gemm_tol(terms)
