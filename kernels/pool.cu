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
// Precision: FP32; sums accumulate in FP32 over at most kh*kw terms (fwd) or
// ceil(kh/sh)*ceil(kw/sw) terms (bwd); max pooling is exact.
// Limits: every tensor below 2^31 elements (32-bit indexing).
// The kernels are extern "C" inside namespace pool: C linkage keeps their symbols the plain
// names above, while the helpers stay out of the global namespace.
#include "common.cuh"

namespace pool {

// Every kernel's trailing arguments: NC = N*C planes, input H x W, output P x Q, window kh x kw,
// stride sh, sw, padding ph, pw.
#define POOL_GEOMETRY \
    int NC, int H, int W, int P, int Q, int kh, int kw, int sh, int sw, int ph, int pw

constexpr int THREADS = 256;

// [lo, hi): the windows o in [0, count) whose span [o*stride - pad, o*stride - pad + k) holds i.
__device__ __forceinline__ void covering_span(int i, int k, int stride, int pad, int count,
                                              int& lo, int& hi) {
    lo = (i + pad < k) ? 0 : (i + pad - k) / stride + 1;
    hi = min((i + pad) / stride + 1, count);
}

extern "C" __global__ void __launch_bounds__(THREADS)
maxpool2d_fwd(const float* __restrict__ x, float* __restrict__ y, int* __restrict__ argmax,
              POOL_GEOMETRY) {
    const int i = blockIdx.x * THREADS + threadIdx.x;
    if (i >= NC * P * Q) return;
    const int PQ = P * Q, plane = i / PQ, pq = i - plane * PQ;
    const int p = pq / Q, q = pq - (pq / Q) * Q;
    const int h0 = p * sh - ph, w0 = q * sw - pw;
    const int r_lo = max(0, -h0), r_hi = min(kh, H - h0);
    const int s_lo = max(0, -w0), s_hi = min(kw, W - w0);
    const float* __restrict__ xp = x + plane * H * W;
    float best = GPUML_NEG_INF;
    int best_i = -1;
    if (r_lo < r_hi && s_lo < s_hi) {
        best_i = (h0 + r_lo) * W + w0 + s_lo;
        best = __ldg(xp + best_i);
        for (int r = r_lo; r < r_hi; ++r) {
            const int row = (h0 + r) * W + w0;
            for (int s = s_lo; s < s_hi; ++s) {
                const float v = __ldg(xp + row + s);
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

extern "C" __global__ void __launch_bounds__(THREADS)
maxpool2d_bwd(const float* __restrict__ dy, const int* __restrict__ argmax, float* __restrict__ dx,
              POOL_GEOMETRY) {
    const int i = blockIdx.x * THREADS + threadIdx.x;
    if (i >= NC * H * W) return;
    const int HW = H * W, plane = i / HW, me = i - plane * HW;
    const int h = me / W, w = me - (me / W) * W;
    int p_lo, p_hi, q_lo, q_hi;
    covering_span(h, kh, sh, ph, P, p_lo, p_hi);
    covering_span(w, kw, sw, pw, Q, q_lo, q_hi);
    const int base = plane * P * Q;
    float acc = 0.0f;
    for (int p = p_lo; p < p_hi; ++p)
        for (int q = q_lo; q < q_hi; ++q) {
            const int o = base + p * Q + q;
            if (__ldg(argmax + o) == me) acc += __ldg(dy + o);
        }
    dx[i] = acc;
}

extern "C" __global__ void __launch_bounds__(THREADS)
avgpool2d_fwd(const float* __restrict__ x, float* __restrict__ y, POOL_GEOMETRY) {
    const int i = blockIdx.x * THREADS + threadIdx.x;
    if (i >= NC * P * Q) return;
    const int PQ = P * Q, plane = i / PQ, pq = i - plane * PQ;
    const int p = pq / Q, q = pq - (pq / Q) * Q;
    const int h0 = p * sh - ph, w0 = q * sw - pw;
    const int h_lo = max(0, h0), h_hi = min(H, h0 + kh);
    const int w_lo = max(0, w0), w_hi = min(W, w0 + kw);
    const float* __restrict__ xp = x + plane * H * W;
    float acc = 0.0f;
    for (int h = h_lo; h < h_hi; ++h)
        for (int w = w_lo; w < w_hi; ++w) acc += __ldg(xp + h * W + w);
    y[i] = acc / (float)(kh * kw);
}

extern "C" __global__ void __launch_bounds__(THREADS)
avgpool2d_bwd(const float* __restrict__ dy, float* __restrict__ dx, POOL_GEOMETRY) {
    const int i = blockIdx.x * THREADS + threadIdx.x;
    if (i >= NC * H * W) return;
    const int HW = H * W, plane = i / HW, hw = i - plane * HW;
    const int h = hw / W, w = hw - (hw / W) * W;
    int p_lo, p_hi, q_lo, q_hi;
    covering_span(h, kh, sh, ph, P, p_lo, p_hi);
    covering_span(w, kw, sw, pw, Q, q_lo, q_hi);
    const float* __restrict__ dyp = dy + plane * P * Q;
    float acc = 0.0f;
    for (int p = p_lo; p < p_hi; ++p)
        for (int q = q_lo; q < q_hi; ++q) acc += __ldg(dyp + p * Q + q);
    dx[i] = acc / (float)(kh * kw);
}

}  // namespace pool

#undef POOL_GEOMETRY
