"""The tensor-core GEMM (kernels/gemm_tc.cu: TF32 / BF16 mma.sync, FP32 sums) against
CpuBackend(float64) with the same precision, i.e. the same operand rounding (cvt.rna to tf32,
round-to-nearest-even to bf16, gpuml/backend/cpu/precision.py) and exact sums. The operands then
agree bit for bit, so the bound is the FP32 summation bound of gemm_tol(K); a kernel that skipped
or changed the rounding (the mma reads only the top bits: truncation) is off by ~2^-11 (tf32) or
~2^-8 (bf16) relative and fails it. Shapes are not tile multiples, outputs start as NaN; shapes
with leading dimensions % 4 == 0 take the 16-byte cp.async and ldmatrix paths, the others the
4-byte copies. Under --cuda-emulator the warp-level instructions are mma_emu.h's model.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpuml.backend.cpu.precision import round_operand
from tests.gpu_util import GPU, gemm_tol, nan_filled, rel_err

pytestmark = GPU

#: relative size of one operand rounding: half an ulp of the format's 10 / 7 mantissa bits
ROUNDING = {"tf32": 2.0**-11, "bf16": 2.0**-8}
SHAPES = [(130, 70, 50), (64, 136, 40), (1, 9, 3), (129, 33, 0)]
TRANS = [(False, False), (False, True), (True, False), (True, True)]


def _backends(precision: str):
    from gpuml.backend.cpu import CpuBackend
    from gpuml.backend.cuda import CudaBackend

    cuda, cpu = CudaBackend(), CpuBackend(dtype="float64")
    cuda.set_precision(precision)
    cpu.set_precision(precision)
    return cuda, cpu


def _rand(gen: np.random.Generator, *shape: int) -> np.ndarray:
    return gen.standard_normal(shape).astype(np.float32)


def _matmul_case(precision: str, M: int, N: int, K: int, trans_a: bool, trans_b: bool) -> None:
    cuda, cpu = _backends(precision)
    gen = np.random.default_rng(M * 131 + N * 7 + K)
    a = _rand(gen, *((K, M) if trans_a else (M, K)))
    b = _rand(gen, *((N, K) if trans_b else (K, N)))
    bias = _rand(gen, N)
    kw = dict(trans_a=trans_a, trans_b=trans_b)
    out = nan_filled(cuda, (M, N))
    got = cuda.matmul(cuda.asarray(a), cuda.asarray(b), bias=cuda.asarray(bias), activation="relu", out=out, **kw)
    assert got is out
    want = cpu.matmul(a.astype(np.float64), b.astype(np.float64), bias=bias.astype(np.float64), activation="relu", **kw)
    assert rel_err(cuda.to_numpy(got), want) <= gemm_tol(K)
    if K >= 40:  # the rounding is really there: the unrounded FP32 product is further off
        exact = np.maximum((a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b) + bias, 0)
        err = rel_err(cuda.to_numpy(got), exact)
        assert gemm_tol(K) < err <= 4 * ROUNDING[precision]


@pytest.mark.parametrize("trans_a,trans_b", TRANS, ids=["nn", "nt", "tn", "tt"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_matmul_tf32_matches_rounded_reference(M: int, N: int, K: int, trans_a: bool, trans_b: bool) -> None:
    _matmul_case("tf32", M, N, K, trans_a, trans_b)


@pytest.mark.parametrize("trans_a,trans_b", TRANS, ids=["nn", "nt", "tn", "tt"])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_matmul_bf16_matches_rounded_reference(M: int, N: int, K: int, trans_a: bool, trans_b: bool) -> None:
    _matmul_case("bf16", M, N, K, trans_a, trans_b)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_matmul_tf32_bf16_fused_epilogues(precision: str) -> None:
    """accumulate, relu_mask (ReLU backward into dx) and col_sums (bias gradient next to dW), the
    sums in FP32 from the unrounded operand as gemm.cu computes them."""
    cuda, cpu = _backends(precision)
    gen = np.random.default_rng(3)
    M, N, K = 70, 130, 36
    x, dy, c0, mask = _rand(gen, K, M), _rand(gen, K, N), _rand(gen, M, N), _rand(gen, M, N)
    out = cuda.asarray(c0)
    cuda.matmul(cuda.asarray(x), cuda.asarray(dy), trans_a=True, accumulate=True, out=out)
    want = cpu.matmul(x.astype(np.float64), dy.astype(np.float64), trans_a=True, accumulate=True,
                      out=c0.astype(np.float64))
    assert rel_err(cuda.to_numpy(out), want) <= gemm_tol(K)
    sums = nan_filled(cuda, (N,))
    out = nan_filled(cuda, (M, N))
    cuda.matmul(cuda.asarray(x), cuda.asarray(dy), trans_a=True, relu_mask=cuda.asarray(mask), col_sums=sums, out=out)
    sums_c = np.empty(N)
    want = cpu.matmul(x.astype(np.float64), dy.astype(np.float64), trans_a=True, relu_mask=mask.astype(np.float64),
                      col_sums=sums_c)
    assert rel_err(cuda.to_numpy(out), want) <= gemm_tol(K)
    assert rel_err(cuda.to_numpy(sums), dy.astype(np.float64).sum(axis=0)) <= gemm_tol(M)


def test_cpu_reference_rounds_like_the_kernels() -> None:
    """tf32 ties go away from zero (cvt.rna), bf16 ties to even; Inf/NaN kept, overflow to Inf."""
    one = np.float32(1.0)
    tie_tf32 = np.float32(1.0 + 2.0**-11)  # exactly halfway between two tf32 values
    tie_bf16 = np.float32(1.0 + 2.0**-8)   # halfway, below it the even neighbour 1.0
    x = np.array([tie_tf32, -tie_tf32, np.inf, np.nan, np.finfo(np.float32).max], dtype=np.float32)
    r = round_operand(x, "tf32")
    assert r[0] == one + np.float32(2.0**-10) and r[1] == -(one + np.float32(2.0**-10))
    assert r[2] == np.inf and np.isnan(r[3]) and r[4] == np.inf
    b = round_operand(np.array([tie_bf16, 1.0 + 3 * 2.0**-8, np.nan], dtype=np.float32), "bf16")
    assert b[0] == one and b[1] == np.float32(1.0 + 2**-6) and np.isnan(b[2])
