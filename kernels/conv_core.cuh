// conv_core.cuh: 2-D convolution (cross-correlation, zero padding, NCHW) as implicit GEMM on the
// GEMM core: the gathers of conv_gather.cuh x a math policy (MathFfma, MathTf32, MathBf16), and the
// conv epilogues, which visit the accumulators through the math policy (gemm_core_visit).
//
//   conv2d_fwd_<prec>_<tile>         y  = act(conv(x, w) + bias)     GEMM M=N*P*Q  N=K      Kg=C*R*S
//   conv2d_bwd_data_<prec>_<tile>    dx = d(conv)/dx applied to dz   GEMM M=N*H*W  N=C      Kg=K*R*S
//   conv2d_bwd_weight_<prec>_<tile>  dw (and db) from dz             GEMM M=K      N=C*R*S  Kg=N*P*Q
// <prec>: fp32 (conv2d.cu), tf32 (conv2d_tf32.cu), bf16 (conv2d_bf16.cu): one file per precision,
// so a run compiles only its own. <tile>: a CONV row of gemm_tiles.h (large, medium, small).
// The backward kernels read dz = dy, or with CONV_RELU_MASK dz = relu_y > 0 ? dy : 0: the ReLU
// backward rides in their gathers, so no launch writes dz. bwd_weight with CONV_BIAS_GRAD also
// writes db[k] = sum over n, p, q of dz: each thread adds up the dz values it stages (in stage
// order), the BK threads of a filter row are added in a fixed order, the blocks of block column
// blockIdx.y = 0 write it.
//
// Launch (gpuml/backend/cuda/conv.py computes the grids and builds the tables): block THREADS of
// the tile, no dynamic shared memory, grid (ceil(M / BM), ceil(N / BN), splits);
//   fwd, bwd_data: splits = 1; `table` is conv_gather.cuh's per-shape table (2 or 4 ints per kk).
//   bwd_weight:    split z sums reduction steps [z*chunk, min((z+1)*chunk, N*P*Q)) (chunk a
//                  multiple of BK); with splits > 1 it writes work + z*K*C*R*S (and its db part to
//                  work + splits*K*C*R*S + z*K) and the last of a tile's blocks to finish
//                  (gpuml_last_block, tickets[blockIdx.y * gridDim.x + blockIdx.x], all 0) adds
//                  the slices z = 0, 1, ... into dw (and db). With splits == 1 the blocks write dw
//                  and db directly and work and tickets are not touched.
// Determinism: no float atomics (only the split ticket). Every output element is owned by one
// thread, each sum runs in an order fixed by the shapes alone: bitwise identical run to run.
// Precision: fp32: FP32 FFMA, an output's error bounded by gamma_L * sum|terms|, L the reduction
// length; tf32 / bf16: each operand (x, w, dz) rounded as gemm_math.cuh says, FP32 sums; db is
// always the FP32 sum of the unrounded dz. Limits: every tensor and the bwd_weight workspace below
// 2^31 elements (32-bit indexing); R, S < 2^15 (the table packs them in 16 bits). bwd_data gathers
// across stride holes, so at stride s it spends s^2 x the useful products.
#pragma once
#include "conv_gather.cuh"
#include "gemm_tiles.h"

#define CONV_RELU_MASK 1
#define CONV_BIAS_GRAD 2

typedef GEMM_TILE(CONV, LARGE) ConvLarge;
typedef GEMM_TILE(CONV, MEDIUM) ConvMedium;
typedef GEMM_TILE(CONV, SMALL) ConvSmall;

template <class Tile, class Math>
__device__ __forceinline__ void conv_fwd_tile(GemmShared<Tile>& smem, const float* x, const float* w,
                                              const float* bias, const int* table, float* y, const ConvShape& g,
                                              int has_bias, int relu) {
    ConvFwdGather<Tile> gather(x, w, table, g, blockIdx.x * Tile::BM, blockIdx.y * Tile::BN);
    float acc[Math::template acc_count<Tile>()];
    gemm_core_mainloop<ConvFwdGather<Tile>, Math>(smem, gather, acc, 0);
    const int PQ = g.P * g.Q, M = gather.M, m0 = gather.m0, n0 = gather.n0;
    gemm_core_visit<Tile, Math, false>(acc, [&](int r, int c, float v) {
        const int m = m0 + r, k = n0 + c;
        if (m < M && k < g.K) {
            const int n = m / PQ;
            if (has_bias) v += __ldg(bias + k);
            y[(n * g.K + k) * PQ + (m - n * PQ)] = relu ? gpuml_relu(v) : v;  // NaN passes, as on the CPU
        }
    });
}

template <class Tile, class Math>
__device__ __forceinline__ void conv_bwd_data_tile(GemmShared<Tile>& smem, const float* dy, const float* relu_y,
                                                   const float* w, const int* table, float* dx, const ConvShape& g,
                                                   int flags) {
    ConvBwdDataGather<Tile> gather(dy, relu_y, (flags & CONV_RELU_MASK) != 0, w, table, g, blockIdx.x * Tile::BM,
                                   blockIdx.y * Tile::BN);
    float acc[Math::template acc_count<Tile>()];
    gemm_core_mainloop<ConvBwdDataGather<Tile>, Math>(smem, gather, acc, 0);
    const int HW = g.H * g.W, M = gather.M, m0 = gather.m0, n0 = gather.n0;
    gemm_core_visit<Tile, Math, false>(acc, [&](int r, int c, float v) {
        const int m = m0 + r, ch = n0 + c;
        if (m < M && ch < g.C) {
            const int n = m / HW;
            dx[(n * g.C + ch) * HW + (m - n * HW)] = v;
        }
    });
}

template <class Tile, class Math>
__device__ __forceinline__ void conv_bwd_weight_tile(GemmShared<Tile>& smem, const float* x, const float* dy,
                                                     const float* relu_y, float* dw, float* db, float* work,
                                                     unsigned int* tickets, const ConvShape& g, int chunk, int flags) {
    typedef ConvBwdWeightGather<Tile> Gather;
    const int NPQ = g.N * g.P * g.Q, k_begin = blockIdx.z * chunk;
    Gather gather(x, dy, relu_y, (flags & CONV_RELU_MASK) != 0, g, blockIdx.x * Tile::BM, blockIdx.y * Tile::BN,
                  min(NPQ, k_begin + chunk));
    float acc[Math::template acc_count<Tile>()];
    gemm_core_mainloop<Gather, Math>(smem, gather, acc, k_begin);
    const int M = gather.M, N = gather.N, m0 = gather.m0, splits = gridDim.z;
    const bool bias = (flags & CONV_BIAS_GRAD) && blockIdx.y == 0;
    float* db_work = work + (gpuml_i64)splits * M * N;
    if (bias) {  // filter row f: the BK step lanes added in lane order (the stages are free again)
        float* part = smem.a[0];
        const int rt = threadIdx.x / Tile::BK, lane = threadIdx.x % Tile::BK;
#pragma unroll
        for (int j = 0; j < Gather::A_COPIES; ++j) part[(rt + j * Gather::STEP) * Tile::BK + lane] = gather.row_sum[j];
        __syncthreads();
        for (int f = threadIdx.x; f < Tile::BM && m0 + f < M; f += Tile::THREADS) {
            float t = part[f * Tile::BK];
#pragma unroll
            for (int l = 1; l < Tile::BK; ++l) t += part[f * Tile::BK + l];
            if (splits == 1) db[m0 + f] = t;
            else db_work[blockIdx.z * M + m0 + f] = t;
        }
    }
    const bool last = gemm_core_store_split<Tile, Math, true>(smem, acc, M, N, m0, blockIdx.y * Tile::BN, work, tickets,
                                                              [&](int row, int col, float v) {
        dw[(gpuml_i64)row * N + col] = v;
    });
    if (splits > 1 && last && bias) {
        for (int f = threadIdx.x; f < Tile::BM && m0 + f < M; f += Tile::THREADS) {
            float v = 0.0f;
            for (int z = 0; z < splits; ++z) v += __ldcg(db_work + z * M + m0 + f);
            db[m0 + f] = v;
        }
    }
}

#define CONV_SHAPE_PARAMS int N, int C, int H, int W, int K, int R, int S, int P, int Q, int sh, int sw, int ph, int pw
#define CONV_SHAPE {N, C, H, W, K, R, S, P, Q, sh, sw, ph, pw}

// __launch_bounds__(threads, 1): ptxas may take the registers the tile needs rather than spill.
#define CONV_ENTRY_POINTS_OF_TILE(PREC, MATH, TILE, TILE_NAME)                                                 \
    extern "C" __global__ void __launch_bounds__(TILE::THREADS, 1)                                             \
        conv2d_fwd_##PREC##_##TILE_NAME(const float* x, const float* w, const float* bias, const int* table,    \
                                        float* y, CONV_SHAPE_PARAMS, int has_bias, int relu) {                 \
        __shared__ __align__(16) GemmShared<TILE> smem;                                                        \
        const ConvShape g = CONV_SHAPE;                                                                        \
        conv_fwd_tile<TILE, MATH>(smem, x, w, bias, table, y, g, has_bias, relu);                              \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(TILE::THREADS, 1)                                             \
        conv2d_bwd_data_##PREC##_##TILE_NAME(const float* dy, const float* relu_y, const float* w,             \
                                             const int* table, float* dx, CONV_SHAPE_PARAMS, int flags) {      \
        __shared__ __align__(16) GemmShared<TILE> smem;                                                        \
        const ConvShape g = CONV_SHAPE;                                                                        \
        conv_bwd_data_tile<TILE, MATH>(smem, dy, relu_y, w, table, dx, g, flags);                              \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(TILE::THREADS, 1)                                             \
        conv2d_bwd_weight_##PREC##_##TILE_NAME(const float* x, const float* dy, const float* relu_y, float* dw, \
                                               float* db, float* work, unsigned int* tickets, CONV_SHAPE_PARAMS, \
                                               int chunk, int flags) {                                         \
        __shared__ __align__(16) GemmShared<TILE> smem;                                                        \
        const ConvShape g = CONV_SHAPE;                                                                        \
        conv_bwd_weight_tile<TILE, MATH>(smem, x, dy, relu_y, dw, db, work, tickets, g, chunk, flags);         \
    }

#define CONV_ENTRY_POINTS(PREC, MATH)                              \
    CONV_ENTRY_POINTS_OF_TILE(PREC, MATH, ConvLarge, large)        \
    CONV_ENTRY_POINTS_OF_TILE(PREC, MATH, ConvMedium, medium)      \
    CONV_ENTRY_POINTS_OF_TILE(PREC, MATH, ConvSmall, small)
