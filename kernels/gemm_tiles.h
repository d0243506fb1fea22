// gemm_tiles.h: the tile shapes of the tensor-core GEMM (gemm_core.cuh, gemm_tc.cu), in ONE place:
// the kernels include this file and gpuml/backend/cuda/launch.py parses its `#define NAME value`
// lines (plain integers only), so a grid and the kernel it launches cannot disagree.
//
// Block tile BM x BN, K step BK; WARPS_M x WARPS_N warps, each owning a (BM / WARPS_M) x
// (BN / WARPS_N) piece of the tile as 16 x 8 mma tiles; STAGES shared-memory buffers filled by
// cp.async (2 stages of 20 KiB fit the 48 KiB of static shared memory without an opt-in).
#pragma once

#define GEMM_TC_BM 128
#define GEMM_TC_BN 128
#define GEMM_TC_BK 16
#define GEMM_TC_WARPS_M 2
#define GEMM_TC_WARPS_N 4
#define GEMM_TC_STAGES 2
