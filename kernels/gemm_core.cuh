// gemm_core.cuh: the one GEMM mainloop: an operand-gather policy (which global elements fill a
// shared-memory stage) x a math policy (how a warp turns a stage into accumulators: gemm_math.cuh),
// with cp.async multi-stage staging; epilogues visit the accumulators as (row, col, value) through
// the math policy (gemm_core_visit), so the dense epilogue here and the conv epilogues share it.
//
// Computes the BM x BN block tile at (m0, n0) of op(A) @ op(B) (M x N, reduction K); K = 0 gives
// zeros. The tile shape is a template parameter (GemmTile, one row of gemm_tiles.h) of the gather
// policy. A gather policy provides Tile, A_MK / B_NK (its stage layouts, gemm_math.cuh), m0, n0, M,
// N, k_end, load(sA, sB, k0) and stage(sA, sB), both called by every thread with the stage of
// reduction steps [k0, k0 + BK) (zeros past k_end and past the edges): load issues the cp.async
// copies (not committed) and may fetch elements into the policy's registers; stage stores those
// into the same stage after the previous stage's compute (so their global latency overlaps it;
// the conv gathers fetch what a copy cannot produce: the ReLU-masked gradient). Stages are loaded
// in increasing k0, once each.
//
// Gather policy DenseGather<Tile, TRANS_A, TRANS_B>: op(A) = A (M, K) or A^T with A (K, M); op(B) =
// B (K, N) or B^T with B (N, K), row-major. A stage holds each operand as its global rows: A as
// [m][k] or [k][m], B as [k][n] or [n][k]. Copies are 16 bytes where the matrix's leading dimension
// is a multiple of 4 and its base is 16-byte aligned, else 4 bytes; elements past an edge are
// zero-filled by the copy (src-size), so the mainloop never branches on the shape.
//
// Launch (gemm_core_tile): grid (ceil(N / BN), ceil(M / BM), splits), block Tile::THREADS, no
// dynamic shared memory. cp.async and mma.sync need sm_80; before it (FP32 only) mma.cuh's cp.async
// is a synchronous copy. Limits: M, N, K < 2^31, 64-bit offsets.
#pragma once
#include "gemm_epilogue.cuh"
#include "gemm_math.cuh"

// Copies the tile rows [r0, r0 + ROWS) x cols [c0, c0 + COLS) of a row-major (rows x cols, ld)
// matrix into smem [ROWS][COLS + PAD], zero past the edges. Every thread calls it.
template <class Tile, int ROWS, int COLS>
__device__ __forceinline__ void gemm_core_stage_rows(float* smem, const float* G, int rows, int cols, int ld, int r0,
                                                     int c0, bool vec16) {
    constexpr int CHUNKS = ROWS * COLS / 4;  // 16-byte pieces of the tile
    for (int q = threadIdx.x; q < CHUNKS; q += Tile::THREADS) {
        const int r = q / (COLS / 4), c = (q % (COLS / 4)) * 4;  // constants: shifts and masks
        const int gr = r0 + r, gc = c0 + c;
        float* dst = smem + r * (COLS + Tile::PAD) + c;
        const int valid = gr < rows ? min(max(cols - gc, 0), 4) : 0;
        const float* src = valid > 0 ? G + (gpuml_i64)gr * ld + gc : G;  // a valid address either way
        if (vec16) {
            gpuml_cp_async_16(dst, src, 4 * valid);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) gpuml_cp_async_4(dst + j, j < valid ? src + j : G, j < valid ? 4 : 0);
        }
    }
}

template <class Tile_, bool TRANS_A, bool TRANS_B>
struct DenseGather {
    using Tile = Tile_;
    static constexpr bool A_MK = !TRANS_A;  // stage A as [m][k] (else [k][m])
    static constexpr bool B_NK = TRANS_B;   // stage B as [n][k] (else [k][n])
    const float* A;
    const float* B;
    int M, N, K, lda, ldb, m0, n0;
    int k_end;  // this block's K slice ends here (split-K): later k read as zero
    bool a16, b16;

    __device__ __forceinline__ DenseGather(const float* A_, const float* B_, int M_, int N_, int K_, int m0_, int n0_,
                                           int k_end_)
        : A(A_), B(B_), M(M_), N(N_), K(K_), lda(TRANS_A ? M_ : K_), ldb(TRANS_B ? K_ : N_), m0(m0_), n0(n0_),
          k_end(k_end_) {
        a16 = lda % 4 == 0 && ((unsigned long long)A & 15) == 0;
        b16 = ldb % 4 == 0 && ((unsigned long long)B & 15) == 0;
    }

    __device__ __forceinline__ void stage(float*, float*) const {}  // everything arrives by cp.async
    __device__ __forceinline__ void load(float* sA, float* sB, int k0) const {
        if (A_MK) gemm_core_stage_rows<Tile, Tile::BM, Tile::BK>(sA, A, M, k_end, lda, m0, k0, a16);
        else gemm_core_stage_rows<Tile, Tile::BK, Tile::BM>(sA, A, k_end, M, lda, k0, m0, a16);
        if (B_NK) gemm_core_stage_rows<Tile, Tile::BN, Tile::BK>(sB, B, N, k_end, ldb, n0, k0, b16);
        else gemm_core_stage_rows<Tile, Tile::BK, Tile::BN>(sB, B, k_end, N, ldb, k0, n0, b16);
    }
};

// The stages of one block: the entry point declares them, so each kernel's static shared memory
// is visible in one place (gemm_tiles.h keeps it under the 48 KiB needing no opt-in).
template <class Tile>
struct GemmShared {
    float a[Tile::STAGES][Tile::A_STAGE];
    float b[Tile::STAGES][Tile::B_STAGE];
    int last_flag;  // gpuml_last_block's answer (split-K)
};

// The mainloop: acc (zeroed here) = this block's product over reduction steps [k_begin,
// gather.k_end), each warp its (WM x WN) piece in Math's accumulator layout.
//
// Pipeline: STAGES - 1 steps in flight. Every iteration commits one group (empty past the end), so
// wait<STAGES - 2> always means "step kt has landed"; the barrier after it makes all threads'
// copies visible and frees the stage computed in the previous iteration for reuse. The stage
// buffers are free again when this returns (a barrier after the last compute), so an epilogue may
// reuse them.
template <class Gather, class Math, int ACC>
__device__ __forceinline__ void gemm_core_mainloop(GemmShared<typename Gather::Tile>& smem, Gather& gather,
                                                   float (&acc)[ACC], int k_begin) {
    using Tile = typename Gather::Tile;
    static_assert(ACC == Math::template acc_count<Tile>() && Tile::BK % Math::K_STEP == 0, "math policy x tile");
    auto& sA = smem.a;
    auto& sB = smem.b;
    const int warp = threadIdx.x / 32;
    const int wm = (warp / Tile::WARPS_N) * Tile::WM, wn = (warp % Tile::WARPS_N) * Tile::WN;
#pragma unroll
    for (int i = 0; i < ACC; ++i) acc[i] = 0.0f;
    const int steps = (gather.k_end - k_begin + Tile::BK - 1) / Tile::BK;
#pragma unroll
    for (int s = 0; s < Tile::STAGES - 1; ++s) {
        if (s < steps) {
            gather.load(sA[s], sB[s], k_begin + s * Tile::BK);
            gather.stage(sA[s], sB[s]);
        }
        gpuml_cp_async_commit();
    }
    for (int kt = 0; kt < steps; ++kt) {
        gpuml_cp_async_wait<Tile::STAGES - 2>();
        __syncthreads();
        const int next = kt + Tile::STAGES - 1;
        if (next < steps) gather.load(sA[next % Tile::STAGES], sB[next % Tile::STAGES], k_begin + next * Tile::BK);
        gpuml_cp_async_commit();
        const float* a = sA[kt % Tile::STAGES];
        const float* b = sB[kt % Tile::STAGES];
#pragma unroll
        for (int kk = 0; kk < Tile::BK; kk += Math::K_STEP)
            Math::template step<Tile, Gather::A_MK, Gather::B_NK>(acc, a, b, wm, wn, kk);
        // The stage `next` was last read in iteration kt - 1: every thread passed this iteration's
        // barrier since, and the barrier of iteration `next` publishes these stores.
        if (next < steps) gather.stage(sA[next % Tile::STAGES], sB[next % Tile::STAGES]);
    }
    gpuml_cp_async_wait<0>();  // no copy may outlive the block (the last groups are empty)
    __syncthreads();           // every warp is done reading the stages
}

// f(row, col, value) for each accumulator, (row, col) in tile coordinates (0 <= row < BM).
template <class Tile, class Math, bool A_MK, int ACC, class F>
__device__ __forceinline__ void gemm_core_visit(const float (&acc)[ACC], F&& f) {
    const int warp = threadIdx.x / 32;
    const int wm = (warp / Tile::WARPS_N) * Tile::WM, wn = (warp % Tile::WARPS_N) * Tile::WN;
#pragma unroll
    for (int i = 0; i < ACC; ++i)
        f(wm + Math::template row<Tile, A_MK>(i), wn + Math::template col<Tile>(i), acc[i]);
}

// f(row, col, float4 of columns col..col + 3) for each quad (math policies with QUADS only).
template <class Tile, class Math, bool A_MK, int ACC, class F>
__device__ __forceinline__ void gemm_core_visit_quads(const float (&acc)[ACC], F&& f) {
    static_assert(Math::QUADS && ACC % 4 == 0, "accumulators come in column quads");
    const int warp = threadIdx.x / 32;
    const int wm = (warp / Tile::WARPS_N) * Tile::WM, wn = (warp % Tile::WARPS_N) * Tile::WN;
#pragma unroll
    for (int i = 0; i < ACC; i += 4)
        f(wm + Math::template row<Tile, A_MK>(i), wn + Math::template col<Tile>(i),
          make_float4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]));
}

__device__ __forceinline__ bool gemm_aligned16(const void* p) { return ((unsigned long long)p & 15) == 0; }

// Stores a block tile's accumulators through `store(row, col, v)` (global row/col, v the full sum;
// only rows < M and cols < N) and returns whether this block wrote the tile's final values.
// Split-K (gridDim.z = splits > 1): block z writes its raw sums to work + z * M * N; the last of a
// tile's blocks to finish (gpuml_last_block on counters[blockIdx.y * gridDim.x + blockIdx.x])
// adds the slices in the order z = 0, 1, ... and stores them: deterministic, the order depends on
// the shape only. With splits = 1, work and counters are not touched.
template <class Tile, class Math, bool A_MK, int ACC, class Store>
__device__ __forceinline__ bool gemm_core_store_split(GemmShared<Tile>& smem, const float (&acc)[ACC], int M, int N,
                                                      int m0, int n0, float* work, unsigned int* counters,
                                                      Store&& store) {
    const int splits = gridDim.z;
    if (splits == 1) {
        gemm_core_visit<Tile, Math, A_MK>(acc, [&](int r, int c, float v) {
            if (m0 + r < M && n0 + c < N) store(m0 + r, n0 + c, v);
        });
        return true;
    }
    const gpuml_i64 MN = (gpuml_i64)M * N;
    float* partial = work + (gpuml_i64)blockIdx.z * MN;
    gemm_core_visit<Tile, Math, A_MK>(acc, [&](int r, int c, float v) {
        if (m0 + r < M && n0 + c < N) partial[(gpuml_i64)(m0 + r) * N + n0 + c] = v;
    });
    if (!gpuml_last_block(counters + blockIdx.y * gridDim.x + blockIdx.x, (unsigned int)splits, &smem.last_flag))
        return false;
    gemm_core_visit<Tile, Math, A_MK>(acc, [&](int r, int c, float) {
        if (m0 + r < M && n0 + c < N) {
            const gpuml_i64 idx = (gpuml_i64)(m0 + r) * N + n0 + c;
            float v = 0.0f;
            for (int z = 0; z < splits; ++z) v += __ldcg(work + z * MN + idx);
            store(m0 + r, n0 + c, v);
        }
    });
    return true;
}

// The dense GEMM of one block tile: mainloop, then C = epilogue(acc) (gemm_epilogue.cuh: `flags`,
// bias, mask, col_sums). Math policies with column quads store float4 where N % 4 == 0 and every
// pointer the flags read or write is 16-byte aligned (a quad then never straddles a row's end).
//
// Split-K (gridDim.z = splits > 1): block z covers K slice [k_begin, gather.k_end) and writes its
// raw product to work + z * M * N (its column sums to work + splits * M * N + z * N); the last of
// a tile's blocks to finish (gpuml_last_block on counters[tile], tile = blockIdx.y * gridDim.x +
// blockIdx.x) adds the slices in the order z = 0, 1, ... and applies the epilogue: deterministic,
// the order depends on the shape only. With splits = 1, work and counters are not touched.
template <class Gather, class Math>
__device__ __forceinline__ void gemm_core_tile(GemmShared<typename Gather::Tile>& smem, Gather& gather, float* C,
                                               const float* bias, const float* mask, float* col_sums, float* work,
                                               unsigned int* counters, int k_begin, int flags) {
    using Tile = typename Gather::Tile;
    constexpr int ACC = Math::template acc_count<Tile>();
    constexpr bool A_MK = Gather::A_MK;
    const int m0 = gather.m0, n0 = gather.n0, M = gather.M, N = gather.N;
    const int splits = gridDim.z;
    const gpuml_i64 MN = (gpuml_i64)M * N;
    if ((flags & GEMM_COL_SUMS) && blockIdx.y == 0)  // stage A 0 doubles as the scratch: not loaded yet
        gemm_col_sums<Gather::B_NK, Tile::BN, Tile::THREADS>(
            gather.B, N, gather.ldb, n0, k_begin, gather.k_end,
            splits > 1 ? work + splits * MN + (gpuml_i64)blockIdx.z * N : col_sums, smem.a[0]);

    float acc[ACC];
    gemm_core_mainloop<Gather, Math>(smem, gather, acc, k_begin);

    if constexpr (Math::QUADS) {
        if (splits == 1 && N % 4 == 0 && gemm_aligned16(C) && (!(flags & GEMM_BIAS) || gemm_aligned16(bias)) &&
            (!(flags & GEMM_RELU_MASK) || gemm_aligned16(mask))) {
            gemm_core_visit_quads<Tile, Math, A_MK>(acc, [&](int r, int c, float4 v) {
                const int row = m0 + r, col = n0 + c;
                if (row < M && col < N)  // N % 4 == 0: the quad is wholly in or out
                    gemm_epilogue4(v, C, bias, mask, (gpuml_i64)row * N + col, col, flags);
            });
            return;
        }
    }
    const bool last = gemm_core_store_split<Tile, Math, A_MK>(smem, acc, M, N, m0, n0, work, counters,
                                                              [&](int row, int col, float v) {
        const gpuml_i64 idx = (gpuml_i64)row * N + col;
        C[idx] = gemm_epilogue(v, C, bias, mask, idx, col, flags);
    });
    if (splits > 1 && last && (flags & GEMM_COL_SUMS) && blockIdx.y == 0) {
        for (int c = threadIdx.x; c < Tile::BN && n0 + c < N; c += Tile::THREADS) {
            const float* slices = work + splits * MN + n0 + c;
            float v = 0.0f;
            for (int z = 0; z < splits; ++z) v += __ldcg(slices + (gpuml_i64)z * N);
            col_sums[n0 + c] = v;
        }
    }
}

// One dense GEMM entry point NAME: Gather = DenseGather<TILE, TRANS_A, TRANS_B>, math policy MATH,
// block z = K slice z (gemm.cu's contract; gemm.cu and gemm_tc.cuh instantiate it).
// __launch_bounds__(threads, 1): ptxas may use the registers the micro-tile needs (the FP32
// 128 x 128 tile holds 64 accumulators and 64 operands) instead of spilling under a two-block cap.
#define GEMM_DENSE_ENTRY_POINT(NAME, TRANS_A, TRANS_B, MATH, TILE)                                      \
    extern "C" __global__ void __launch_bounds__(TILE::THREADS, 1)                                      \
        NAME(const float* A, const float* B, float* C, const float* bias, const float* mask,            \
             float* col_sums, float* work, unsigned int* counters, int M, int N, int K, int k_per_split, \
             int flags) {                                                                               \
        __shared__ __align__(16) GemmShared<TILE> smem;                                                 \
        typedef DenseGather<TILE, TRANS_A, TRANS_B> Gather;                                             \
        const int k_begin = blockIdx.z * k_per_split;                                                   \
        Gather gather(A, B, M, N, K, blockIdx.y * TILE::BM, blockIdx.x * TILE::BN,                      \
                      min(K, k_begin + k_per_split));                                                   \
        gemm_core_tile<Gather, MATH>(smem, gather, C, bias, mask, col_sums, work, counters, k_begin, flags); \
    }
