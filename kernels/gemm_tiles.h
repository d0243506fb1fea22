// gemm_tiles.h: the tile shapes of the tensor-core GEMM (gemm_core.cuh, gemm_tc.cuh), in ONE place:
// the kernels include this file and gpuml/backend/cuda/launch.py parses its
// `#define GEMM_TC_<TILE>_<FIELD> <integer>` lines, so a grid and its kernel cannot disagree.
//
// Block tile BM x BN, K step BK; WARPS_M x WARPS_N warps, each owning a (BM / WARPS_M) x
// (BN / WARPS_N) piece as 16 x 8 mma tiles; STAGES shared-memory buffers filled by cp.async
// (both fit the 48 KiB of static shared memory without an opt-in: 40 and 30 KiB).
// MIN_BLOCKS: the launcher takes the first tile (largest first) whose grid has at least this
// many blocks, else the last one (a one-wave rule like gemm.cu's: 132 SMs on an H100/H200).
#pragma once

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
