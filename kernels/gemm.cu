// gemm.cu: FP32 GEMM with a fused epilogue, for Dense layers (precision fp32).
//
// Computes C = epilogue(op(A) @ op(B)), op(X) = X or X^T. Every matrix is row-major and dense:
//   op(A) is M x K: A is stored (M, K) (lda = K) or, transposed, (K, M) (lda = M);
//   op(B) is K x N: B is stored (K, N) (ldb = N) or, transposed, (N, K) (ldb = K);
//   C is (M, N) with leading dimension N; bias is (N,).
// A Dense layer uses NN (y = x @ W), NT (dx = dy @ W^T) and TN (dW = x^T @ dy); TT exists too.
// Epilogue `flags` (bitmask): GEMM_ACCUMULATE adds the old C, GEMM_BIAS adds bias[col], then
// GEMM_RELU clamps at 0, then GEMM_RELU_MASK keeps v only where mask[row, col] > 0 (a select:
// a NaN product under a closed mask gives 0), mask (M, N) row-major:
//   v = relu(acc + C_old + bias[col]); v = mask[row, col] > 0 ? v : 0.
// GEMM_RELU_MASK is the ReLU backward of the previous Dense layer fused into dx = dy @ W^T
// (mask = that layer's output y). GEMM_COL_SUMS also writes col_sums[n] = sum_k op(B)[k, n]:
// the bias gradient fused into dW = x^T @ dy. The blocks of block row 0 compute it for their
// columns, each summing its k range in increasing k (a fixed order, no atomics).
//
// The mainloop is gemm_core.cuh (dense gather x MathFfma: a micro-tile of FP32 FFMA per thread
// reading cp.async-staged tiles); the tiles are the F32 rows of gemm_tiles.h. Entry points
// gemm_<ab>_fp32_<tile>, <ab> in {nn, nt, tn, tt} (first letter op(A), second op(B); t =
// transposed), <tile> a row name (large, medium, small). Any shape and alignment: global copies
// are 16 bytes where the leading dimension and base allow, else 4; the epilogue stores float4
// where N % 4 == 0 and the pointers are 16-byte aligned.
// Launch: grid (ceil(N / BN), ceil(M / BM), splits), block 32 * WARPS_M * WARPS_N of the row, no
// dynamic shared memory. k_per_split is a multiple of BK with splits * k_per_split >= K (splits =
// 1: k_per_split >= K). gridDim.z > 1 splits K in the same launch: slice z covers [z*k_per_split,
// (z+1)*k_per_split) and writes its raw partial product to work + z*M*N (and its column sums to
// work + splits*M*N + z*N); the last of a tile's `splits` blocks to finish (gpuml_last_block,
// counters[tile] a ticket, tile = blockIdx.y * gridDim.x + blockIdx.x, all 0 before the launch)
// adds the slices in the order z = 0, 1, ... and applies the epilogue. Deterministic: the order
// depends on the shape only. With splits = 1, work and counters are not touched.
// Precision: FP32 FFMA, each output accumulated in increasing k order (no TF32).
// Limits: M, N, K < 2^31; offsets are computed in 64 bits. K = 0 yields epilogue(0).
#include "gemm_core.cuh"
#include "gemm_tiles.h"

typedef GEMM_TILE(F32, LARGE) F32Large;
typedef GEMM_TILE(F32, MEDIUM) F32Medium;
typedef GEMM_TILE(F32, SMALL) F32Small;

#define GEMM_F32_ENTRY_POINT(AB, TRANS_A, TRANS_B, TILE, TILE_NAME) \
    GEMM_DENSE_ENTRY_POINT(gemm_##AB##_fp32_##TILE_NAME, TRANS_A, TRANS_B, MathFfma, TILE)

#define GEMM_F32_ENTRY_POINTS(TILE, TILE_NAME)                          \
    GEMM_F32_ENTRY_POINT(nn, false, false, TILE, TILE_NAME)             \
    GEMM_F32_ENTRY_POINT(nt, false, true, TILE, TILE_NAME)              \
    GEMM_F32_ENTRY_POINT(tn, true, false, TILE, TILE_NAME)              \
    GEMM_F32_ENTRY_POINT(tt, true, true, TILE, TILE_NAME)

GEMM_F32_ENTRY_POINTS(F32Large, large)
GEMM_F32_ENTRY_POINTS(F32Medium, medium)
GEMM_F32_ENTRY_POINTS(F32Small, small)
