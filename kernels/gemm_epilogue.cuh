// gemm_epilogue.cuh: the fused epilogue and the column sums every GEMM kernel shares (gemm_core.cuh:
// FP32 FFMA and tensor-core tiles), so the flags mean the same everywhere. The
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

// The same for the 4 consecutive outputs idx..idx + 3 (columns col..col + 3), loaded and stored as
// float4 (the caller checked that N % 4 == 0 and the pointers are 16-byte aligned).
__device__ __forceinline__ void gemm_epilogue4(float4 v, float* C, const float* bias, const float* mask,
                                               gpuml_i64 idx, int col, int flags) {
    if (flags & GEMM_ACCUMULATE) {
        const float4 c = *reinterpret_cast<const float4*>(C + idx);
        v.x += c.x; v.y += c.y; v.z += c.z; v.w += c.w;
    }
    if (flags & GEMM_BIAS) {
        const float4 b = *reinterpret_cast<const float4*>(bias + col);
        v.x += b.x; v.y += b.y; v.z += b.z; v.w += b.w;
    }
    if (flags & GEMM_RELU) {
        v.x = gpuml_relu(v.x); v.y = gpuml_relu(v.y); v.z = gpuml_relu(v.z); v.w = gpuml_relu(v.w);
    }
    if (flags & GEMM_RELU_MASK) {
        const float4 m = *reinterpret_cast<const float4*>(mask + idx);
        v.x = m.x > 0.0f ? v.x : 0.0f; v.y = m.y > 0.0f ? v.y : 0.0f;
        v.z = m.z > 0.0f ? v.z : 0.0f; v.w = m.w > 0.0f ? v.w : 0.0f;
    }
    __stwb(reinterpret_cast<float4*>(C + idx), v);
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
