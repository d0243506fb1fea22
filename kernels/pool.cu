// pool.cu: 2-D max and average pooling over NCHW planes, forward and backward.
//
// Shapes: x and dx (N, C, H, W) seen as NC = N*C planes of H x W; y, dy and argmax (N, C, P, Q),
// P = (H + 2ph - kh) / sh + 1, Q likewise (floor mode). All C-contiguous.
//
//   maxpool2d_fwd  y = max over the in-image cells of each window (padding never wins);
//                  argmax (int32) = h*W + w of the winner inside its plane. Ties go to the first
//                  cell in row-major window order; a NaN beats any number (so it propagates),
//                  the first NaN winning. A window with no in-image cell (impossible when
//                  pad <= k/2, which the launcher enforces) gives -inf and argmax -1.
//   maxpool2d_bwd  dx[h, w] = sum of dy[p, q] over the windows covering (h, w) whose argmax is
//                  h*W + w: a gather (Caffe's), one writer per dx element, no atomics, summed in
//                  row-major window order, so it is deterministic.
//   avgpool2d_fwd  y = (sum of the in-image cells of the window) / (kh*kw): count_include_pad,
//                  and in floor mode no window reaches past the padding, so kh*kw is exact.
//   avgpool2d_bwd  dx[h, w] = (sum of dy over the windows covering (h, w)) / (kh*kw), a gather.
//
// Launch: 1-D blocks of 256 threads, grid ceil(total / 256); one thread per output element
// (fwd, total = NC*P*Q) or per input element (bwd, total = NC*H*W). Consecutive threads take
// consecutive q (or w), so a warp's loads of each window row and its stores are coalesced.
// Precision: FP32 (FP64 twins with suffix _f64); sums accumulate in the data type over at most
// kh*kw terms (fwd) or ceil(kh/sh)*ceil(kw/sw) terms (bwd).
// Limits: every tensor below 2^31 elements (32-bit indexing).
#include "common.cuh"

namespace pool {

constexpr int THREADS = 256;

template <typename T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return GPUML_NEG_INF; }
template <>
__device__ __forceinline__ double neg_inf<double>() {
    return __longlong_as_double(0xfff0000000000000ll);
}

// [lo, hi): the windows o in [0, count) whose span [o*stride - pad, o*stride - pad + k) holds i.
__device__ __forceinline__ void covering_span(int i, int k, int stride, int pad, int count,
                                              int& lo, int& hi) {
    lo = (i + pad < k) ? 0 : (i + pad - k) / stride + 1;
    hi = min((i + pad) / stride + 1, count);
}

template <typename T>
__device__ __forceinline__ void maxpool2d_fwd_impl(const T* __restrict__ x, T* __restrict__ y,
                                                   int* __restrict__ argmax, int NC, int H, int W,
                                                   int P, int Q, int kh, int kw, int sh, int sw,
                                                   int ph, int pw) {
    const int i = blockIdx.x * THREADS + threadIdx.x;
    if (i >= NC * P * Q) return;
    const int PQ = P * Q, plane = i / PQ, pq = i - plane * PQ;
    const int p = pq / Q, q = pq - (pq / Q) * Q;
    const int h0 = p * sh - ph, w0 = q * sw - pw;
    const int r_lo = max(0, -h0), r_hi = min(kh, H - h0);
    const int s_lo = max(0, -w0), s_hi = min(kw, W - w0);
    const T* __restrict__ xp = x + plane * H * W;
    T best = neg_inf<T>();
    int best_i = -1;
    if (r_lo < r_hi && s_lo < s_hi) {
        best_i = (h0 + r_lo) * W + w0 + s_lo;
        best = __ldg(xp + best_i);
        for (int r = r_lo; r < r_hi; ++r) {
            const int row = (h0 + r) * W + w0;
            for (int s = s_lo; s < s_hi; ++s) {
                const T v = __ldg(xp + row + s);
                if (v > best || (v != v && best == best)) {
                    best = v;
                    best_i = row + s;
                }
            }
        }
    }
    y[i] = best;
    argmax[i] = best_i;
}

template <typename T>
__device__ __forceinline__ void maxpool2d_bwd_impl(const T* __restrict__ dy,
                                                   const int* __restrict__ argmax,
                                                   T* __restrict__ dx, int NC, int H, int W, int P,
                                                   int Q, int kh, int kw, int sh, int sw, int ph,
                                                   int pw) {
    const int i = blockIdx.x * THREADS + threadIdx.x;
    if (i >= NC * H * W) return;
    const int HW = H * W, plane = i / HW, me = i - plane * HW;
    const int h = me / W, w = me - (me / W) * W;
    int p_lo, p_hi, q_lo, q_hi;
    covering_span(h, kh, sh, ph, P, p_lo, p_hi);
    covering_span(w, kw, sw, pw, Q, q_lo, q_hi);
    const int base = plane * P * Q;
    T acc = T(0);
    for (int p = p_lo; p < p_hi; ++p)
        for (int q = q_lo; q < q_hi; ++q) {
            const int o = base + p * Q + q;
            if (__ldg(argmax + o) == me) acc += __ldg(dy + o);
        }
    dx[i] = acc;
}

template <typename T>
__device__ __forceinline__ void avgpool2d_fwd_impl(const T* __restrict__ x, T* __restrict__ y,
                                                   int NC, int H, int W, int P, int Q, int kh,
                                                   int kw, int sh, int sw, int ph, int pw) {
    const int i = blockIdx.x * THREADS + threadIdx.x;
    if (i >= NC * P * Q) return;
    const int PQ = P * Q, plane = i / PQ, pq = i - plane * PQ;
    const int p = pq / Q, q = pq - (pq / Q) * Q;
    const int h0 = p * sh - ph, w0 = q * sw - pw;
    const int h_lo = max(0, h0), h_hi = min(H, h0 + kh);
    const int w_lo = max(0, w0), w_hi = min(W, w0 + kw);
    const T* __restrict__ xp = x + plane * H * W;
    T acc = T(0);
    for (int h = h_lo; h < h_hi; ++h)
        for (int w = w_lo; w < w_hi; ++w) acc += __ldg(xp + h * W + w);
    y[i] = acc / T(kh * kw);
}

template <typename T>
__device__ __forceinline__ void avgpool2d_bwd_impl(const T* __restrict__ dy, T* __restrict__ dx,
                                                   int NC, int H, int W, int P, int Q, int kh,
                                                   int kw, int sh, int sw, int ph, int pw) {
    const int i = blockIdx.x * THREADS + threadIdx.x;
    if (i >= NC * H * W) return;
    const int HW = H * W, plane = i / HW, hw = i - plane * HW;
    const int h = hw / W, w = hw - (hw / W) * W;
    int p_lo, p_hi, q_lo, q_hi;
    covering_span(h, kh, sh, ph, P, p_lo, p_hi);
    covering_span(w, kw, sw, pw, Q, q_lo, q_hi);
    const T* __restrict__ dyp = dy + plane * P * Q;
    T acc = T(0);
    for (int p = p_lo; p < p_hi; ++p)
        for (int q = q_lo; q < q_hi; ++q) acc += __ldg(dyp + p * Q + q);
    dx[i] = acc / T(kh * kw);
}

}  // namespace pool

// ---------------------------------------------------------------------------------------------
// Entry points: float (the training dtype) and double (suffix _f64, check mode).

#define GPUML_POOL_GEOMETRY int NC, int H, int W, int P, int Q, int kh, int kw, int sh, int sw, int ph, int pw
#define GPUML_POOL_ARGS NC, H, W, P, Q, kh, kw, sh, sw, ph, pw

#define GPUML_POOL_ENTRIES(T, SFX)                                                                \
    extern "C" __global__ void __launch_bounds__(pool::THREADS) maxpool2d_fwd##SFX(               \
        const T* __restrict__ x, T* __restrict__ y, int* __restrict__ argmax,                     \
        GPUML_POOL_GEOMETRY) {                                                                    \
        pool::maxpool2d_fwd_impl<T>(x, y, argmax, GPUML_POOL_ARGS);                               \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(pool::THREADS) maxpool2d_bwd##SFX(               \
        const T* __restrict__ dy, const int* __restrict__ argmax, T* __restrict__ dx,             \
        GPUML_POOL_GEOMETRY) {                                                                    \
        pool::maxpool2d_bwd_impl<T>(dy, argmax, dx, GPUML_POOL_ARGS);                             \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(pool::THREADS) avgpool2d_fwd##SFX(               \
        const T* __restrict__ x, T* __restrict__ y, GPUML_POOL_GEOMETRY) {                        \
        pool::avgpool2d_fwd_impl<T>(x, y, GPUML_POOL_ARGS);                                       \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(pool::THREADS) avgpool2d_bwd##SFX(               \
        const T* __restrict__ dy, T* __restrict__ dx, GPUML_POOL_GEOMETRY) {                      \
        pool::avgpool2d_bwd_impl<T>(dy, dx, GPUML_POOL_ARGS);                                     \
    }

GPUML_POOL_ENTRIES(float, )
GPUML_POOL_ENTRIES(double, _f64)
