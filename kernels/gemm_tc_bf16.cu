// gemm_tc_bf16.cu: the BF16 tensor-core GEMM entry points (contract and launch: gemm_tc.cuh).
#include "gemm_tc.cuh"

GEMM_TC_ENTRY_POINTS(bf16, MathBf16)
