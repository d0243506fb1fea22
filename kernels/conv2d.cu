// conv2d.cu: the FP32 convolution entry points (FP32 FFMA on the GEMM core; precision fp32).
// Contract, layouts and launch: conv_core.cuh; gathers: conv_gather.cuh.
#include "conv_core.cuh"

CONV_ENTRY_POINTS(fp32, MathFfma)
