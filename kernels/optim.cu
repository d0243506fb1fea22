// optim.cu: fused optimizer updates of ALL parameter tensors of a model in ONE launch.
//
// Tensor table: the host uploads, once per parameter list, a device array `table` of
// num_slots * T float pointers, slot-major: table[s * T + t] is slot s of tensor t (slot 0 =
// parameter, 1 = gradient, then the optimizer state in the order listed per kernel), and
// `offsets` (int64, T + 1 entries): tensor t owns flat elements [offsets[t], offsets[t+1]).
// Blocks map to flat element ranges by a grid-stride loop over offsets[T] elements; each thread
// walks the tensors forward (gpuml_tensor_of) and reloads its pointers only on a change.
//
// Hyperparameters come from a small device buffer `hyper` (float32, HYPER_SIZE entries) and not
// from kernel arguments, so a captured CUDA graph of the training step stays valid while the
// learning rate and the step count change: the host refreshes `hyper` with an async copy
// before each step. Layout (mirrored in gpuml/backend/cuda_optim.py):
//   [0] lr  [1] weight_decay  [2] beta1 | momentum | alpha  [3] beta2  [4] eps
//   [5] 1 - beta1^step  [6] 1 - beta2^step  [7] 1 - beta1 | 1 - alpha  [8] 1 - beta2
// The complements 1 - beta are computed by the host in float64 and rounded once: formed here
// as 1.0f - beta2 they would inherit beta2's float32 rounding, magnified 1 / (1 - beta2) times
// (1 - 0.999f is 1.29e-5 relatively off 1e-3, which biases v and every Adam step).
// Structural choices that never change within a run (nesterov, decoupled) are int arguments.
// Every update reads the gradient as g * grad_scale[0] (a device float: 1, or the clipping
// factor grad_clip_factor wrote in the same step), so clipping needs no pass over the gradients;
// the product is rounded on its own (__fmul_rn), as the separate scaling pass stored it.
//
// Entry points (slots after param, grad):
//   sgd_step       ()              p -= lr (g + wd p)
//   momentum_step  (velocity)      g' = g + wd p; v = mu v + g'; p -= lr (nesterov ? g' + mu v : v)
//   adam_step      (m, v)          decoupled: p *= 1 - lr wd, g' = g; else g' = g + wd p;
//                                  m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2;
//                                  p -= (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps)
//   rmsprop_step   (square_avg)    g' = g + wd p; s = alpha s + (1-alpha) g'^2;
//                                  p -= lr g' / (sqrt(s) + eps)
//   grad_clip_factor (one slot: the gradients; partials double (gridDim.x), ticket, norm, factor,
//                  max_norm)  norm = sqrt(sum of g^2) (double, per-block partials added by the
//                  last block in block order: a grid fixed by the size gives fixed bits), factor =
//                  min(1, max_norm / (norm + 1e-6)); ONE launch. The grid is the host's
//                  partials_grid(total), the same sums as elementwise.cu's global norm.
// Launch: block 256, 1-D grid of any size (the host uses a few blocks per SM), no shared memory.
// Precision: float32 arithmetic per element (matches PyTorch's single-tensor fp32 updates).
#include "common.cuh"

#define OPTIM_THREADS 256
// A minimum of 4 resident blocks caps registers at 64 (these kernels use at most 44). With only
// the block size given, ptxas (nvcc 13.0 for sm_80, NVRTC 13.0 for sm_80 and sm_90) spilled 4
// bytes in adam_step or rmsprop_step, at 32-40 registers; with the minimum it does not (seen,
// not documented behaviour: tests/test_kernels_compile.py and test_nvrtc_compile.py check).
#define OPTIM_MIN_BLOCKS 4

#define HYPER_LR 0
#define HYPER_WEIGHT_DECAY 1
#define HYPER_BETA1 2
#define HYPER_MOMENTUM 2
#define HYPER_ALPHA 2
#define HYPER_BETA2 3
#define HYPER_EPS 4
#define HYPER_BIAS_CORRECTION1 5
#define HYPER_BIAS_CORRECTION2 6
#define HYPER_ONE_MINUS_BETA1 7
#define HYPER_ONE_MINUS_ALPHA 7
#define HYPER_ONE_MINUS_BETA2 8

// The current tensor of a grid-stride walk and its slot pointers.
template <int NUM_SLOTS>
struct TensorCursor {
    float* const* table;
    const gpuml_i64* offsets;
    int num_tensors;
    int t;
    gpuml_i64 begin, end;
    float* slot[NUM_SLOTS];

    __device__ __forceinline__ TensorCursor(float* const* table_, const gpuml_i64* offsets_, int num_tensors_)
        : table(table_), offsets(offsets_), num_tensors(num_tensors_), t(0), begin(0), end(0) {
#pragma unroll
        for (int s = 0; s < NUM_SLOTS; ++s) slot[s] = nullptr;
    }

    // Moves to the tensor holding flat element i; returns the index within that tensor.
    __device__ __forceinline__ gpuml_i64 seek(gpuml_i64 i) {
        if (i >= end) {
            t = gpuml_tensor_of(offsets, t, i);
            begin = offsets[t];
            end = offsets[t + 1];
#pragma unroll
            for (int s = 0; s < NUM_SLOTS; ++s) slot[s] = table[s * num_tensors + t];
        }
        return i - begin;
    }
};

#define OPTIM_LOOP(i, total)                                                                          \
    for (gpuml_i64 i = (gpuml_i64)blockIdx.x * blockDim.x + threadIdx.x; i < (total);               \
         i += (gpuml_i64)gridDim.x * blockDim.x)

// ---------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(OPTIM_THREADS, OPTIM_MIN_BLOCKS)
    sgd_step(float* const* __restrict__ table, const gpuml_i64* __restrict__ offsets, int num_tensors,
             const float* __restrict__ hyper, const float* __restrict__ grad_scale) {
    const float lr = hyper[HYPER_LR];
    const float wd = hyper[HYPER_WEIGHT_DECAY];
    const float gs = grad_scale[0];
    TensorCursor<2> cur(table, offsets, num_tensors);
    OPTIM_LOOP(i, offsets[num_tensors]) {
        const gpuml_i64 j = cur.seek(i);
        float* p = cur.slot[0];
        const float g = __fmul_rn(cur.slot[1][j], gs);
        p[j] -= lr * (g + wd * p[j]);
    }
}

extern "C" __global__ void __launch_bounds__(OPTIM_THREADS, OPTIM_MIN_BLOCKS)
    momentum_step(float* const* __restrict__ table, const gpuml_i64* __restrict__ offsets, int num_tensors,
                  const float* __restrict__ hyper, const float* __restrict__ grad_scale, int nesterov) {
    const float lr = hyper[HYPER_LR];
    const float wd = hyper[HYPER_WEIGHT_DECAY];
    const float mu = hyper[HYPER_MOMENTUM];
    const float gs = grad_scale[0];
    TensorCursor<3> cur(table, offsets, num_tensors);
    OPTIM_LOOP(i, offsets[num_tensors]) {
        const gpuml_i64 j = cur.seek(i);
        const float p = cur.slot[0][j];
        const float g = __fmul_rn(cur.slot[1][j], gs) + wd * p;
        const float v = mu * cur.slot[2][j] + g;
        cur.slot[2][j] = v;
        cur.slot[0][j] = p - lr * (nesterov ? g + mu * v : v);
    }
}

extern "C" __global__ void __launch_bounds__(OPTIM_THREADS, OPTIM_MIN_BLOCKS)
    adam_step(float* const* __restrict__ table, const gpuml_i64* __restrict__ offsets, int num_tensors,
              const float* __restrict__ hyper, const float* __restrict__ grad_scale, int decoupled) {
    // PyTorch's (and the CPU backend's) arrangement: p = p decay - lr_t m / (sqrt(v) inv_sqrt_bc2
    // + eps), lr_t = lr / bc1, inv_sqrt_bc2 = 1 / sqrt(bc2), with the L2 term and the decoupled
    // decay folded into constants before the loop: fewer values live across the division's
    // slow path (a call), around which ptxas otherwise spills.
    const float lr = hyper[HYPER_LR];
    const float wd = hyper[HYPER_WEIGHT_DECAY];
    const float beta1 = hyper[HYPER_BETA1];
    const float beta2 = hyper[HYPER_BETA2];
    const float one_minus_beta1 = hyper[HYPER_ONE_MINUS_BETA1];
    const float one_minus_beta2 = hyper[HYPER_ONE_MINUS_BETA2];
    const float eps = hyper[HYPER_EPS];
    const float lr_t = lr / hyper[HYPER_BIAS_CORRECTION1];
    const float inv_sqrt_bc2 = 1.0f / sqrtf(hyper[HYPER_BIAS_CORRECTION2]);
    const float l2 = decoupled ? 0.0f : wd;
    const float decay = decoupled ? 1.0f - lr * wd : 1.0f;
    const float gs = grad_scale[0];
    TensorCursor<4> cur(table, offsets, num_tensors);
    OPTIM_LOOP(i, offsets[num_tensors]) {
        const gpuml_i64 j = cur.seek(i);
        const float p = cur.slot[0][j];
        const float g = __fmul_rn(cur.slot[1][j], gs) + l2 * p;
        const float m = beta1 * cur.slot[2][j] + one_minus_beta1 * g;
        const float v = beta2 * cur.slot[3][j] + one_minus_beta2 * g * g;
        cur.slot[2][j] = m;
        cur.slot[3][j] = v;
        cur.slot[0][j] = p * decay - lr_t * m / (sqrtf(v) * inv_sqrt_bc2 + eps);
    }
}

extern "C" __global__ void __launch_bounds__(OPTIM_THREADS, OPTIM_MIN_BLOCKS)
    rmsprop_step(float* const* __restrict__ table, const gpuml_i64* __restrict__ offsets, int num_tensors,
                 const float* __restrict__ hyper, const float* __restrict__ grad_scale) {
    const float lr = hyper[HYPER_LR];
    const float wd = hyper[HYPER_WEIGHT_DECAY];
    const float alpha = hyper[HYPER_ALPHA];
    const float one_minus_alpha = hyper[HYPER_ONE_MINUS_ALPHA];
    const float eps = hyper[HYPER_EPS];
    const float gs = grad_scale[0];
    TensorCursor<3> cur(table, offsets, num_tensors);
    OPTIM_LOOP(i, offsets[num_tensors]) {
        const gpuml_i64 j = cur.seek(i);
        const float p = cur.slot[0][j];
        const float g = __fmul_rn(cur.slot[1][j], gs) + wd * p;
        const float s = alpha * cur.slot[2][j] + one_minus_alpha * g * g;
        cur.slot[2][j] = s;
        cur.slot[0][j] = p - lr * g / (sqrtf(s) + eps);
    }
}

// ---------------------------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(OPTIM_THREADS, OPTIM_MIN_BLOCKS)
    grad_clip_factor(float* const* __restrict__ table, const gpuml_i64* __restrict__ offsets, int num_tensors,
                     double* __restrict__ partials, unsigned int* __restrict__ ticket, float* __restrict__ norm,
                     float* __restrict__ factor, float max_norm) {
    __shared__ double scratch[OPTIM_THREADS / 32];
    __shared__ int last_flag;
    double acc = 0.0;
    int t = 0;
    OPTIM_LOOP(i, offsets[num_tensors]) {
        t = gpuml_tensor_of(offsets, t, i);
        const float v = table[t][i - offsets[t]];
        acc += (double)v * (double)v;
    }
    acc = gpuml_block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
    if (!gpuml_last_block(ticket, gridDim.x, &last_flag)) return;
    double sum = 0.0;
    for (int b = threadIdx.x; b < (int)gridDim.x; b += OPTIM_THREADS) sum += __ldcg(partials + b);
    sum = gpuml_block_sum(sum, scratch);
    if (threadIdx.x == 0) {
        const float n = (float)sqrt(sum);
        norm[0] = n;
        factor[0] = fminf(1.0f, max_norm / (n + 1e-6f));
    }
}
