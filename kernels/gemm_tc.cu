// gemm_tc.cu: tensor-core GEMM (TF32 and BF16 mma.sync, FP32 accumulate) for Dense layers when
// the model's precision is tf32 or bf16. Same contract as gemm.cu (layouts, transposes, epilogue
// flags, column sums) except the arithmetic: operands are rounded to TF32 (cvt.rna: nearest, ties
// away) or BF16 (nearest even) before each product; sums are FP32. The mainloop is gemm_core.cuh
// (dense gather x TF32 / BF16 math); tile shapes in gemm_tiles.h.
//
// Entry points gemm_tc_<ab>_<tf32|bf16>, <ab> in {nn, nt, tn, tt} as in gemm.cu.
// Launch: grid (ceil(N / GEMM_TC_BN), ceil(M / GEMM_TC_BM)), block GEMM_TC_THREADS, no dynamic
// shared memory; sm_80 or newer (the launcher checks). Any shape and alignment: the copies fall
// back to 4 bytes where 16 would be misaligned.
#include "gemm_core.cuh"

#define GEMM_TC_ENTRY_POINTS(AB, TRANS_A, TRANS_B, PREC, MATH)                                         \
    extern "C" __global__ void __launch_bounds__(GEMM_TC_THREADS)                                      \
        gemm_tc_##AB##_##PREC(const float* A, const float* B, float* C, const float* bias, const float* mask, \
                              float* col_sums, int M, int N, int K, int flags) {                       \
        __shared__ __align__(16) GemmTcShared smem;                                                     \
        const DenseGather<TRANS_A, TRANS_B> gather(A, B, M, N, K, blockIdx.y * GEMM_TC_BM,             \
                                                   blockIdx.x * GEMM_TC_BN);                           \
        gemm_core_tile<DenseGather<TRANS_A, TRANS_B>, MATH>(smem, gather, C, bias, mask, col_sums, B, M, N, K, flags); \
    }

GEMM_TC_ENTRY_POINTS(nn, false, false, tf32, MathTf32)
GEMM_TC_ENTRY_POINTS(nt, false, true, tf32, MathTf32)
GEMM_TC_ENTRY_POINTS(tn, true, false, tf32, MathTf32)
GEMM_TC_ENTRY_POINTS(tt, true, true, tf32, MathTf32)
GEMM_TC_ENTRY_POINTS(nn, false, false, bf16, MathBf16)
GEMM_TC_ENTRY_POINTS(nt, false, true, bf16, MathBf16)
GEMM_TC_ENTRY_POINTS(tn, true, false, bf16, MathBf16)
GEMM_TC_ENTRY_POINTS(tt, true, true, bf16, MathBf16)
