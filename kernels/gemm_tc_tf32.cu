// gemm_tc_tf32.cu: the TF32 tensor-core GEMM entry points (contract and launch: gemm_tc.cuh).
#include "gemm_tc.cuh"

GEMM_TC_ENTRY_POINTS(tf32, MathTf32)
