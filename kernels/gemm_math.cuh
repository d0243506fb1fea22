// gemm_math.cuh: the tile shape and the three math policies of the GEMM core (gemm_core.cuh): how
// a warp turns one shared-memory stage into accumulators, and where each accumulator sits.
//
// A stage holds op(A) as [m][k] (A_MK) or [k][m] and op(B) as [k][n] or [n][k] (B_NK), rows padded
// by PAD = 4 floats (gemm_core_a_at / gemm_core_b_at). Every policy provides
//   K_STEP                          the k depth one step() consumes (BK is a multiple of it);
//   acc_count<Tile>()               accumulators per thread (a flat float array);
//   step<Tile, A_MK, B_NK>(acc, sA, sB, wm, wn, kk)   acc += the stage's [kk, kk + K_STEP) slice
//                                   for the warp tile at rows wm.., cols wn..;
//   row<Tile, A_MK>(i), col<Tile>(i)  accumulator i's place in the warp tile (this lane's);
// so epilogues visit accumulators as (row, col, value) without knowing the fragment layout.
//
//   MathFfma: FP32 fused multiply-add, a TM x TN micro-tile per thread (lanes 8 down x 4 across the
//             warp tile). Columns come in groups of 4 consecutive (4 * ln + 16 * group), so the
//             epilogue can store float4; rows are 4-groups when A is [k][m] (one float4 per group
//             and k) and interleaved (lm + 8 i) when A is [m][k] (one float4 along k per row).
//             Every shared load is a float4 and conflict-free (below); each output is summed in
//             increasing k, one fmaf per term (the FP32 result of a plain loop).
//   MathTf32: mma.m16n8k8 .tf32; operands rounded with cvt.rna (ties away) when the fragment is
//             loaded; A by ldmatrix.x4 when A is [m][k], B by ldmatrix.x4 when B is [n][k]
//             (32-bit rows: ldmatrix applies only along k), else scalar loads.
//   MathBf16: mma.m16n8k16 .bf16; operands rounded to bf16 (nearest even) in pairs when the
//             fragment is loaded (float2 loads where the pair is contiguous in shared memory).
// All accumulate in FP32. The stage is FP32 for all: the BF16 products read FP32 operands and round
// them, which gives the same values as BF16 copies in memory (rounding once either way).
//
// Bank conflicts of MathFfma (a float4 load is served per quarter warp, 8 lanes x 16 bytes): the
// 8 lanes of a quarter share ln (lane = lm + 8 ln), so B reads are one broadcast address; A reads
// [k][m] are 8 consecutive quads; A reads [m][k] are rows lm = 0..7 at stride (BK + 4) / 4 quads,
// an odd number for BK % 8 == 0, so the 8 rows land on 8 distinct quads mod 8.
#pragma once
#include "mma.cuh"

// One tile shape (a row of gemm_tiles.h) and what follows from it.
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct GemmTile {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
    static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
    static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // warp tile
    static constexpr int PAD = 4;
    // Floats of one operand's stage: the larger of its two row layouts.
    static constexpr int A_STAGE = BM * (BK + PAD) > BK * (BM + PAD) ? BM * (BK + PAD) : BK * (BM + PAD);
    static constexpr int B_STAGE = BN * (BK + PAD) > BK * (BN + PAD) ? BN * (BK + PAD) : BK * (BN + PAD);
    static_assert(BK % 8 == 0 && BM % WARPS_M == 0 && BN % WARPS_N == 0, "a tile row of gemm_tiles.h");
    static_assert(STAGES >= 2, "cp.async pipeline needs two stages");
    static_assert(A_STAGE >= THREADS, "the column sums use stage A 0 as a THREADS-float scratch");
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

__device__ __forceinline__ float4 gemm_core_ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }

struct MathFfma {
    static constexpr int K_STEP = 4;
    static constexpr bool QUADS = true;  // accumulators i..i+3 (i % 4 == 0) are 4 consecutive columns
    template <class Tile>
    __host__ __device__ static constexpr int tm() { return Tile::WM / 8; }
    template <class Tile>
    __host__ __device__ static constexpr int tn() { return Tile::WN / 4; }
    template <class Tile>
    __host__ __device__ static constexpr int acc_count() { return tm<Tile>() * tn<Tile>(); }

    template <class Tile, bool A_MK>
    __device__ __forceinline__ static int row(int i) {
        const int lm = threadIdx.x % 8, r = i / tn<Tile>();
        return A_MK ? lm + 8 * r : 4 * lm + 32 * (r / 4) + r % 4;
    }
    template <class Tile>
    __device__ __forceinline__ static int col(int i) {
        const int ln = (threadIdx.x % 32) / 8, j = i % tn<Tile>();
        return 4 * ln + 16 * (j / 4) + j % 4;
    }

    template <class Tile, bool A_MK, bool B_NK>
    __device__ __forceinline__ static void step(float (&acc)[acc_count<Tile>()], const float* sA, const float* sB,
                                                int wm, int wn, int kk) {
        constexpr int TM = tm<Tile>(), TN = tn<Tile>();
        static_assert(TM * 8 == Tile::WM && TN % 4 == 0 && TN * 4 == Tile::WN && (A_MK || TM % 4 == 0),
                      "MathFfma: warp tile 8 TM x 4 TN");
        const int lm = threadIdx.x % 8, ln = (threadIdx.x % 32) / 8;
        float a[TM][K_STEP], b[TN][K_STEP];
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            if (A_MK) {
                const float4 v = gemm_core_ld4(gemm_core_a_at<Tile, true>(sA, wm + lm + 8 * i, kk));
                a[i][0] = v.x; a[i][1] = v.y; a[i][2] = v.z; a[i][3] = v.w;
            } else if (i % 4 == 0) {
#pragma unroll
                for (int k = 0; k < K_STEP; ++k) {
                    const float4 v = gemm_core_ld4(gemm_core_a_at<Tile, false>(sA, wm + 4 * lm + 8 * i, kk + k));
                    a[i][k] = v.x; a[i + 1][k] = v.y; a[i + 2][k] = v.z; a[i + 3][k] = v.w;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < TN; j += 4) {
            const int n = wn + 4 * ln + 4 * j;  // 16 * (j / 4)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (B_NK) {
                    const float4 v = gemm_core_ld4(gemm_core_b_at<Tile, true>(sB, kk, n + e));
                    b[j + e][0] = v.x; b[j + e][1] = v.y; b[j + e][2] = v.z; b[j + e][3] = v.w;
                } else {
                    const float4 v = gemm_core_ld4(gemm_core_b_at<Tile, false>(sB, kk + e, n));
                    b[j][e] = v.x; b[j + 1][e] = v.y; b[j + 2][e] = v.z; b[j + 3][e] = v.w;
                }
            }
        }
#pragma unroll
        for (int k = 0; k < K_STEP; ++k)
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i * TN + j] = __fmaf_rn(a[i][k], b[j][k], acc[i * TN + j]);
    }
};

// The mma policies' accumulators: 16 x 8 tiles, MI down and NI across the warp tile, 4 per tile
// (d_r: row g (+8 for r >= 2), col 2t + (r & 1); mma.cuh), flat index ((mi * NI) + ni) * 4 + r.
struct MathMmaLayout {
    static constexpr bool QUADS = false;
    template <class Tile>
    __host__ __device__ static constexpr int mi() { return Tile::WM / 16; }
    template <class Tile>
    __host__ __device__ static constexpr int ni() { return Tile::WN / 8; }
    template <class Tile>
    __host__ __device__ static constexpr int acc_count() { return mi<Tile>() * ni<Tile>() * 4; }
    template <class Tile, bool A_MK>
    __device__ __forceinline__ static int row(int i) {
        const int g = (threadIdx.x % 32) >> 2;
        return (i / (4 * ni<Tile>())) * 16 + g + 8 * ((i & 3) >> 1);
    }
    template <class Tile>
    __device__ __forceinline__ static int col(int i) {
        const int t = threadIdx.x & 3;
        return ((i / 4) % ni<Tile>()) * 8 + 2 * t + (i & 1);
    }
};

struct MathTf32 : MathMmaLayout {
    static constexpr int K_STEP = 8;
    template <class Tile, bool A_MK, bool B_NK>
    __device__ __forceinline__ static void step(float (&acc)[acc_count<Tile>()], const float* sA, const float* sB,
                                                int wm, int wn, int kk) {
        constexpr int MI = mi<Tile>(), NI = ni<Tile>();
        static_assert(Tile::WM % 16 == 0 && Tile::WN % 16 == 0, "B fragments are loaded in pairs");
        const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
        unsigned a[MI][4], b[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
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
        for (int ni = 0; ni < NI; ni += 2) {
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
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) gpuml_mma_m16n8k8_tf32(acc + (mi * NI + ni) * 4, a[mi], b[ni]);
    }
};

struct MathBf16 : MathMmaLayout {
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
    __device__ __forceinline__ static void step(float (&acc)[acc_count<Tile>()], const float* sA, const float* sB,
                                                int wm, int wn, int kk) {
        constexpr int MI = mi<Tile>(), NI = ni<Tile>();
        static_assert(Tile::BK % 16 == 0 && Tile::WM % 16 == 0 && Tile::WN % 8 == 0, "mma.m16n8k16 tiles");
        const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
        unsigned a[MI][4], b[NI][2];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
            const int m = wm + mi * 16 + g;
            a[mi][0] = a_pair<Tile, A_MK>(sA, m, kk + 2 * t);
            a[mi][1] = a_pair<Tile, A_MK>(sA, m + 8, kk + 2 * t);
            a[mi][2] = a_pair<Tile, A_MK>(sA, m, kk + 2 * t + 8);
            a[mi][3] = a_pair<Tile, A_MK>(sA, m + 8, kk + 2 * t + 8);
        }
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
            const int n = wn + ni * 8 + g;
            b[ni][0] = b_pair<Tile, B_NK>(sB, kk + 2 * t, n);
            b[ni][1] = b_pair<Tile, B_NK>(sB, kk + 2 * t + 8, n);
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) gpuml_mma_m16n8k16_bf16(acc + (mi * NI + ni) * 4, a[mi], b[ni]);
    }
};
