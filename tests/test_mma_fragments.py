"""The warp-level instructions of kernels/mma.cuh against the PTX ISA's own fragment tables.

Each lane fills its fragment registers by the row/column formulas of PTX ISA 9.7.14.5.7 (mma.m16n8k8
.tf32) and 9.7.14.5.8 (mma.m16n8k16 .bf16), written out below a second time (shared with neither
the kernels nor the emulator's model, tests/cuda_emulator/mma_emu.h), with a distinct value in
every element; mma.sync must then return the plain matrix product, exactly (the values are small
integers, exact in tf32/bf16 and in every partial sum). On a GPU this checks the formulas against
the hardware; under --cuda-emulator it checks the emulator's model, so a kernel and the model
cannot agree on a wrong layout. A deliberately wrong layout must give a different product (the
test can fail). ldmatrix and cp.async are checked the same way; the claims only the emulator can
make (a copy lands at its wait, a missing lane fails the launch) run only there.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpuml.paths import kernel_dir

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")
EMULATED = cupy.__version__.endswith("cpu-emulator")

SOURCE = r"""
#include "mma.cuh"

// PTX ISA 9.7.14.5.7, .tf32 (groupID g = lane >> 2, threadID_in_group t = lane % 4):
//   A: row = g for a0, a2 and g + 8 for a1, a3; col = t for a0, a1 and t + 4 for a2, a3
//   B: row = t for b0 and t + 4 for b1; col = g
//   C/D: row = g for c0, c1 and g + 8 for c2, c3; col = 2 t + (i & 1)
// wrong = 1 swaps a1 and a2 (a wrong layout, which must change the product).
extern "C" __global__ void frag_tf32(const float* A, const float* B, const float* C, float* D, int wrong) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane % 4;
    const int a_row[4] = {g, g + 8, g, g + 8}, a_col[4] = {t, t, t + 4, t + 4};
    unsigned a[4], b[2];
    for (int i = 0; i < 4; ++i) {
        const int j = wrong && (i == 1 || i == 2) ? 3 - i : i;
        a[i] = gpuml_f32_to_tf32(A[a_row[j] * 8 + a_col[j]]);
    }
    b[0] = gpuml_f32_to_tf32(B[t * 8 + g]);
    b[1] = gpuml_f32_to_tf32(B[(t + 4) * 8 + g]);
    float acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = C[(i < 2 ? g : g + 8) * 8 + 2 * t + (i & 1)];
    gpuml_mma_m16n8k8_tf32(acc, a, b);
    for (int i = 0; i < 4; ++i) D[(i < 2 ? g : g + 8) * 8 + 2 * t + (i & 1)] = acc[i];
}

// PTX ISA 9.7.14.5.8, .bf16: A a0..a7 (two per register, low half first):
//   row = g for i in {0, 1, 4, 5}, else g + 8; col = 2 t + (i & 1), + 8 for i >= 4
//   B b0..b3: row = 2 t + (i & 1), + 8 for i >= 2; col = g
extern "C" __global__ void frag_bf16(const float* A, const float* B, const float* C, float* D) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane % 4;
    float ae[8], be[4];
    for (int i = 0; i < 8; ++i) {
        const int row = (i == 0 || i == 1 || i == 4 || i == 5) ? g : g + 8;
        const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
        ae[i] = A[row * 16 + col];
    }
    for (int i = 0; i < 4; ++i) be[i] = B[(2 * t + (i & 1) + (i >= 2 ? 8 : 0)) * 8 + g];
    unsigned a[4], b[2];
    for (int r = 0; r < 4; ++r) a[r] = gpuml_pack_bf16x2(ae[2 * r], ae[2 * r + 1]);
    for (int r = 0; r < 2; ++r) b[r] = gpuml_pack_bf16x2(be[2 * r], be[2 * r + 1]);
    float acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = C[(i < 2 ? g : g + 8) * 8 + 2 * t + (i & 1)];
    gpuml_mma_m16n8k16_bf16(acc, a, b);
    for (int i = 0; i < 4; ++i) D[(i < 2 ? g : g + 8) * 8 + 2 * t + (i & 1)] = acc[i];
}

// ldmatrix .x4: lane 8 j + i addresses row i of matrix j (four 8 x 16-byte matrices, 32 rows of
// four words); lane l receives word l % 4 of row l / 4 of matrix j in r[j].
extern "C" __global__ void frag_ldmatrix(const unsigned* M, unsigned* R) {
    __shared__ __align__(16) unsigned rows[32 * 4];
    for (int i = threadIdx.x; i < 128; i += 32) rows[i] = M[i];
    __syncthreads();
    unsigned r[4];
    gpuml_ldmatrix_x4(r, &rows[threadIdx.x * 4]);
    for (int j = 0; j < 4; ++j) R[threadIdx.x * 4 + j] = r[j];
}

// cp.async: 12 of 16 bytes copied (the rest zero-filled) in group 1, 16 bytes in group 2; the
// destination is read before any wait, after wait<1> (group 1 complete) and after wait<0>.
extern "C" __global__ void async_groups(const float* src, float* seen) {
    __shared__ __align__(16) float s[8];
    gpuml_cp_async_16(s, src, 12);
    gpuml_cp_async_commit();
    gpuml_cp_async_16(s + 4, src + 4, 16);
    gpuml_cp_async_commit();
    for (int i = 0; i < 8; ++i) seen[i] = s[i];
    gpuml_cp_async_wait<1>();
    for (int i = 0; i < 8; ++i) seen[8 + i] = s[i];
    gpuml_cp_async_wait<0>();
    for (int i = 0; i < 8; ++i) seen[16 + i] = s[i];
}

extern "C" __global__ void mma_missing_lane(float* D) {
    if (threadIdx.x == 31) return;
    unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    float acc[4] = {0, 0, 0, 0};
    gpuml_mma_m16n8k8_tf32(acc, a, b);
    D[threadIdx.x] = acc[0];
}
"""


@pytest.fixture(scope="module")
def module():
    return cupy.RawModule(code=SOURCE, options=("-std=c++17", f"-I{kernel_dir()}"))


def _run(module, name: str, *args, threads: int = 32) -> None:
    module.get_function(name)((1,), (threads,), args)


def _distinct(shape: tuple[int, int], start: int, sign: float = 1.0) -> np.ndarray:
    """Distinct small integers (exact in tf32 and bf16), shuffled so no layout maps to itself."""
    n = shape[0] * shape[1]
    vals = sign * np.arange(start, start + n, dtype=np.float32)
    return np.random.default_rng(start).permutation(vals).reshape(shape).astype(np.float32)


def test_mma_tf32_fragments_give_the_matrix_product(module) -> None:
    A, B, C = _distinct((16, 8), 1), _distinct((8, 8), 200, -1.0), _distinct((16, 8), 300)
    D = cupy.empty((16, 8), dtype=np.float32)
    _run(module, "frag_tf32", cupy.asarray(A), cupy.asarray(B), cupy.asarray(C), D, np.int32(0))
    expect = A.astype(np.float64) @ B + C
    np.testing.assert_array_equal(cupy.asnumpy(D), expect.astype(np.float32))


def test_mma_tf32_wrong_layout_is_caught(module) -> None:
    A, B, C = _distinct((16, 8), 1), _distinct((8, 8), 200, -1.0), _distinct((16, 8), 300)
    D = cupy.empty((16, 8), dtype=np.float32)
    _run(module, "frag_tf32", cupy.asarray(A), cupy.asarray(B), cupy.asarray(C), D, np.int32(1))
    assert not np.array_equal(cupy.asnumpy(D), (A.astype(np.float64) @ B + C).astype(np.float32))


def test_mma_bf16_fragments_give_the_matrix_product(module) -> None:
    # 1..256 and -1..-128 are exact in bf16 (8 significant bits); every partial sum < 2^24
    A, B, C = _distinct((16, 16), 1), _distinct((16, 8), 1, -1.0), _distinct((16, 8), 1000)
    D = cupy.empty((16, 8), dtype=np.float32)
    _run(module, "frag_bf16", cupy.asarray(A), cupy.asarray(B), cupy.asarray(C), D)
    expect = A.astype(np.float64) @ B + C
    np.testing.assert_array_equal(cupy.asnumpy(D), expect.astype(np.float32))


def test_ldmatrix_x4_fragments(module) -> None:
    M = np.arange(1000, 1128, dtype=np.uint32)  # 32 rows x 4 words, all distinct
    R = cupy.zeros((32, 4), dtype=np.uint32)
    _run(module, "frag_ldmatrix", cupy.asarray(M), R)
    rows = M.reshape(32, 4)
    lane = np.arange(32)
    expect = np.stack([rows[8 * j + lane // 4, lane % 4] for j in range(4)], axis=1)
    np.testing.assert_array_equal(cupy.asnumpy(R), expect)


def test_cp_async_zero_fills_and_completes_by_group(module) -> None:
    src = cupy.asarray(np.arange(1, 9, dtype=np.float32))
    seen = cupy.empty(24, dtype=np.float32)
    _run(module, "async_groups", src, seen, threads=1)
    got = cupy.asnumpy(seen).reshape(3, 8)
    np.testing.assert_array_equal(got[2], [1, 2, 3, 0, 5, 6, 7, 8])
    np.testing.assert_array_equal(got[1][:4], [1, 2, 3, 0])
    if EMULATED:  # a GPU may complete a copy any time before its wait; the emulator at the wait
        assert np.isnan(got[0]).all() and np.isnan(got[1][4:]).all()


@pytest.mark.skipif(not EMULATED, reason="on a GPU a missing lane is undefined behaviour, not an error")
def test_emulated_mma_with_a_missing_lane_fails_the_launch(module) -> None:
    with pytest.raises(cupy.cuda.driver.CUDADriverError, match="lane 31 of the warp is not taking part"):
        _run(module, "mma_missing_lane", cupy.empty(32, dtype=np.float32))
