// common.cuh: helpers shared by every kernel family.
//
// - gpuml_uniform(seed, counter): the counter-based generator of gpuml/backend/rng.py, bit for
//   bit (splitmix64 finaliser of seed + GOLDEN * (counter + 1), top 24 bits / 2^24).
// - warp and block SUMS over float / double / int with a FIXED combination order, so a
//   reduction gives the same bits on every run (no atomics anywhere in gpuml's float sums).
//   There is deliberately no max reduction: fmaxf drops NaN, and the kernels that need a max
//   (softmax_xent's online merge, maxpool, count_correct) state their own NaN rule.
// - the flat-index types and the multi-tensor walk (gpuml_tensor_of).
// - gpuml_last_block: the ticket that lets ONE launch finish a multi-block reduction (the last
//   block to arrive sums every block's partial in a fixed order; only the ticket is atomic).
//
// Precision: float32 data; double only inside the single-block final reductions.
// Everything here is header-only device code; the file compiles under NVRTC and nvcc alike, so
// it must not include host headers (no <cstdint>: NVRTC ships none).
#pragma once

typedef unsigned long long gpuml_u64;
typedef long long gpuml_i64;

#define GPUML_FULL_MASK 0xffffffffu
// -inf without <math.h> (INFINITY is a host-header macro that NVRTC does not provide)
#define GPUML_NEG_INF __int_as_float(0xff800000)

// ReLU that lets NaN through (fmaxf(NaN, 0) would return 0 and hide a diverged model).
__device__ __forceinline__ float gpuml_relu(float x) { return x < 0.0f ? 0.0f : x; }

// Multi-tensor flat indexing: tensors t = 0..T-1 are laid end to end, tensor t owning flat
// elements [offsets[t], offsets[t+1]) (offsets[0] = 0, T + 1 entries). Returns the tensor that
// holds flat element i >= offsets[t], walking forward from t (grid-stride loops visit flat
// indices in increasing order, so the walk is short); empty tensors are skipped. i < offsets[T].
__device__ __forceinline__ int gpuml_tensor_of(const gpuml_i64* offsets, int t, gpuml_i64 i) {
    while (i >= offsets[t + 1]) ++t;
    return t;
}

// ---------------------------------------------------------------------------------------------
// Counter-based random numbers (must match gpuml/backend/rng.py exactly).

#define GPUML_GOLDEN 0x9E3779B97F4A7C15ull

__host__ __device__ __forceinline__ gpuml_u64 gpuml_splitmix64(gpuml_u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The 24 random bits behind gpuml_uniform: an integer k in [0, 2^24). Dropout compares k with
// a host-computed integer threshold ceil(p * 2^24), which decides `uniform >= p` exactly as the
// float64 CPU code does, whatever p is (a float32 p could round across a k / 2^24 boundary).
__host__ __device__ __forceinline__ unsigned int gpuml_uniform_bits24(gpuml_u64 seed, gpuml_u64 counter) {
    const gpuml_u64 z = seed + GPUML_GOLDEN * (counter + 1ull);  // wraps mod 2^64, as in rng.py
    return (unsigned int)(gpuml_splitmix64(z) >> 40);
}

// A uniform in [0, 1) with 24-bit resolution; exact in float32 (k * 2^-24).
__host__ __device__ __forceinline__ float gpuml_uniform(gpuml_u64 seed, gpuml_u64 counter) {
    return (float)gpuml_uniform_bits24(seed, counter) * (1.0f / 16777216.0f);
}

// ---------------------------------------------------------------------------------------------
// Warp reductions (butterfly: every lane ends with the same value, combined in a fixed order).

__device__ __forceinline__ float gpuml_warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(GPUML_FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ double gpuml_warp_sum(double v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(GPUML_FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ int gpuml_warp_sum(int v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(GPUML_FULL_MASK, v, offset);
    return v;
}

// ---------------------------------------------------------------------------------------------
// Block reductions. Contract: every thread of the block calls them (they hold __syncthreads),
// blockDim.x is a multiple of 32 and at most 1024, and `scratch` has blockDim.x / 32 slots.
// The result is returned to every thread. The scratch may be reused right after the call
// returns: the trailing barrier guarantees every thread has read the final value.

template <typename T>
__device__ __forceinline__ T gpuml_block_sum(T v, T* scratch) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int num_warps = blockDim.x >> 5;
    v = gpuml_warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T total = (lane < num_warps) ? scratch[lane] : T(0);
    total = gpuml_warp_sum(total);  // every warp reduces the same slots: all threads agree
    __syncthreads();
    return total;
}

// ---------------------------------------------------------------------------------------------
// Single-launch reductions: every block writes its partial result, then calls this (all threads
// of the block, blockDim.y == blockDim.z == 1); it returns true in the one block that arrived
// last among the `count` blocks sharing `counter`, which then reads the others' partials with
// __ldcg (from L2: the fence made them visible there; L1 is not coherent) and combines them in
// an order fixed by the shapes, never by arrival, so the result has the same bits every run.
// The last block resets the counter to 0, ready for the next launch or graph replay; a counter
// starts at 0 (the host zero-fills it once) and one launch at a time uses it (stream order).
// `is_last` is a __shared__ int of the caller (shared memory stays out of header functions:
// the CPU emulator gives static locals of inline functions a section of their own).
__device__ __forceinline__ bool gpuml_last_block(unsigned int* counter, unsigned int count, int* is_last) {
    __threadfence();  // this thread's partial writes, before the ticket
    __syncthreads();  // every thread of the block has written and fenced
    if (threadIdx.x == 0) {
        const unsigned int ticket = atomicAdd(counter, 1u);
        *is_last = ticket == count - 1u;
        if (*is_last) {
            *counter = 0u;
            __threadfence();  // acquire side: the others' partials are read after the ticket
        }
    }
    __syncthreads();
    return *is_last != 0;
}
