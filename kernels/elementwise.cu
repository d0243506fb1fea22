// elementwise.cu: activations, dropout, bias gradients, in-place add/scale, deterministic sums
// of squares (global norm, MSE), one-hot targets and the batch gather from uint8 images.
//
// Layouts: every float array is float32, dense, addressed by a flat 64-bit index; n < 2^63.
// Launch (unless stated): 1-D grid-stride, block 256, any grid size (the host caps it at a few
// blocks per SM). Outputs may alias inputs where the Backend contract allows it (activation
// out = x, activation_bwd out = dy, dropout out = x, mse dpred = pred): no __restrict__ there.
//
// Entry points:
//   relu_fwd, tanh_fwd, sigmoid_fwd (x, y, n)          y = f(x)
//   relu_bwd, tanh_bwd, sigmoid_bwd (y, dy, dx, n)     dx from the forward OUTPUT y
//   dropout_fwd (x, y, mask, n, seed, offset, offset_at, keep_threshold, scale)
//       o = offset + offset_at[0] (a device int64 counter, so a replayed CUDA graph draws fresh
//       numbers each step; 0 for a host offset);
//       mask[i] = (gpuml_uniform_bits24(seed, o + i) >= keep_threshold), uint8;
//       y = x * scale where kept else 0. keep_threshold = ceil(p * 2^24) and scale = 1/(1-p),
//       computed on the host, reproduce rng.keep_mask bit for bit.
//   dropout_bwd (dy, mask, dx, n, scale)               dx = dy * mask * scale
//   bias_grad_nc (dy, db, N, C)       db[c] = sum_n dy[n, c]. Block (32, 8), grid ceil(C / 32):
//       thread (x, y) sums rows y, y+8, ... of column c in order, then row 0 of the block adds
//       the 8 partials in order. Deterministic, coalesced across columns.
//   bias_grad_nchw (dy, db, N, C, HW) db[c] = sum over n, h, w. Block 256, grid C; fixed
//       per-thread order and a fixed tree: deterministic.
//   add_scaled_inplace (dst, src, alpha, n)   dst += alpha * src
//   scale_inplace (dst, factor, n); scale_inplace_by_device (dst, factor_ptr, n)
//   clip_factor (norm_ptr, factor_ptr, max_norm)   factor = min(1, max_norm / (norm + 1e-6)); grid 1
//   sum_squares_partial (tensor_ptrs, offsets, num_tensors, partials)
//       tensors laid end to end (see gpuml_tensor_of); block b writes the sum of squares of its
//       grid-stride share, in double, to partials[b]. Fixed grid => fixed result.
//   mse_partial (pred, target, dpred, n, grad_scale, partials)
//       dpred = grad_scale * (pred - target); partials[b] = this block's sum of (pred - target)^2.
//   sum_partials_final (partials, count, out, scale, take_sqrt)   one block of 256 threads:
//       out[0] = scale * sum(partials), square-rooted when take_sqrt != 0.
//   one_hot (labels, out, B, K)   out[b, k] = 1 if k == labels[b] else 0, out float32 (B, K),
//       labels int32 (B,); writes every element (no memset needed, nothing allocated). A label
//       outside [0, K) gives a row of NaN (visible, never silently wrong).
//   gather_batch (images, labels, indices, start_at, out_x, out_y, B, D, index_is_64, label_kind,
//       scale, shift)   i_j = indices[start_at[0] + j] (start_at a device int64 cursor, read on the
//       device so a replayed graph walks the epoch's permutation);
//       out_x[j, p] = images[i_j, p] * scale + shift (uint8 images (N, D));
//       out_y[j] = labels[indices[j]] as int32; label_kind 0 = uint8, 1 = int32, 2 = int64;
//       indices int32 or (index_is_64) int64. Grid (x covers D, y covers rows), block 256.
//   counters_advance (counters, increments, n)   counters[i] += increments[i], int64, one thread:
//       the per-step values of a training step (RNG offset, batch cursor, schedule row) bumped
//       on the device, inside the step's CUDA graph.
//   hyper_row_copy (rows, index_at, hyper, row_len)   hyper[k] = rows[index_at[0] * row_len + k],
//       float32, one block: the optimizer's hyperparameters of this step from a device table.
// Precision: float32 with accurate tanhf / expf; sums of squares accumulate in double.
#include "common.cuh"

#define EW_THREADS 256

#define GRID_STRIDE_LOOP(i, n)                                                                        \
    for (gpuml_i64 i = (gpuml_i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                   \
         i += (gpuml_i64)gridDim.x * blockDim.x)

// ---------------------------------------------------------------------------------------------
// Activations.

extern "C" __global__ void relu_fwd(const float* x, float* y, gpuml_i64 n) {
    GRID_STRIDE_LOOP(i, n) y[i] = gpuml_relu(x[i]);
}

extern "C" __global__ void tanh_fwd(const float* x, float* y, gpuml_i64 n) {
    GRID_STRIDE_LOOP(i, n) y[i] = tanhf(x[i]);
}

extern "C" __global__ void sigmoid_fwd(const float* x, float* y, gpuml_i64 n) {
    GRID_STRIDE_LOOP(i, n) y[i] = 1.0f / (1.0f + expf(-x[i]));
}

extern "C" __global__ void relu_bwd(const float* __restrict__ y, const float* dy, float* dx, gpuml_i64 n) {
    GRID_STRIDE_LOOP(i, n) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

extern "C" __global__ void tanh_bwd(const float* __restrict__ y, const float* dy, float* dx, gpuml_i64 n) {
    GRID_STRIDE_LOOP(i, n) {
        const float v = y[i];
        dx[i] = dy[i] * (1.0f - v * v);
    }
}

extern "C" __global__ void sigmoid_bwd(const float* __restrict__ y, const float* dy, float* dx, gpuml_i64 n) {
    GRID_STRIDE_LOOP(i, n) {
        const float v = y[i];
        dx[i] = dy[i] * v * (1.0f - v);
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout.

extern "C" __global__ void dropout_fwd(const float* x, float* y, unsigned char* __restrict__ mask, gpuml_i64 n,
                                       gpuml_u64 seed, gpuml_u64 offset, const gpuml_i64* __restrict__ offset_at,
                                       unsigned int keep_threshold, float scale) {
    const gpuml_u64 base = offset + (gpuml_u64)offset_at[0];
    GRID_STRIDE_LOOP(i, n) {
        const bool keep = gpuml_uniform_bits24(seed, base + (gpuml_u64)i) >= keep_threshold;
        mask[i] = keep ? 1 : 0;
        y[i] = keep ? x[i] * scale : 0.0f;
    }
}

extern "C" __global__ void dropout_bwd(const float* dy, const unsigned char* __restrict__ mask, float* dx,
                                       gpuml_i64 n, float scale) {
    GRID_STRIDE_LOOP(i, n) dx[i] = mask[i] ? dy[i] * scale : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// Bias gradients (no atomics).

#define BIAS_NC_COLS 32
#define BIAS_NC_ROWS 8

extern "C" __global__ void __launch_bounds__(BIAS_NC_COLS * BIAS_NC_ROWS)
    bias_grad_nc(const float* __restrict__ dy, float* __restrict__ db, int N, int C) {
    __shared__ float partial[BIAS_NC_ROWS][BIAS_NC_COLS + 1];
    const int c = blockIdx.x * BIAS_NC_COLS + threadIdx.x;
    float acc = 0.0f;
    if (c < C)
        for (int r = threadIdx.y; r < N; r += BIAS_NC_ROWS) acc += dy[(gpuml_i64)r * C + c];
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float total = 0.0f;
#pragma unroll
        for (int r = 0; r < BIAS_NC_ROWS; ++r) total += partial[r][threadIdx.x];
        db[c] = total;
    }
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
    bias_grad_nchw(const float* __restrict__ dy, float* __restrict__ db, int N, int C, int HW) {
    __shared__ float scratch[EW_THREADS / 32];
    const int c = blockIdx.x;
    float acc = 0.0f;
    for (int n = 0; n < N; ++n) {
        const float* plane = dy + ((gpuml_i64)n * C + c) * HW;
        for (int p = threadIdx.x; p < HW; p += EW_THREADS) acc += plane[p];
    }
    acc = gpuml_block_sum(acc, scratch);
    if (threadIdx.x == 0) db[c] = acc;
}

// ---------------------------------------------------------------------------------------------
// In-place arithmetic.

extern "C" __global__ void add_scaled_inplace(float* dst, const float* src, float alpha, gpuml_i64 n) {
    GRID_STRIDE_LOOP(i, n) dst[i] += alpha * src[i];
}

extern "C" __global__ void scale_inplace(float* __restrict__ dst, float factor, gpuml_i64 n) {
    GRID_STRIDE_LOOP(i, n) dst[i] *= factor;
}

// factor_ptr must not point into dst (another block could scale it before this one reads it).
extern "C" __global__ void scale_inplace_by_device(float* __restrict__ dst, const float* __restrict__ factor_ptr,
                                                   gpuml_i64 n) {
    const float factor = *factor_ptr;
    GRID_STRIDE_LOOP(i, n) dst[i] *= factor;
}

// clip_factor (norm_ptr, factor_ptr, max_norm): one thread; factor = min(1, max_norm / (norm + 1e-6)),
// the gradient-clipping scale, computed on the device so clipping needs no host round trip.
extern "C" __global__ void clip_factor(const float* __restrict__ norm_ptr, float* __restrict__ factor_ptr,
                                       float max_norm) {
    if (blockIdx.x == 0 && threadIdx.x == 0) factor_ptr[0] = fminf(1.0f, max_norm / (norm_ptr[0] + 1e-6f));
}

// ---------------------------------------------------------------------------------------------
// Deterministic sums: per-block partials (double), then one block adds them in order.

extern "C" __global__ void __launch_bounds__(EW_THREADS)
    sum_squares_partial(const float* const* __restrict__ tensor_ptrs, const gpuml_i64* __restrict__ offsets,
                        int num_tensors, double* __restrict__ partials) {
    __shared__ double scratch[EW_THREADS / 32];
    const gpuml_i64 total = offsets[num_tensors];
    double acc = 0.0;
    int t = 0;
    GRID_STRIDE_LOOP(i, total) {
        t = gpuml_tensor_of(offsets, t, i);
        const float v = tensor_ptrs[t][i - offsets[t]];
        acc += (double)v * (double)v;
    }
    acc = gpuml_block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
    mse_partial(const float* pred, const float* __restrict__ target, float* dpred, gpuml_i64 n,
                float grad_scale, double* __restrict__ partials) {
    __shared__ double scratch[EW_THREADS / 32];
    double acc = 0.0;
    GRID_STRIDE_LOOP(i, n) {
        const float diff = pred[i] - target[i];
        dpred[i] = grad_scale * diff;
        acc += (double)diff * (double)diff;
    }
    acc = gpuml_block_sum(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

extern "C" __global__ void __launch_bounds__(EW_THREADS)
    sum_partials_final(const double* __restrict__ partials, int count, float* __restrict__ out, double scale,
                       int take_sqrt) {
    __shared__ double scratch[EW_THREADS / 32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += EW_THREADS) acc += partials[i];
    acc = gpuml_block_sum(acc, scratch);
    if (threadIdx.x == 0) out[0] = (float)(take_sqrt ? sqrt(acc * scale) : acc * scale);
}

// ---------------------------------------------------------------------------------------------
// One-hot targets (MSE on integer labels).

extern "C" __global__ void __launch_bounds__(EW_THREADS)
    one_hot(const int* __restrict__ labels, float* __restrict__ out, int B, int K) {
    GRID_STRIDE_LOOP(i, (gpuml_i64)B * K) {
        const int b = (int)(i / K);
        const int k = (int)(i - (gpuml_i64)b * K);
        const int label = labels[b];
        out[i] = (label < 0 || label >= K) ? __int_as_float(0x7fc00000) : (k == label ? 1.0f : 0.0f);
    }
}

// ---------------------------------------------------------------------------------------------
// Batch gather.

extern "C" __global__ void __launch_bounds__(EW_THREADS)
    gather_batch(const unsigned char* __restrict__ images, const void* __restrict__ labels,
                 const void* __restrict__ indices, const gpuml_i64* __restrict__ start_at,
                 float* __restrict__ out_x, int* __restrict__ out_y, int B, gpuml_i64 D, int index_is_64,
                 int label_kind, float scale, float shift) {
    const gpuml_i64 start = start_at[0];
    for (int j = blockIdx.y; j < B; j += gridDim.y) {
        const gpuml_i64 src = index_is_64 ? static_cast<const gpuml_i64*>(indices)[start + j]
                                          : (gpuml_i64) static_cast<const int*>(indices)[start + j];
        const unsigned char* image = images + src * D;
        float* dst = out_x + (gpuml_i64)j * D;
        for (gpuml_i64 p = (gpuml_i64)blockIdx.x * blockDim.x + threadIdx.x; p < D;
             p += (gpuml_i64)gridDim.x * blockDim.x)
            dst[p] = (float)image[p] * scale + shift;
        if (blockIdx.x == 0 && threadIdx.x == 0) {
            int label;
            if (label_kind == 0)
                label = static_cast<const unsigned char*>(labels)[src];
            else if (label_kind == 1)
                label = static_cast<const int*>(labels)[src];
            else
                label = (int)static_cast<const gpuml_i64*>(labels)[src];
            out_y[j] = label;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Per-step values of a captured training step (gpuml/backend/cuda/graph.py).

extern "C" __global__ void counters_advance(gpuml_i64* __restrict__ counters,
                                            const gpuml_i64* __restrict__ increments, int n) {
    if (blockIdx.x == 0 && threadIdx.x == 0)
        for (int i = 0; i < n; ++i) counters[i] += increments[i];
}

extern "C" __global__ void hyper_row_copy(const float* __restrict__ rows, const gpuml_i64* __restrict__ index_at,
                                          float* __restrict__ hyper, int row_len) {
    const gpuml_i64 row = index_at[0];
    for (int k = threadIdx.x; k < row_len; k += blockDim.x) hyper[k] = rows[row * row_len + k];
}
