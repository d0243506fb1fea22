// conv2d_tf32.cu: the TF32 tensor-core convolution entry points (mma.sync m16n8k8 .tf32, FP32
// accumulate; precision tf32). Contract, layouts and launch: conv_core.cuh.
#include "conv_core.cuh"

CONV_ENTRY_POINTS(tf32, MathTf32)
