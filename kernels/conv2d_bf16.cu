// conv2d_bf16.cu: the BF16 tensor-core convolution entry points (mma.sync m16n8k16 .bf16, FP32
// accumulate; precision bf16). Contract, layouts and launch: conv_core.cuh.
#include "conv_core.cuh"

CONV_ENTRY_POINTS(bf16, MathBf16)
