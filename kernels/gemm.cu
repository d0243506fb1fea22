// gemm.cu: FP32 GEMM with a fused epilogue, for Dense layers.
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
// Entry points, <ab> in {nn, nt, tn, tt} (first letter op(A), second op(B); t = transposed):
//   gemm_<ab>_tile128       128x128 block tile, K step 8, 256 threads, 8x8 outputs per thread
//                           in two 4x4 quadrants (rows ty*4 and 64+ty*4, cols tx*4 and
//                           64+tx*4), double-buffered shared memory (one barrier per K step).
//                           Scalar predicated loads: any shape, any alignment.
//   gemm_<ab>_tile128_vec4  the same with float4 global loads and stores. The host picks it
//                           only when lda, ldb and N are multiples of 4 and A, B, C and bias
//                           are 16-byte aligned: then a float4 never straddles a matrix edge.
//   gemm_<ab>_tile32x64     32x64 block tile, K step 16, 128 threads, 4x4 outputs per thread
//                           (rows ty+8i, cols tx+16j), for outputs too small to fill the GPU
//                           with 128x128 tiles (batch-32 Dense layers). gridDim.z > 1 splits K
//                           in the same launch: slice z covers [z*k_per_split, (z+1)*k_per_split)
//                           and writes its raw partial product to work + z*M*N (and its column
//                           sums to work + splits*M*N + z*N); the last of a tile's `splits`
//                           blocks to finish (gpuml_last_block, counters[tile] a ticket) adds
//                           the slices in the order z = 0, 1, ... and applies the epilogue.
//                           Deterministic: the order depends on the shape only.
// Launch: tile128: grid (ceil(N/128), ceil(M/128)), block 256, no dynamic shared memory.
//         tile32x64: grid (ceil(N/64), ceil(M/32), splits), block 128; k_per_split is a
//         multiple of 16 with splits * k_per_split >= K (splits = 1, k_per_split >= K: no split);
//         with splits > 1, work holds splits * (M*N + N) floats and counters (unsigned,
//         ceil(N/64) * ceil(M/32) of them, tile = blockIdx.y * gridDim.x + blockIdx.x) are 0.
// Precision: FP32 FFMA, each output accumulated in increasing k order (no TF32).
// Limits: M, N, K < 2^31; offsets are computed in 64 bits. K = 0 yields epilogue(0).
#include "gemm_epilogue.cuh"

// ---------------------------------------------------------------------------------------------
// 128x128 tile kernel.

#define T128_M 128
#define T128_N 128
#define T128_K 8
#define T128_THREADS 256
// Row stride of the shared tiles: +4 floats keeps float4 alignment and makes the transposing
// stores (A not transposed, B transposed) hit 32 different banks per warp.
#define T128_LD (128 + 4)

// Global -> register staging of one K step: each thread holds 4 elements of the A tile and 4
// of the B tile. The mapping makes the contiguous dimension of the stored matrix vary fastest
// across threads (coalesced), and 4 consecutive elements belong to one thread (float4).
template <bool TRANS_A, bool TRANS_B, bool VEC4>
struct Tile128Loader {
    const float* a_ptr;  // this thread's first A element of the current K step
    const float* b_ptr;
    int a_mn, a_k;       // tile coordinates of element 0 (m or n within the tile, k within the step)
    int b_mn, b_k;
    bool a_row_ok, b_row_ok;  // the m (n) coordinate is inside the matrix

    __device__ __forceinline__ void init(const float* A, const float* B, int M, int N, int lda, int ldb,
                                         int m0, int n0) {
        const int tid = threadIdx.x;
        if (!TRANS_A) {  // A (M, K): 2 threads per row, 4 consecutive k each
            a_mn = tid >> 1;
            a_k = (tid & 1) * 4;
            a_row_ok = m0 + a_mn < M;
            a_ptr = A + (gpuml_i64)(a_row_ok ? m0 + a_mn : 0) * lda + a_k;
        } else {  // A (K, M): 32 threads per k row, 4 consecutive m each
            a_k = tid >> 5;
            a_mn = (tid & 31) * 4;
            a_row_ok = true;
            a_ptr = A + (gpuml_i64)a_k * lda + m0 + a_mn;
        }
        if (!TRANS_B) {  // B (K, N): 32 threads per k row, 4 consecutive n each
            b_k = tid >> 5;
            b_mn = (tid & 31) * 4;
            b_row_ok = true;
            b_ptr = B + (gpuml_i64)b_k * ldb + n0 + b_mn;
        } else {  // B (N, K): 2 threads per n row, 4 consecutive k each
            b_mn = tid >> 1;
            b_k = (tid & 1) * 4;
            b_row_ok = n0 + b_mn < N;
            b_ptr = B + (gpuml_i64)(b_row_ok ? n0 + b_mn : 0) * ldb + b_k;
        }
    }

    // Loads 4 consecutive elements p[0..3] where element j is valid when `ok(j)`; zero otherwise.
    // VEC4: validity is all-or-nothing (the host guaranteed the leading dimension % 4 == 0).
    __device__ __forceinline__ static void load4(const float* p, bool ok0, bool ok1, bool ok2, bool ok3,
                                                 float (&r)[4]) {
        if (VEC4) {
            float4 v = ok0 ? *reinterpret_cast<const float4*>(p) : make_float4(0.f, 0.f, 0.f, 0.f);
            r[0] = v.x; r[1] = v.y; r[2] = v.z; r[3] = v.w;
        } else {
            r[0] = ok0 ? p[0] : 0.f;
            r[1] = ok1 ? p[1] : 0.f;
            r[2] = ok2 ? p[2] : 0.f;
            r[3] = ok3 ? p[3] : 0.f;
        }
    }

    __device__ __forceinline__ void load(int M, int N, int K, int m0, int n0, int k0, float (&ra)[4],
                                         float (&rb)[4]) const {
        if (!TRANS_A) {
            const int k = k0 + a_k;
            load4(a_ptr, a_row_ok && k < K, a_row_ok && k + 1 < K, a_row_ok && k + 2 < K,
                  a_row_ok && k + 3 < K, ra);
        } else {
            const int m = m0 + a_mn;
            const bool k_ok = k0 + a_k < K;
            load4(a_ptr, k_ok && m < M, k_ok && m + 1 < M, k_ok && m + 2 < M, k_ok && m + 3 < M, ra);
        }
        if (!TRANS_B) {
            const int n = n0 + b_mn;
            const bool k_ok = k0 + b_k < K;
            load4(b_ptr, k_ok && n < N, k_ok && n + 1 < N, k_ok && n + 2 < N, k_ok && n + 3 < N, rb);
        } else {
            const int k = k0 + b_k;
            load4(b_ptr, b_row_ok && k < K, b_row_ok && k + 1 < K, b_row_ok && k + 2 < K,
                  b_row_ok && k + 3 < K, rb);
        }
    }

    // Pointer advance per K step; recomputed from the kernel parameters (constant bank) rather
    // than kept in registers, which the 8x8 accumulator tile needs.
    __device__ __forceinline__ void advance(int lda, int ldb) {
        a_ptr += TRANS_A ? (gpuml_i64)T128_K * lda : (gpuml_i64)T128_K;
        b_ptr += TRANS_B ? (gpuml_i64)T128_K : (gpuml_i64)T128_K * ldb;
    }

    // Register -> shared: As[k][m], Bs[k][n] (k-major, so the compute loop reads float4 rows).
    __device__ __forceinline__ void store(float (*As)[T128_LD], float (*Bs)[T128_LD], const float (&ra)[4],
                                          const float (&rb)[4]) const {
        if (!TRANS_A) {
#pragma unroll
            for (int j = 0; j < 4; ++j) As[a_k + j][a_mn] = ra[j];
        } else {
            *reinterpret_cast<float4*>(&As[a_k][a_mn]) = make_float4(ra[0], ra[1], ra[2], ra[3]);
        }
        if (!TRANS_B) {
            *reinterpret_cast<float4*>(&Bs[b_k][b_mn]) = make_float4(rb[0], rb[1], rb[2], rb[3]);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) Bs[b_k + j][b_mn] = rb[j];
        }
    }
};

template <bool TRANS_A, bool TRANS_B, bool VEC4>
__device__ __forceinline__ void gemm_tile128(const float* __restrict__ A, const float* __restrict__ B,
                                             float* __restrict__ C, const float* __restrict__ bias,
                                             const float* __restrict__ mask, float* __restrict__ col_sums,
                                             int M, int N, int K, int flags) {
    __shared__ __align__(16) float As[2][T128_K][T128_LD];
    __shared__ __align__(16) float Bs[2][T128_K][T128_LD];

    const int lda = TRANS_A ? M : K;
    const int ldb = TRANS_B ? K : N;
    const int m0 = blockIdx.y * T128_M;
    const int n0 = blockIdx.x * T128_N;
    const int tx = threadIdx.x & 15;
    const int ty = threadIdx.x >> 4;

    if ((flags & GEMM_COL_SUMS) && blockIdx.y == 0)  // As doubles as the scratch: not loaded yet
        gemm_col_sums<TRANS_B, T128_N, T128_THREADS>(B, N, ldb, n0, 0, K, col_sums, &As[0][0][0]);

    Tile128Loader<TRANS_A, TRANS_B, VEC4> loader;
    loader.init(A, B, M, N, lda, ldb, m0, n0);

    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;

    const int num_k_steps = (K + T128_K - 1) / T128_K;
    float ra[4], rb[4];
    if (num_k_steps > 0) {
        loader.load(M, N, K, m0, n0, 0, ra, rb);
        loader.store(As[0], Bs[0], ra, rb);
    }
    __syncthreads();

    for (int step = 0; step < num_k_steps; ++step) {
        const int cur = step & 1;
        const bool has_next = step + 1 < num_k_steps;
        if (has_next) {  // issue the next step's global loads before computing on this one
            loader.advance(lda, ldb);
            loader.load(M, N, K, m0, n0, (step + 1) * T128_K, ra, rb);
        }
        // Unrolled by 2: a deeper unroll lets the scheduler hoist more shared-memory fragments than
        // the 128-register budget of __launch_bounds__(256, 2) holds. By 8 nvcc spilled; by 4
        // NVRTC 12.9 and 13.0 (CuPy's compiler) spilled up to 104 bytes on sm_90 where nvcc did
        // not; by 2 they all stay at or below 126 (tests/test_nvrtc_compile.py checks).
#pragma unroll 2
        for (int kk = 0; kk < T128_K; ++kk) {
            const float4 a_lo = *reinterpret_cast<const float4*>(&As[cur][kk][ty * 4]);
            const float4 a_hi = *reinterpret_cast<const float4*>(&As[cur][kk][64 + ty * 4]);
            const float4 b_lo = *reinterpret_cast<const float4*>(&Bs[cur][kk][tx * 4]);
            const float4 b_hi = *reinterpret_cast<const float4*>(&Bs[cur][kk][64 + tx * 4]);
            const float a[8] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
            const float b[8] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        // Writing the other buffer is safe: the barrier that ended the previous step ordered
        // every read of it before this point.
        if (has_next) loader.store(As[cur ^ 1], Bs[cur ^ 1], ra, rb);
        __syncthreads();
    }

    // Epilogue: rows m0 + {ty*4, 64+ty*4} + i, cols n0 + {tx*4, 64+tx*4} + j.
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int row = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
        if (row >= M) continue;
        float* c_row = C + (gpuml_i64)row * N;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int col = n0 + half * 64 + tx * 4;
            if (VEC4) {
                if (col >= N) continue;  // N % 4 == 0: the float4 is wholly in or out
                float4 v = make_float4(acc[i][half * 4], acc[i][half * 4 + 1], acc[i][half * 4 + 2],
                                       acc[i][half * 4 + 3]);
                if (flags & GEMM_ACCUMULATE) {
                    const float4 c = *reinterpret_cast<const float4*>(c_row + col);
                    v.x += c.x; v.y += c.y; v.z += c.z; v.w += c.w;
                }
                if (flags & GEMM_BIAS) {
                    const float4 bv = *reinterpret_cast<const float4*>(bias + col);
                    v.x += bv.x; v.y += bv.y; v.z += bv.z; v.w += bv.w;
                }
                if (flags & GEMM_RELU) {
                    v.x = gpuml_relu(v.x); v.y = gpuml_relu(v.y); v.z = gpuml_relu(v.z); v.w = gpuml_relu(v.w);
                }
                if (flags & GEMM_RELU_MASK) {
                    const float4 mv = *reinterpret_cast<const float4*>(mask + (gpuml_i64)row * N + col);
                    v.x = mv.x > 0.0f ? v.x : 0.0f; v.y = mv.y > 0.0f ? v.y : 0.0f;
                    v.z = mv.z > 0.0f ? v.z : 0.0f; v.w = mv.w > 0.0f ? v.w : 0.0f;
                }
                *reinterpret_cast<float4*>(c_row + col) = v;
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    if (col + j < N)
                        c_row[col + j] = gemm_epilogue(acc[i][half * 4 + j], C, bias, mask,
                                                       (gpuml_i64)row * N + col + j, col + j, flags);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 32x64 tile kernel with optional split-K.

#define T32_M 32
#define T32_N 64
#define T32_K 16
#define T32_THREADS 128
// Padding 2 makes both transposing store patterns conflict-free (bank = 2k + m mod 32).
#define T32_LDA (T32_M + 2)
#define T32_LDB (T32_N + 2)

template <bool TRANS_A, bool TRANS_B>
__device__ __forceinline__ void gemm_tile32x64(const float* __restrict__ A, const float* __restrict__ B,
                                               float* __restrict__ C, const float* __restrict__ bias,
                                               const float* __restrict__ mask, float* __restrict__ col_sums,
                                               float* __restrict__ work, unsigned int* __restrict__ counters,
                                               int M, int N, int K, int k_per_split, int flags) {
    __shared__ float As[T32_K][T32_LDA];
    __shared__ float Bs[T32_K][T32_LDB];
    __shared__ float col_scratch[T32_THREADS];
    __shared__ int last_flag;

    const int lda = TRANS_A ? M : K;
    const int ldb = TRANS_B ? K : N;
    const int m0 = blockIdx.y * T32_M;
    const int n0 = blockIdx.x * T32_N;
    const int k_begin = blockIdx.z * k_per_split;
    const int k_end = min(K, k_begin + k_per_split);
    const int tid = threadIdx.x;
    const int tx = tid & 15;
    const int ty = tid >> 4;
    const int splits = gridDim.z;
    const gpuml_i64 MN = (gpuml_i64)M * N;
    // With a split, column sums go to this slice's row of the workspace, added up at the end.
    float* col_sums_out = splits > 1 ? work + splits * MN + (gpuml_i64)blockIdx.z * N : col_sums;
    if ((flags & GEMM_COL_SUMS) && blockIdx.y == 0)
        gemm_col_sums<TRANS_B, T32_N, T32_THREADS>(B, N, ldb, n0, k_begin, k_end, col_sums_out, col_scratch);

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

    for (int k0 = k_begin; k0 < k_end; k0 += T32_K) {
        // A tile: 512 elements, 4 per thread; contiguous dimension fastest across threads.
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int e = tid + T32_THREADS * r;
            const int m = TRANS_A ? (e & 31) : (e >> 4);
            const int k = TRANS_A ? (e >> 5) : (e & 15);
            const int gm = m0 + m, gk = k0 + k;
            float v = 0.f;
            if (gm < M && gk < k_end)
                v = TRANS_A ? A[(gpuml_i64)gk * lda + gm] : A[(gpuml_i64)gm * lda + gk];
            As[k][m] = v;
        }
        // B tile: 1024 elements, 8 per thread.
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            const int e = tid + T32_THREADS * r;
            const int n = TRANS_B ? (e >> 4) : (e & 63);
            const int k = TRANS_B ? (e & 15) : (e >> 6);
            const int gn = n0 + n, gk = k0 + k;
            float v = 0.f;
            if (gn < N && gk < k_end)
                v = TRANS_B ? B[(gpuml_i64)gn * ldb + gk] : B[(gpuml_i64)gk * ldb + gn];
            Bs[k][n] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < T32_K; ++kk) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 8 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();  // the next iteration overwrites the tiles
    }

    const bool split = splits > 1;
    float* partial = work + (gpuml_i64)blockIdx.z * MN;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = m0 + ty + 8 * i;
        if (row >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = n0 + tx + 16 * j;
            if (col >= N) continue;
            const gpuml_i64 idx = (gpuml_i64)row * N + col;
            if (split)
                partial[idx] = acc[i][j];
            else
                C[idx] = gemm_epilogue(acc[i][j], C, bias, mask, idx, col, flags);
        }
    }
    if (!split || !gpuml_last_block(counters + blockIdx.y * gridDim.x + blockIdx.x, (unsigned int)splits, &last_flag))
        return;
    // The tile's last block: C = epilogue(sum of the slices, z = 0, 1, ...), as many blocks
    // would have done in any order; the same bits as a separate reduction pass.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = m0 + ty + 8 * i;
        if (row >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = n0 + tx + 16 * j;
            if (col >= N) continue;
            const gpuml_i64 idx = (gpuml_i64)row * N + col;
            float v = 0.0f;
            for (int z = 0; z < splits; ++z) v += __ldcg(work + z * MN + idx);
            C[idx] = gemm_epilogue(v, C, bias, mask, idx, col, flags);
        }
    }
    if ((flags & GEMM_COL_SUMS) && blockIdx.y == 0 && tid < T32_N && n0 + tid < N) {
        const float* slices = work + splits * MN + n0 + tid;
        float v = 0.0f;
        for (int z = 0; z < splits; ++z) v += __ldcg(slices + (gpuml_i64)z * N);
        col_sums[n0 + tid] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// Entry points.

#define GEMM_ENTRY_POINTS(AB, TRANS_A, TRANS_B)                                                       \
    extern "C" __global__ void __launch_bounds__(T128_THREADS, 2)                                    \
        gemm_##AB##_tile128(const float* A, const float* B, float* C, const float* bias, const float* mask, \
                            float* col_sums, int M, int N, int K, int flags) {                         \
        gemm_tile128<TRANS_A, TRANS_B, false>(A, B, C, bias, mask, col_sums, M, N, K, flags);          \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(T128_THREADS, 2)                                    \
        gemm_##AB##_tile128_vec4(const float* A, const float* B, float* C, const float* bias,          \
                                 const float* mask, float* col_sums, int M, int N, int K, int flags) { \
        gemm_tile128<TRANS_A, TRANS_B, true>(A, B, C, bias, mask, col_sums, M, N, K, flags);           \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(T32_THREADS)                                        \
        gemm_##AB##_tile32x64(const float* A, const float* B, float* C, const float* bias, const float* mask, \
                              float* col_sums, float* work, unsigned int* counters, int M, int N, int K, \
                              int k_per_split, int flags) {                                            \
        gemm_tile32x64<TRANS_A, TRANS_B>(A, B, C, bias, mask, col_sums, work, counters, M, N, K,       \
                                         k_per_split, flags);                                          \
    }

GEMM_ENTRY_POINTS(nn, false, false)
GEMM_ENTRY_POINTS(nt, false, true)
GEMM_ENTRY_POINTS(tn, true, false)
GEMM_ENTRY_POINTS(tt, true, true)
