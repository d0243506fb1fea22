// gemm_tiles.h: the tile shapes of the GEMM core (gemm_core.cuh), in ONE place: the kernels include
// this file and gpuml/backend/cuda/launch.py parses its `#define GEMM_<KIND>_<TILE>_<FIELD> <integer>`
// lines, so a grid and its kernel cannot disagree. KIND F32: the FP32 FFMA tiles of gemm.cu; TC: the
// tensor-core tiles of gemm_tc_<precision>.cu; CONV: the conv tiles of conv2d*.cu, every precision
// (so each row fits both MathFfma and the mma policies: warp tiles 32 x 32 or 32 x 16).
//
// Block tile BM x BN, K step BK; WARPS_M x WARPS_N warps, each owning a (BM / WARPS_M) x
// (BN / WARPS_N) piece (FFMA: 8 x 4 lanes, a micro-tile each; TC: 16 x 8 mma tiles); STAGES
// shared-memory buffers filled by cp.async, (BM + BN) * (BK + 4) * 4 bytes each (at most, by
// layout), all within the 48 KiB of static shared memory needing no opt-in (F32: 40, 30, 22.5 KiB;
// TC: 40, 30 KiB; CONV: 45, 23, 15 KiB).
// MIN_BLOCKS: the launcher takes the first tile of a kind (largest first) whose grid has at least
// this many blocks, else the last one (a one-wave rule: 132 SMs on an H100/H200; never the device's
// SM count, so every GPU runs the same tile and sums in the same order), then splits K when that
// grid is still small (launch.split_k). So 4096^3 runs 128 x 128 tiles, 1024^3 64 x 64 (256
// blocks), 512^3 32 x 64 (128 blocks, K split in 2), a batch-32 Dense layer 32 x 64 split along K.
// The conv plans (gpuml/backend/cuda/conv.py conv_plan) apply the same rule after dropping the
// tiles wider than the GEMM's N rounded up to 32 (32 channels never take a 64-wide tile).
#pragma once

#define GEMM_F32_LARGE_BM 128
#define GEMM_F32_LARGE_BN 128
#define GEMM_F32_LARGE_BK 16
#define GEMM_F32_LARGE_WARPS_M 2
#define GEMM_F32_LARGE_WARPS_N 4
#define GEMM_F32_LARGE_STAGES 2
#define GEMM_F32_LARGE_MIN_BLOCKS 128

#define GEMM_F32_MEDIUM_BM 64
#define GEMM_F32_MEDIUM_BN 64
#define GEMM_F32_MEDIUM_BK 16
#define GEMM_F32_MEDIUM_WARPS_M 2
#define GEMM_F32_MEDIUM_WARPS_N 4
#define GEMM_F32_MEDIUM_STAGES 3
#define GEMM_F32_MEDIUM_MIN_BLOCKS 128

#define GEMM_F32_SMALL_BM 32
#define GEMM_F32_SMALL_BN 64
#define GEMM_F32_SMALL_BK 16
#define GEMM_F32_SMALL_WARPS_M 1
#define GEMM_F32_SMALL_WARPS_N 4
#define GEMM_F32_SMALL_STAGES 3
#define GEMM_F32_SMALL_MIN_BLOCKS 0

#define GEMM_TC_LARGE_BM 128
#define GEMM_TC_LARGE_BN 128
#define GEMM_TC_LARGE_BK 16
#define GEMM_TC_LARGE_WARPS_M 2
#define GEMM_TC_LARGE_WARPS_N 4
#define GEMM_TC_LARGE_STAGES 2
#define GEMM_TC_LARGE_MIN_BLOCKS 128

#define GEMM_TC_SMALL_BM 64
#define GEMM_TC_SMALL_BN 64
#define GEMM_TC_SMALL_BK 16
#define GEMM_TC_SMALL_WARPS_M 2
#define GEMM_TC_SMALL_WARPS_N 2
#define GEMM_TC_SMALL_STAGES 3
#define GEMM_TC_SMALL_MIN_BLOCKS 0

#define GEMM_CONV_LARGE_BM 128
#define GEMM_CONV_LARGE_BN 64
#define GEMM_CONV_LARGE_BK 16
#define GEMM_CONV_LARGE_WARPS_M 4
#define GEMM_CONV_LARGE_WARPS_N 2
#define GEMM_CONV_LARGE_STAGES 3
#define GEMM_CONV_LARGE_MIN_BLOCKS 128

#define GEMM_CONV_MEDIUM_BM 64
#define GEMM_CONV_MEDIUM_BN 32
#define GEMM_CONV_MEDIUM_BK 16
#define GEMM_CONV_MEDIUM_WARPS_M 2
#define GEMM_CONV_MEDIUM_WARPS_N 2
#define GEMM_CONV_MEDIUM_STAGES 3
#define GEMM_CONV_MEDIUM_MIN_BLOCKS 128

#define GEMM_CONV_SMALL_BM 32
#define GEMM_CONV_SMALL_BN 32
#define GEMM_CONV_SMALL_BK 16
#define GEMM_CONV_SMALL_WARPS_M 1
#define GEMM_CONV_SMALL_WARPS_N 2
#define GEMM_CONV_SMALL_STAGES 3
#define GEMM_CONV_SMALL_MIN_BLOCKS 0

// A tile row as the GemmTile type the kernels use: GEMM_TILE(F32, LARGE).
#define GEMM_TILE(KIND, NAME)                                                                   \
    GemmTile<GEMM_##KIND##_##NAME##_BM, GEMM_##KIND##_##NAME##_BN, GEMM_##KIND##_##NAME##_BK,   \
             GEMM_##KIND##_##NAME##_WARPS_M, GEMM_##KIND##_##NAME##_WARPS_N, GEMM_##KIND##_##NAME##_STAGES>
