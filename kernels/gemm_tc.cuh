// gemm_tc.cuh: tensor-core GEMM (TF32 and BF16 mma.sync, FP32 accumulate) for Dense layers when
// the model's precision is tf32 or bf16. Same contract as gemm.cu (layouts, transposes, epilogue
// flags, column sums) except the arithmetic: operands are rounded to TF32 (cvt.rna: nearest, ties
// away) or BF16 (nearest even) before each product; sums are FP32. The mainloop is gemm_core.cuh
// (dense gather x TF32 / BF16 math); tile shapes in gemm_tiles.h.
//
// Entry points gemm_tc_<ab>_<tf32|bf16>_<large|small> (kernels/gemm_tc_tf32.cu and gemm_tc_bf16.cu:
// one file per precision, so a run compiles only the one it uses, in half the time), <ab> in {nn, nt, tn, tt} as in gemm.cu,
// the last part the row of gemm_tiles.h.
// Launch: grid (ceil(N / BN), ceil(M / BM), splits), block 32 * WARPS_M * WARPS_N of that row, no
// dynamic shared memory; sm_80 or newer (the launcher checks). k_per_split is a multiple of BK
// with splits * k_per_split >= K (splits = 1: k_per_split >= K). With splits > 1 (gemm_core.cuh's
// split-K), work holds splits * (M*N + N) floats and counters, one per output tile, are 0. Any shape and alignment: the copies fall
// back to 4 bytes where 16 would be misaligned.
#pragma once
#include "gemm_core.cuh"
#include "gemm_tiles.h"

typedef GEMM_TILE(TC, LARGE) TcLarge;
typedef GEMM_TILE(TC, SMALL) TcSmall;

#define GEMM_TC_ENTRY_POINT(AB, TRANS_A, TRANS_B, PREC, MATH, TILE, TILE_NAME) \
    GEMM_DENSE_ENTRY_POINT(gemm_tc_##AB##_##PREC##_##TILE_NAME, TRANS_A, TRANS_B, MATH, TILE)

#define GEMM_TC_ENTRY_POINTS(PREC, MATH)                                     \
    GEMM_TC_ENTRY_POINT(nn, false, false, PREC, MATH, TcLarge, large)        \
    GEMM_TC_ENTRY_POINT(nt, false, true, PREC, MATH, TcLarge, large)         \
    GEMM_TC_ENTRY_POINT(tn, true, false, PREC, MATH, TcLarge, large)         \
    GEMM_TC_ENTRY_POINT(tt, true, true, PREC, MATH, TcLarge, large)          \
    GEMM_TC_ENTRY_POINT(nn, false, false, PREC, MATH, TcSmall, small)        \
    GEMM_TC_ENTRY_POINT(nt, false, true, PREC, MATH, TcSmall, small)         \
    GEMM_TC_ENTRY_POINT(tn, true, false, PREC, MATH, TcSmall, small)         \
    GEMM_TC_ENTRY_POINT(tt, true, true, PREC, MATH, TcSmall, small)
