// softmax_xent.cu: fused softmax + cross-entropy in ONE launch: dlogits, the batch-mean loss
// and, for the trainer's metrics, the count of correct predictions and the running sums
// acc[0] += B * loss, acc[1] += correct; and a standalone count of correct predictions.
//
// Layout: logits (B, K) float32 row-major, labels int32 (B,) in [0, K), row_loss float32 (B,).
// Target t = (1 - eps) * onehot(label) + eps / K (label smoothing eps).
//   row_loss[b] = logsumexp(x_b) - sum_k t_k x_bk
//               = log(s) - (1 - eps) (x_b,label - m) - (eps / K) sum_k (x_bk - m)
//   dlogits[b, k] = (softmax(x_b)_k - t_k) * inv_batch          (inv_batch = 1 / B)
// with m the row max and s = sum_k exp(x_bk - m). Every term is formed from max-shifted logits
// (the weights 1 - eps and eps sum to 1, so m cancels): unshifted, m + log(s) - x_label cancels
// catastrophically once |x| >> the loss (logits near 1e4 lost 3e-4 of it in float32); shifted,
// every term is >= 0 and the loss keeps float32's relative accuracy at any offset.
// One read pass computes m and s online and the label's logit; a second pass reads x again,
// writes dlogits and sums x - m for the smoothing term. dlogits may alias logits (llm.c's
// trick): every element is read then written by the same thread, and the second pass starts
// only after the max and the sum were reduced over the whole row.
// A label outside [0, K) gives a NaN row loss (visible, never silently wrong).
//
// The first pass also finds each row's first argmax (count_correct's rule) and stores
// row_correct[b] = (argmax == label). The last block to finish (gpuml_last_block, one ticket)
// then writes loss[0] = inv_batch * sum(row_loss), summed in double in a fixed order
// (deterministic, no float atomics), and with `accumulate` adds batch * loss and the correct
// count to acc[0], acc[1] (float32, as add_ did: acc[0] + batch * loss).
//
// Entry points and launch:
//   softmax_xent_fwd_bwd_warp   one warp per row, 256 threads (8 rows) per block,
//                               grid ceil(B / 8). For small K (classifier heads, K = 10).
//   softmax_xent_fwd_bwd_block  one block of 256 threads per row, grid B. For large K
//                               (K = 32000); vec4 != 0 reads and writes float4, allowed when
//                               K % 4 == 0 and logits, dlogits are 16-byte aligned.
//   Both take row_loss float (B,), row_correct int (B,) scratch, loss (1,), acc (2,) (read
//   only with accumulate != 0) and a zeroed unsigned ticket counter.
//   count_correct               8 warps per block, warp per row, rows grid-strided; each block
//                               writes its count of rows whose first argmax equals the label
//                               to block_counts, the last block (ticket) writes out[0] =
//                               (float) their sum. One launch.
// Precision: float32 with accurate expf / logf (no fast-math).
#include "common.cuh"

#define XENT_THREADS 256

// Running (max, sum of exp(x - max)) of a set of logits, and how to merge two of them.
struct OnlineSoftmax {
    float max;
    float sum;
};

__device__ __forceinline__ void online_add(OnlineSoftmax& acc, float x) {
    if (x > acc.max) {
        acc.sum = acc.sum * expf(acc.max - x) + 1.0f;  // expf(-inf) = 0 on the first element
        acc.max = x;
    } else {
        acc.sum += expf(x - acc.max);
    }
}

// Commutative bit for bit (a + b == b + a), so butterfly partners end with the same value.
// An empty side (max = -inf, sum = 0) contributes nothing without forming -inf - -inf.
__device__ __forceinline__ OnlineSoftmax online_merge(OnlineSoftmax a, OnlineSoftmax b) {
    const float m = fmaxf(a.max, b.max);
    const float sa = (a.max == m) ? a.sum : a.sum * expf(a.max - m);
    const float sb = (b.max == m) ? b.sum : b.sum * expf(b.max - m);
    return {m, sa + sb};
}

__device__ __forceinline__ OnlineSoftmax warp_merge(OnlineSoftmax v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        OnlineSoftmax other;
        other.max = __shfl_xor_sync(GPUML_FULL_MASK, v.max, offset);
        other.sum = __shfl_xor_sync(GPUML_FULL_MASK, v.sum, offset);
        v = online_merge(v, other);
    }
    return v;
}

// First argmax of a row: a thread keeps its first maximum (strict >, the first element always
// taken), partners merge by (larger value, then smaller index). count_correct's rule.
struct ArgMax {
    float best;
    int k;  // K (larger than any index) while the thread has seen nothing
};

__device__ __forceinline__ void argmax_add(ArgMax& a, float v, int k, int K) {
    if (v > a.best || a.k == K) {
        a.best = v;
        a.k = k;
    }
}

__device__ __forceinline__ void argmax_merge(ArgMax& a, float other, int other_k) {
    if (other > a.best || (other == a.best && other_k < a.k)) {
        a.best = other;
        a.k = other_k;
    }
}

__device__ __forceinline__ ArgMax argmax_warp(ArgMax a) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float other = __shfl_xor_sync(GPUML_FULL_MASK, a.best, offset);
        const int other_k = __shfl_xor_sync(GPUML_FULL_MASK, a.k, offset);
        argmax_merge(a, other, other_k);
    }
    return a;
}

// Per-row statistics gathered by the first pass.
struct RowStats {
    OnlineSoftmax softmax;
    float x_label;  // the label's logit (0 on every thread but its owner until reduced)
    ArgMax argmax;
};

__device__ __forceinline__ void stats_add(RowStats& st, float x, int k, int label, int K) {
    online_add(st.softmax, x);
    if (k == label) st.x_label = x;
    argmax_add(st.argmax, x, k, K);
}

// The last block's work: loss[0] = inv_batch * sum of row_loss (double, fixed order) and, with
// accumulate, acc[0] += batch * loss, acc[1] += sum of row_correct. All threads call it;
// the scratch arrays are the kernel's (XENT_THREADS / 32 slots each).
struct FinishScratch {
    double dsum[XENT_THREADS / 32];
    int isum[XENT_THREADS / 32];
    int last;
};

__device__ __forceinline__ void xent_finish(const float* row_loss, const int* row_correct, int B, float* loss,
                                            float* acc, float inv_batch, int accumulate, FinishScratch& sh) {
    double sum = 0.0;
    int correct = 0;
    for (int b = threadIdx.x; b < B; b += XENT_THREADS) {
        sum += (double)__ldcg(row_loss + b);
        correct += __ldcg(row_correct + b);
    }
    sum = gpuml_block_sum(sum, sh.dsum);
    correct = gpuml_block_sum(correct, sh.isum);
    if (threadIdx.x == 0) {
        const float mean = (float)(sum * (double)inv_batch);
        loss[0] = mean;
        if (accumulate) {
            acc[0] += (float)B * mean;  // a NaN loss stays NaN in the sum
            acc[1] += (float)correct;
        }
    }
}

// sum_shifted = sum_k (x_k - m) over the whole row (the second pass).
__device__ __forceinline__ float row_loss_from(const RowStats& st, float sum_shifted, int label, int K,
                                               float eps) {
    if (label < 0 || label >= K) return __int_as_float(0x7fc00000);  // NaN
    const float m = st.softmax.max;
    return logf(st.softmax.sum) - (1.0f - eps) * (st.x_label - m) - (eps / (float)K) * sum_shifted;
}

__device__ __forceinline__ float dlogit(float x, int k, int label, float row_max, float inv_sum, float eps,
                                        float eps_over_k, float inv_batch) {
    const float p = expf(x - row_max) * inv_sum;
    const float t = (k == label ? 1.0f - eps : 0.0f) + eps_over_k;
    return (p - t) * inv_batch;
}

// ---------------------------------------------------------------------------------------------
// Small K: one warp per row.

__device__ __forceinline__ void xent_row_warp(const float* logits, const int* __restrict__ labels, float* dlogits,
                                              float* __restrict__ row_loss, int* __restrict__ row_correct, int row,
                                              int K, float eps, float inv_batch) {
    const int lane = threadIdx.x & 31;
    const float* x = logits + (gpuml_i64)row * K;
    float* d = dlogits + (gpuml_i64)row * K;
    const int label = labels[row];

    RowStats st = {{GPUML_NEG_INF, 0.0f}, 0.0f, {GPUML_NEG_INF, K}};
    for (int k = lane; k < K; k += 32) stats_add(st, x[k], k, label, K);
    st.softmax = warp_merge(st.softmax);
    st.x_label = gpuml_warp_sum(st.x_label);  // one non-zero term: exact
    st.argmax = argmax_warp(st.argmax);

    const float m = st.softmax.max;
    const float inv_sum = 1.0f / st.softmax.sum;
    const float eps_over_k = eps / (float)K;
    float sum_shifted = 0.0f;
    for (int k = lane; k < K; k += 32) {
        const float v = x[k];
        sum_shifted += v - m;
        d[k] = dlogit(v, k, label, m, inv_sum, eps, eps_over_k, inv_batch);
    }
    sum_shifted = gpuml_warp_sum(sum_shifted);
    if (lane == 0) {
        row_loss[row] = row_loss_from(st, sum_shifted, label, K, eps);
        row_correct[row] = st.argmax.k == label;
    }
}

extern "C" __global__ void __launch_bounds__(XENT_THREADS)
    softmax_xent_fwd_bwd_warp(const float* logits, const int* __restrict__ labels, float* dlogits,
                              float* __restrict__ row_loss, int* __restrict__ row_correct, float* __restrict__ loss,
                              float* __restrict__ acc, unsigned int* __restrict__ ticket, int B, int K, float eps,
                              float inv_batch, int accumulate) {
    __shared__ FinishScratch finish;
    const int row = blockIdx.x * (XENT_THREADS / 32) + (threadIdx.x >> 5);
    // Whole warps skip together (the shuffles stay full-warp); every thread reaches the ticket.
    if (row < B) xent_row_warp(logits, labels, dlogits, row_loss, row_correct, row, K, eps, inv_batch);
    if (gpuml_last_block(ticket, gridDim.x, &finish.last))
        xent_finish(row_loss, row_correct, B, loss, acc, inv_batch, accumulate, finish);
}

// ---------------------------------------------------------------------------------------------
// Large K: one block per row.

extern "C" __global__ void __launch_bounds__(XENT_THREADS)
    softmax_xent_fwd_bwd_block(const float* logits, const int* __restrict__ labels, float* dlogits,
                               float* __restrict__ row_loss, int* __restrict__ row_correct,
                               float* __restrict__ loss, float* __restrict__ acc, unsigned int* __restrict__ ticket,
                               int B, int K, float eps, float inv_batch, int accumulate, int vec4) {
    __shared__ float max_slots[XENT_THREADS / 32];
    __shared__ float sum_slots[XENT_THREADS / 32];
    __shared__ float scratch[XENT_THREADS / 32];
    __shared__ float best_slots[XENT_THREADS / 32];
    __shared__ int best_k_slots[XENT_THREADS / 32];
    __shared__ FinishScratch finish;
    const int row = blockIdx.x;
    const float* x = logits + (gpuml_i64)row * K;
    float* d = dlogits + (gpuml_i64)row * K;
    const int label = labels[row];
    const int tid = threadIdx.x;

    RowStats st = {{GPUML_NEG_INF, 0.0f}, 0.0f, {GPUML_NEG_INF, K}};
    if (vec4) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
        for (int q = tid; q < K / 4; q += XENT_THREADS) {
            const float4 v = x4[q];
            stats_add(st, v.x, 4 * q, label, K);
            stats_add(st, v.y, 4 * q + 1, label, K);
            stats_add(st, v.z, 4 * q + 2, label, K);
            stats_add(st, v.w, 4 * q + 3, label, K);
        }
    } else {
        for (int k = tid; k < K; k += XENT_THREADS) stats_add(st, x[k], k, label, K);
    }

    // Block merge: warps merge by butterfly, then every warp merges the per-warp slots in the
    // same order, so all threads hold identical row statistics.
    st.softmax = warp_merge(st.softmax);
    st.argmax = argmax_warp(st.argmax);
    if ((tid & 31) == 0) {
        max_slots[tid >> 5] = st.softmax.max;
        sum_slots[tid >> 5] = st.softmax.sum;
        best_slots[tid >> 5] = st.argmax.best;
        best_k_slots[tid >> 5] = st.argmax.k;
    }
    __syncthreads();
    OnlineSoftmax total = {GPUML_NEG_INF, 0.0f};
    if ((tid & 31) < XENT_THREADS / 32) total = {max_slots[tid & 31], sum_slots[tid & 31]};
    st.softmax = warp_merge(total);
    st.x_label = gpuml_block_sum(st.x_label, scratch);  // its barriers also end the read pass

    const float inv_sum = 1.0f / st.softmax.sum;
    const float eps_over_k = eps / (float)K;
    const float m = st.softmax.max;
    float sum_shifted = 0.0f;
    if (vec4) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
        float4* d4 = reinterpret_cast<float4*>(d);
        for (int q = tid; q < K / 4; q += XENT_THREADS) {
            const float4 v = x4[q];
            const int k = 4 * q;
            sum_shifted += (v.x - m) + (v.y - m) + (v.z - m) + (v.w - m);
            d4[q] = make_float4(dlogit(v.x, k, label, m, inv_sum, eps, eps_over_k, inv_batch),
                                dlogit(v.y, k + 1, label, m, inv_sum, eps, eps_over_k, inv_batch),
                                dlogit(v.z, k + 2, label, m, inv_sum, eps, eps_over_k, inv_batch),
                                dlogit(v.w, k + 3, label, m, inv_sum, eps, eps_over_k, inv_batch));
        }
    } else {
        for (int k = tid; k < K; k += XENT_THREADS) {
            const float v = x[k];
            sum_shifted += v - m;
            d[k] = dlogit(v, k, label, m, inv_sum, eps, eps_over_k, inv_batch);
        }
    }
    sum_shifted = gpuml_block_sum(sum_shifted, scratch);
    if (tid == 0) {
        ArgMax best = {best_slots[0], best_k_slots[0]};  // the warps' winners, in warp order
        for (int w = 1; w < XENT_THREADS / 32; ++w) argmax_merge(best, best_slots[w], best_k_slots[w]);
        row_loss[row] = row_loss_from(st, sum_shifted, label, K, eps);
        row_correct[row] = best.k == label;
    }
    if (gpuml_last_block(ticket, gridDim.x, &finish.last))
        xent_finish(row_loss, row_correct, B, loss, acc, inv_batch, accumulate, finish);
}

// ---------------------------------------------------------------------------------------------
// Accuracy: rows whose first argmax equals the label. Integer sums are exact in any order.

extern "C" __global__ void __launch_bounds__(XENT_THREADS)
    count_correct(const float* __restrict__ logits, const int* __restrict__ labels, int B, int K,
                  int* __restrict__ block_counts, unsigned int* __restrict__ ticket, float* __restrict__ out) {
    __shared__ int scratch[XENT_THREADS / 32];
    __shared__ int last_flag;
    const int lane = threadIdx.x & 31;
    const int warps_per_block = XENT_THREADS / 32;
    int correct = 0;
    for (int row = blockIdx.x * warps_per_block + (threadIdx.x >> 5); row < B;
         row += gridDim.x * warps_per_block) {
        const float* x = logits + (gpuml_i64)row * K;
        ArgMax best = {GPUML_NEG_INF, K};
        for (int k = lane; k < K; k += 32) argmax_add(best, x[k], k, K);
        best = argmax_warp(best);
        if (lane == 0 && best.k == labels[row]) ++correct;
    }
    correct = gpuml_block_sum(correct, scratch);
    if (threadIdx.x == 0) block_counts[blockIdx.x] = correct;
    if (!gpuml_last_block(ticket, gridDim.x, &last_flag)) return;
    int total = 0;  // integers: exact in any order
    for (int b = threadIdx.x; b < (int)gridDim.x; b += XENT_THREADS) total += __ldcg(block_counts + b);
    total = gpuml_block_sum(total, scratch);
    if (threadIdx.x == 0) out[0] = (float)total;
}
