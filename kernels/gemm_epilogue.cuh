// gemm_epilogue.cuh: the fused epilogue and the column sums every GEMM kernel shares (gemm.cu's
// FFMA tiles and gemm_core.cuh's tensor-core tiles), so the flags mean the same everywhere. The
// flag values are EPILOGUE_* in gpuml/backend/cuda/launch.py; the semantics are in gemm.cu's header.
#pragma once
#include "common.cuh"

#define GEMM_ACCUMULATE 4
#define GEMM_BIAS 1
#define GEMM_RELU 2
#define GEMM_RELU_MASK 8
#define GEMM_COL_SUMS 16

// Output element idx = row * N + col.
__device__ __forceinline__ float gemm_epilogue(float acc, const float* C, const float* bias, const float* mask,
                                               gpuml_i64 idx, int col, int flags) {
    if (flags & GEMM_ACCUMULATE) acc += C[idx];
    if (flags & GEMM_BIAS) acc += bias[col];
    if (flags & GEMM_RELU) acc = gpuml_relu(acc);
    if (flags & GEMM_RELU_MASK) acc = mask[idx] > 0.0f ? acc : 0.0f;
    return acc;
}

// out[n] = sum over k in [k_begin, k_end) of op(B)[k, n] for the COLS columns n0 .. n0+COLS-1
// (those < N). Thread t sums column t % COLS over k = k_begin + t / COLS, stepping by
// THREADS / COLS, in increasing k; the parts are then added in part order: a fixed order. Runs
// before the mainloop (no accumulator is live yet). `scratch` holds THREADS floats; every
// thread of the block calls this.
template <bool TRANS_B, int COLS, int THREADS>
__device__ __forceinline__ void gemm_col_sums(const float* __restrict__ B, int N, int ldb, int n0, int k_begin,
                                              int k_end, float* __restrict__ out, float* scratch) {
    constexpr int PARTS = THREADS / COLS;
    const int col = threadIdx.x % COLS;
    const int n = n0 + col;
    float s = 0.0f;
    if (n < N) {
        for (int k = k_begin + (int)threadIdx.x / COLS; k < k_end; k += PARTS)
            s += TRANS_B ? B[(gpuml_i64)n * ldb + k] : B[(gpuml_i64)k * ldb + n];
    }
    scratch[threadIdx.x] = s;
    __syncthreads();
    if ((int)threadIdx.x < COLS && n < N) {
        float total = scratch[col];
#pragma unroll
        for (int p = 1; p < PARTS; ++p) total += scratch[p * COLS + col];
        out[n] = total;
    }
    __syncthreads();  // the scratch is reused by the caller
}
