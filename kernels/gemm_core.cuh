// gemm_core.cuh: the one GEMM mainloop: an operand-gather policy (which global elements fill a
// shared-memory stage) x a math policy (how a warp turns a stage into accumulators), with cp.async
// multi-stage staging and the shared epilogue (gemm_epilogue.cuh).
//
// Computes C (M x N, row-major, ld N) = epilogue(op(A) @ op(B)) for one BM x BN block tile
// at block (blockIdx.y, blockIdx.x); K = 0 yields epilogue(0). The tile shape is a template
// parameter (TcTile, one row of gemm_tiles.h) of the gather policy.
//
// Gather policy DenseGather<TRANS_A, TRANS_B>: op(A) = A (M, K) or A^T with A (K, M); op(B) = B
// (K, N) or B^T with B (N, K), row-major. A stage holds each operand as its global rows: A as
// [m][k] or [k][m], B as [k][n] or [n][k], rows padded by 4 floats (16-byte cp.async alignment
// kept; ldmatrix rows on distinct banks). Copies are 16 bytes where the matrix's leading dimension
// is a multiple of 4 and its base is 16-byte aligned, else 4 bytes; elements past an edge are
// zero-filled by the copy (src-size), so the mainloop never branches on the shape.
//
// Math policies (the accumulator layout is the mma's, see mma.cuh):
//   MathTf32: mma.m16n8k8 .tf32; operands rounded with cvt.rna (ties away) when the fragment is
//             loaded; A fragments by ldmatrix.x4 when A is stored [m][k], B by ldmatrix.x4 when
//             B is stored [n][k] (32-bit rows: ldmatrix applies only along k), else scalar loads.
//   MathBf16: mma.m16n8k16 .bf16; operands rounded to bf16 (nearest even) in pairs when the
//             fragment is loaded (float2 loads where the pair is contiguous in shared memory).
// Both accumulate in FP32. The stage is FP32 in both: the BF16 products read FP32 operands and
// round them, which gives the same values as BF16 copies in memory (rounding once either way).
//
// Launch: grid (ceil(N / BN), ceil(M / BM), splits), block 32 * WARPS_M * WARPS_N, no dynamic
// shared memory, sm_80 or newer (split-K: see gemm_core_tile). Limits as gemm.cu: M, N, K < 2^31,
// 64-bit offsets.
#pragma once
#include "gemm_epilogue.cuh"
#include "mma.cuh"

// One tile shape (a row of gemm_tiles.h) and what follows from it.
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct TcTile {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
    static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
    static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
    static constexpr int MI = WM / 16, NI = WN / 8;              // 16 x 8 mma tiles per warp, down and across
    static constexpr int PAD = 4;
    // Floats of one operand's stage: the larger of its two row layouts.
    static constexpr int A_STAGE = BM * (BK + PAD) > BK * (BM + PAD) ? BM * (BK + PAD) : BK * (BM + PAD);
    static constexpr int B_STAGE = BN * (BK + PAD) > BK * (BN + PAD) ? BN * (BK + PAD) : BK * (BN + PAD);
    static_assert(BK % 16 == 0 && WM % 16 == 0 && WN % 16 == 0, "a tile row of gemm_tiles.h");
    static_assert(STAGES >= 2, "cp.async pipeline needs two stages");
};

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

    // Issues the copies of K step [k0, k0 + BK) into one stage (not committed).
    __device__ __forceinline__ void load(float* sA, float* sB, int k0) const {
        if (A_MK) gemm_core_stage_rows<Tile, Tile::BM, Tile::BK>(sA, A, M, k_end, lda, m0, k0, a16);
        else gemm_core_stage_rows<Tile, Tile::BK, Tile::BM>(sA, A, k_end, M, lda, k0, m0, a16);
        if (B_NK) gemm_core_stage_rows<Tile, Tile::BN, Tile::BK>(sB, B, N, k_end, ldb, n0, k0, b16);
        else gemm_core_stage_rows<Tile, Tile::BK, Tile::BN>(sB, B, k_end, N, ldb, k0, n0, b16);
    }
};

// Element (m, k) of the A stage and (k, n) of the B stage, tile coordinates.
template <class Tile, bool A_MK>
__device__ __forceinline__ const float* gemm_core_a_at(const float* sA, int m, int k) {
    return A_MK ? sA + m * (Tile::BK + Tile::PAD) + k : sA + k * (Tile::BM + Tile::PAD) + m;
}
template <class Tile, bool B_NK>
__device__ __forceinline__ const float* gemm_core_b_at(const float* sB, int k, int n) {
    return B_NK ? sB + n * (Tile::BK + Tile::PAD) + k : sB + k * (Tile::BN + Tile::PAD) + n;
}

struct MathTf32 {
    static constexpr int K_STEP = 8;
    // acc += the stage's K_STEP slice at kk for the warp tile at (wm, wn).
    template <class Tile, bool A_MK, bool B_NK>
    __device__ __forceinline__ static void step(float (&acc)[Tile::MI][Tile::NI][4], const float* sA,
                                                const float* sB, int wm, int wn, int kk) {
        static_assert(Tile::NI % 2 == 0, "B fragments are loaded in pairs");
        const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
        unsigned a[Tile::MI][4], b[Tile::NI][2];
#pragma unroll
        for (int mi = 0; mi < Tile::MI; ++mi) {
            const int m = wm + mi * 16;
            if (A_MK) {  // matrix j = lane / 8: rows +8 for odd j, k +4 for j >= 2 -> a0..a3
                const int j = lane >> 3;
                gpuml_ldmatrix_x4(a[mi], gemm_core_a_at<Tile, true>(sA, m + (lane & 7) + 8 * (j & 1), kk + 4 * (j >> 1)));
#pragma unroll
                for (int r = 0; r < 4; ++r) a[mi][r] = gpuml_f32_to_tf32(__uint_as_float(a[mi][r]));
            } else {
                a[mi][0] = gpuml_f32_to_tf32(*gemm_core_a_at<Tile, false>(sA, m + g, kk + t));
                a[mi][1] = gpuml_f32_to_tf32(*gemm_core_a_at<Tile, false>(sA, m + g + 8, kk + t));
                a[mi][2] = gpuml_f32_to_tf32(*gemm_core_a_at<Tile, false>(sA, m + g, kk + t + 4));
                a[mi][3] = gpuml_f32_to_tf32(*gemm_core_a_at<Tile, false>(sA, m + g + 8, kk + t + 4));
            }
        }
#pragma unroll
        for (int ni = 0; ni < Tile::NI; ni += 2) {
            const int n = wn + ni * 8;
            if (B_NK) {  // matrix j: n +8 for j >= 2, k +4 for odd j -> b0, b1 of ni and ni + 1
                const int j = lane >> 3;
                unsigned r[4];
                gpuml_ldmatrix_x4(r, gemm_core_b_at<Tile, true>(sB, kk + 4 * (j & 1), n + (lane & 7) + 8 * (j >> 1)));
                b[ni][0] = gpuml_f32_to_tf32(__uint_as_float(r[0]));
                b[ni][1] = gpuml_f32_to_tf32(__uint_as_float(r[1]));
                b[ni + 1][0] = gpuml_f32_to_tf32(__uint_as_float(r[2]));
                b[ni + 1][1] = gpuml_f32_to_tf32(__uint_as_float(r[3]));
            } else {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    b[ni + h][0] = gpuml_f32_to_tf32(*gemm_core_b_at<Tile, false>(sB, kk + t, n + 8 * h + g));
                    b[ni + h][1] = gpuml_f32_to_tf32(*gemm_core_b_at<Tile, false>(sB, kk + t + 4, n + 8 * h + g));
                }
            }
        }
#pragma unroll
        for (int mi = 0; mi < Tile::MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < Tile::NI; ++ni) gpuml_mma_m16n8k8_tf32(acc[mi][ni], a[mi], b[ni]);
    }
};

struct MathBf16 {
    static constexpr int K_STEP = 16;
    // Two consecutive-k elements as one bf16x2 register (the lower k in the low half).
    template <class Tile, bool A_MK>
    __device__ __forceinline__ static unsigned a_pair(const float* sA, int m, int k) {
        if (A_MK) {
            const float2 v = *reinterpret_cast<const float2*>(gemm_core_a_at<Tile, true>(sA, m, k));
            return gpuml_pack_bf16x2(v.x, v.y);
        }
        return gpuml_pack_bf16x2(*gemm_core_a_at<Tile, false>(sA, m, k), *gemm_core_a_at<Tile, false>(sA, m, k + 1));
    }
    template <class Tile, bool B_NK>
    __device__ __forceinline__ static unsigned b_pair(const float* sB, int k, int n) {
        if (B_NK) {
            const float2 v = *reinterpret_cast<const float2*>(gemm_core_b_at<Tile, true>(sB, k, n));
            return gpuml_pack_bf16x2(v.x, v.y);
        }
        return gpuml_pack_bf16x2(*gemm_core_b_at<Tile, false>(sB, k, n), *gemm_core_b_at<Tile, false>(sB, k + 1, n));
    }
    template <class Tile, bool A_MK, bool B_NK>
    __device__ __forceinline__ static void step(float (&acc)[Tile::MI][Tile::NI][4], const float* sA,
                                                const float* sB, int wm, int wn, int kk) {
        const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
        unsigned a[Tile::MI][4], b[Tile::NI][2];
#pragma unroll
        for (int mi = 0; mi < Tile::MI; ++mi) {
            const int m = wm + mi * 16 + g;
            a[mi][0] = a_pair<Tile, A_MK>(sA, m, kk + 2 * t);
            a[mi][1] = a_pair<Tile, A_MK>(sA, m + 8, kk + 2 * t);
            a[mi][2] = a_pair<Tile, A_MK>(sA, m, kk + 2 * t + 8);
            a[mi][3] = a_pair<Tile, A_MK>(sA, m + 8, kk + 2 * t + 8);
        }
#pragma unroll
        for (int ni = 0; ni < Tile::NI; ++ni) {
            const int n = wn + ni * 8 + g;
            b[ni][0] = b_pair<Tile, B_NK>(sB, kk + 2 * t, n);
            b[ni][1] = b_pair<Tile, B_NK>(sB, kk + 2 * t + 8, n);
        }
#pragma unroll
        for (int mi = 0; mi < Tile::MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < Tile::NI; ++ni) gpuml_mma_m16n8k16_bf16(acc[mi][ni], a[mi], b[ni]);
    }
};

// The stages of one block: the entry point declares them, so each kernel's static shared memory
// is visible in one place (gemm_tiles.h keeps it under the 48 KiB needing no opt-in).
template <class Tile>
struct GemmTcShared {
    float a[Tile::STAGES][Tile::A_STAGE];
    float b[Tile::STAGES][Tile::B_STAGE];
    int last_flag;  // gpuml_last_block's answer (split-K)
};

// The mainloop and epilogue of one block tile. `flags`, bias, mask, col_sums: gemm_epilogue.cuh.
//
// Split-K (gridDim.z = splits > 1): block z covers K slice [k_begin, gather.k_end) and writes its
// raw product to work + z * M * N (its column sums to work + splits * M * N + z * N); the last of
// a tile's blocks to finish (gpuml_last_block on counters[tile], tile = blockIdx.y * gridDim.x +
// blockIdx.x) adds the slices in the order z = 0, 1, ... and applies the epilogue: deterministic,
// as gemm.cu's tile32x64. With splits = 1, work and counters are not touched.
template <class Gather, class Math>
__device__ __forceinline__ void gemm_core_tile(GemmTcShared<typename Gather::Tile>& smem, const Gather& gather,
                                               float* C, const float* bias, const float* mask, float* col_sums,
                                               float* work, unsigned int* counters, int k_begin, int flags) {
    using Tile = typename Gather::Tile;
    auto& sA = smem.a;
    auto& sB = smem.b;
    const int m0 = gather.m0, n0 = gather.n0, M = gather.M, N = gather.N;
    const int splits = gridDim.z;
    const gpuml_i64 MN = (gpuml_i64)M * N;
    if ((flags & GEMM_COL_SUMS) && blockIdx.y == 0)  // sA[0] doubles as the scratch: not loaded yet
        gemm_col_sums<Gather::B_NK, Tile::BN, Tile::THREADS>(
            gather.B, N, gather.ldb, n0, k_begin, gather.k_end,
            splits > 1 ? work + splits * MN + (gpuml_i64)blockIdx.z * N : col_sums, sA[0]);

    const int warp = threadIdx.x / 32;
    const int wm = (warp / Tile::WARPS_N) * Tile::WM, wn = (warp % Tile::WARPS_N) * Tile::WN;
    float acc[Tile::MI][Tile::NI][4];
#pragma unroll
    for (int mi = 0; mi < Tile::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < Tile::NI; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.0f;

    // Pipeline: STAGES - 1 steps in flight. Every iteration commits one group (empty past the
    // end), so wait<STAGES - 2> always means "step kt has landed"; the barrier after it makes all
    // threads' copies visible and frees the stage computed in the previous iteration for reuse.
    const int steps = (gather.k_end - k_begin + Tile::BK - 1) / Tile::BK;
#pragma unroll
    for (int s = 0; s < Tile::STAGES - 1; ++s) {
        if (s < steps) gather.load(sA[s], sB[s], k_begin + s * Tile::BK);
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
    }
    gpuml_cp_async_wait<0>();  // no copy may outlive the block (the last groups are empty)

    const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    float* partial = work + (gpuml_i64)blockIdx.z * MN;
#pragma unroll
    for (int mi = 0; mi < Tile::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < Tile::NI; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i) {  // d_i: row g (+8 for i >= 2), col 2t + (i & 1)
                const int row = m0 + wm + mi * 16 + g + 8 * (i >> 1);
                const int col = n0 + wn + ni * 8 + 2 * t + (i & 1);
                if (row < M && col < N) {
                    const gpuml_i64 idx = (gpuml_i64)row * N + col;
                    if (splits > 1) partial[idx] = acc[mi][ni][i];
                    else C[idx] = gemm_epilogue(acc[mi][ni][i], C, bias, mask, idx, col, flags);
                }
            }
    if (splits == 1 ||
        !gpuml_last_block(counters + blockIdx.y * gridDim.x + blockIdx.x, (unsigned int)splits, &smem.last_flag))
        return;
    // The tile's last block: C = epilogue(sum of the slices, z = 0, 1, ...).
#pragma unroll
    for (int mi = 0; mi < Tile::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < Tile::NI; ++ni)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = m0 + wm + mi * 16 + g + 8 * (i >> 1);
                const int col = n0 + wn + ni * 8 + 2 * t + (i & 1);
                if (row < M && col < N) {
                    const gpuml_i64 idx = (gpuml_i64)row * N + col;
                    float v = 0.0f;
                    for (int z = 0; z < splits; ++z) v += __ldcg(work + z * MN + idx);
                    C[idx] = gemm_epilogue(v, C, bias, mask, idx, col, flags);
                }
            }
    if ((flags & GEMM_COL_SUMS) && blockIdx.y == 0) {
        for (int c = threadIdx.x; c < Tile::BN && n0 + c < N; c += Tile::THREADS) {
            const float* slices = work + splits * MN + n0 + c;
            float v = 0.0f;
            for (int z = 0; z < splits; ++z) v += __ldcg(slices + (gpuml_i64)z * N);
            col_sums[n0 + c] = v;
        }
    }
}
