// conv_gather.cuh: the implicit-GEMM operand gathers of the conv kernels (conv_core.cuh): gather
// policies of the GEMM core (gemm_core.cuh) that stage im2col tiles without writing im2col to
// memory. Layouts and GEMMs (x (N, C, H, W), w (K, C, R, S), dy (N, K, P, Q), NCHW, C-contiguous):
//
//   ConvFwdGather      M = N*P*Q pixels (n, p, q), N = K filters, reduction C*R*S (c, r, s)
//                      A[m][kk] = x[n, c, p*sh - ph + r, q*sw - pw + s] (0 in the padding), staged
//                      [k][m]; B = w as the (K, C*R*S) matrix, staged [n][k] (dense rows).
//   ConvBwdDataGather  M = N*H*W input pixels (n, h, w), N = C channels, reduction K*R*S (k, r, s)
//                      A[m][kk] = dz[n, k, p, q] where h + ph = p*sh + r and w + pw = q*sw + s
//                      (0 in the stride holes and outside [0, P) x [0, Q)), staged [k][m];
//                      B[kk][c] = w[k, c, r, s], staged [n][k].
//   ConvBwdWeightGather M = K filters, N = C*R*S, reduction N*P*Q (n, p, q), split along it
//                      A[f][kk] = dz[n, f, p, q], staged [m][k]; B[kk][crs] = x[n, c, p*sh - ph + r,
//                      q*sw - pw + s], staged [n][k]. C = dw as the (K, C*R*S) matrix.
// dz is dy, or with the ReLU mask dz = relu_y > 0 ? dy : 0 (a select: a NaN dy under a closed mask
// gives 0), relu_y the layer's output (same shape as dy).
//
// How elements arrive: x and w by cp.async (4 bytes each, or the dense rows' 16 where aligned),
// zero-filled (src-size 0) where the element is padding or past an edge; dz by registers, because
// a copy cannot apply the mask: loaded in load() before the previous stage computes, stored by
// stage() after it (gemm_core_mainloop), so its latency overlaps the math as the copies' does.
//
// No per-element division. A thread's pixel (fwd, bwd_data: thread t owns tile row t % BM of A for
// the whole kernel) or filter/(c, r, s) rows (bwd_weight) are decoded once per kernel. The reduction
// index kk of fwd and bwd_data, (c, r, s) or (k, r, s), is looked up in a per-shape table built by
// the host launcher (gpuml/backend/cuda/conv.py conv_table, uploaded once per shape and cached):
//   fwd       2 ints per kk: c*H*W + r*W + s, r << 16 | s
//   bwd_data  4 ints per kk: k*P*Q, (r / sh) | (r % sh) << 16, (s / sw) | (s % sw) << 16,
//             k*C*R*S + r*S + s
// (the stride holes: with h + ph = hq*sh + hr per pixel, dy row p = hq - r/sh exists iff hr == r %
// sh; no division per element). All threads of a warp read the same few entries: L1 broadcasts.
// bwd_weight's reduction index (n, p, q) has N*P*Q values, too many for a table: each thread decodes
// its one kk per stage (two divisions), shared by all the elements it copies in that stage.
#pragma once
#include "gemm_core.cuh"

struct ConvShape {
    int N, C, H, W, K, R, S, P, Q, sh, sw, ph, pw;
};

// Forward. Thread t copies A elements (kk = k0 + t / BM + j * THREADS / BM, m = t % BM).
template <class Tile_>
struct ConvFwdGather {
    using Tile = Tile_;
    static constexpr bool A_MK = false, B_NK = true;
    static constexpr int A_STEP = Tile::THREADS / Tile::BM, A_COPIES = Tile::BK / A_STEP;
    static_assert(Tile::THREADS % Tile::BM == 0 && Tile::BK % A_STEP == 0, "thread -> pixel map");
    const float* x;
    const float* w;
    const int* table;
    int M, N, k_end, m0, n0;
    int H, W;
    int pix;     // n*C*H*W + h0*W + w0 of this thread's pixel (h0 = p*sh - ph, w0 = q*sw - pw)
    int h0, w0;
    bool m_ok, w16;

    __device__ __forceinline__ ConvFwdGather(const float* x_, const float* w_, const int* table_, const ConvShape& g,
                                             int m0_, int n0_)
        : x(x_), w(w_), table(table_), M(g.N * g.P * g.Q), N(g.K), k_end(g.C * g.R * g.S), m0(m0_), n0(n0_), H(g.H),
          W(g.W) {
        const int m = m0 + (int)threadIdx.x % Tile::BM, PQ = g.P * g.Q;
        m_ok = m < M;
        const int n = m_ok ? m / PQ : 0, pq = m_ok ? m - n * PQ : 0, p = pq / g.Q, q = pq - p * g.Q;
        h0 = p * g.sh - g.ph;
        w0 = q * g.sw - g.pw;
        pix = n * g.C * H * W + h0 * W + w0;
        w16 = k_end % 4 == 0 && ((unsigned long long)w & 15) == 0;
    }
    __device__ __forceinline__ void load(float* sA, float* sB, int k0) const {
        const int mt = threadIdx.x % Tile::BM, kt = threadIdx.x / Tile::BM;
#pragma unroll
        for (int j = 0; j < A_COPIES; ++j) {
            const int kk = k0 + kt + j * A_STEP;
            bool ok = m_ok && kk < k_end;
            int off = 0;
            if (ok) {
                const int rs = __ldg(table + 2 * kk + 1);
                off = __ldg(table + 2 * kk);
                ok = (unsigned)(h0 + (rs >> 16)) < (unsigned)H && (unsigned)(w0 + (rs & 0xffff)) < (unsigned)W;
            }
            gpuml_cp_async_4(sA + (kt + j * A_STEP) * (Tile::BM + Tile::PAD) + mt, ok ? x + (pix + off) : x,
                             ok ? 4 : 0);
        }
        gemm_core_stage_rows<Tile, Tile::BN, Tile::BK>(sB, w, N, k_end, k_end, n0, k0, w16);
    }
    __device__ __forceinline__ void stage(float*, float*) const {}
};

// The ReLU-masked gradient element at offset `at` of dy (0 when !ok).
__device__ __forceinline__ float conv_dz(const float* dy, const float* relu_y, bool masked, bool ok, int at) {
    float v = 0.0f;
    if (ok) {
        v = __ldg(dy + at);
        if (masked && !(__ldg(relu_y + at) > 0.0f)) v = 0.0f;  // a select: NaN dy gives 0
    }
    return v;
}

// Backward data. A as the forward's (dz by registers); thread t copies B elements (kk = k0 +
// t % BK, c = n0 + t / BK + j * THREADS / BK).
template <class Tile_>
struct ConvBwdDataGather {
    using Tile = Tile_;
    static constexpr bool A_MK = false, B_NK = true;
    static constexpr int A_STEP = Tile::THREADS / Tile::BM, A_COPIES = Tile::BK / A_STEP;
    static constexpr int B_STEP = Tile::THREADS / Tile::BK, B_COPIES = Tile::BN / B_STEP;
    static_assert(Tile::THREADS % Tile::BM == 0 && Tile::BK % A_STEP == 0, "thread -> pixel map");
    static_assert(Tile::THREADS % Tile::BK == 0 && Tile::BN % B_STEP == 0, "thread -> channel map");
    const float* dy;
    const float* relu_y;
    const float* w;
    const int* table;
    int M, N, k_end, m0, n0;
    int P, Q, RS;
    int img;             // n*K*P*Q of this thread's pixel
    int hq, hr, wq, wr;  // h + ph = hq*sh + hr, w + pw = wq*sw + wr
    bool m_ok, masked;
    float a[A_COPIES];   // fetched by load, stored by stage

    __device__ __forceinline__ ConvBwdDataGather(const float* dy_, const float* relu_y_, bool masked_, const float* w_,
                                                 const int* table_, const ConvShape& g, int m0_, int n0_)
        : dy(dy_), relu_y(relu_y_), w(w_), table(table_), M(g.N * g.H * g.W), N(g.C), k_end(g.K * g.R * g.S),
          m0(m0_), n0(n0_), P(g.P), Q(g.Q), RS(g.R * g.S), masked(masked_) {
        const int m = m0 + (int)threadIdx.x % Tile::BM, HW = g.H * g.W;
        m_ok = m < M;
        const int n = m_ok ? m / HW : 0, hw = m_ok ? m - n * HW : 0, h = hw / g.W;
        const int hp = h + g.ph, wp = hw - h * g.W + g.pw;
        hq = hp / g.sh;
        hr = hp - hq * g.sh;
        wq = wp / g.sw;
        wr = wp - wq * g.sw;
        img = n * g.K * P * Q;
    }
    __device__ __forceinline__ void load(float*, float* sB, int k0) {
        const int kt = threadIdx.x / Tile::BM;
#pragma unroll
        for (int j = 0; j < A_COPIES; ++j) {
            const int kk = k0 + kt + j * A_STEP;
            bool ok = m_ok && kk < k_end;
            int at = 0;
            if (ok) {
                const int rr = __ldg(table + 4 * kk + 1), ss = __ldg(table + 4 * kk + 2);
                const int p = hq - (rr & 0xffff), q = wq - (ss & 0xffff);
                ok = (rr >> 16) == hr && (ss >> 16) == wr && (unsigned)p < (unsigned)P && (unsigned)q < (unsigned)Q;
                at = img + __ldg(table + 4 * kk) + p * Q + q;
            }
            a[j] = conv_dz(dy, relu_y, masked, ok, at);
        }
        const int kb = k0 + (int)threadIdx.x % Tile::BK, nt = threadIdx.x / Tile::BK;
        const int w_off = kb < k_end ? __ldg(table + 4 * kb + 3) : 0;
#pragma unroll
        for (int j = 0; j < B_COPIES; ++j) {
            const int c = n0 + nt + j * B_STEP;
            const bool ok = kb < k_end && c < N;
            gpuml_cp_async_4(sB + (nt + j * B_STEP) * (Tile::BK + Tile::PAD) + threadIdx.x % Tile::BK,
                             ok ? w + (w_off + c * RS) : w, ok ? 4 : 0);
        }
    }
    __device__ __forceinline__ void stage(float* sA, float*) const {
        const int mt = threadIdx.x % Tile::BM, kt = threadIdx.x / Tile::BM;
#pragma unroll
        for (int j = 0; j < A_COPIES; ++j) sA[(kt + j * A_STEP) * (Tile::BM + Tile::PAD) + mt] = a[j];
    }
};

// Backward weight. Thread t handles reduction step kk = k0 + t % BK of every stage, A rows (filters)
// f = m0 + t / BK + j * THREADS / BK and B rows crs = n0 + t / BK + j * THREADS / BK. The dz values
// it stages are also added up per filter row (`row_sum`, in stage order): the bias gradient.
template <class Tile_>
struct ConvBwdWeightGather {
    using Tile = Tile_;
    static constexpr bool A_MK = true, B_NK = true;
    static constexpr int STEP = Tile::THREADS / Tile::BK;
    static constexpr int A_COPIES = Tile::BM / STEP, B_COPIES = Tile::BN / STEP;
    static_assert(Tile::THREADS % Tile::BK == 0 && Tile::BM % STEP == 0 && Tile::BN % STEP == 0, "thread map");
    const float* x;
    const float* dy;
    const float* relu_y;
    int M, N, k_end, m0, n0;
    int C, H, W, PQ, Q, sh, sw, ph, pw;
    bool masked;
    int b_off[B_COPIES], b_r[B_COPIES], b_s[B_COPIES];  // c*H*W + r*W + s, r, s of the B rows (r < 0: none)
    float a[A_COPIES];
    float row_sum[A_COPIES];

    __device__ __forceinline__ ConvBwdWeightGather(const float* x_, const float* dy_, const float* relu_y_,
                                                   bool masked_, const ConvShape& g, int m0_, int n0_, int k_end_)
        : x(x_), dy(dy_), relu_y(relu_y_), M(g.K), N(g.C * g.R * g.S), k_end(k_end_), m0(m0_), n0(n0_), C(g.C),
          H(g.H), W(g.W), PQ(g.P * g.Q), Q(g.Q), sh(g.sh), sw(g.sw), ph(g.ph), pw(g.pw), masked(masked_) {
        const int RS = g.R * g.S;
#pragma unroll
        for (int j = 0; j < B_COPIES; ++j) {
            const int crs = n0 + (int)threadIdx.x / Tile::BK + j * STEP;
            const int c = crs / RS, rs = crs - c * RS, r = rs / g.S, s = rs - r * g.S;
            b_off[j] = c * H * W + r * W + s;
            b_r[j] = crs < N ? r : -(1 << 30);  // a row past the edge: never inside the image
            b_s[j] = s;
        }
#pragma unroll
        for (int j = 0; j < A_COPIES; ++j) row_sum[j] = 0.0f;
    }
    __device__ __forceinline__ void load(float*, float* sB, int k0) {
        const int kk = k0 + (int)threadIdx.x % Tile::BK, rt = threadIdx.x / Tile::BK;
        const bool k_ok = kk < k_end;
        const int n = k_ok ? kk / PQ : 0, pq = k_ok ? kk - n * PQ : 0, p = pq / Q, q = pq - p * Q;
        const int h0 = p * sh - ph, w0 = q * sw - pw;
        const int dz_at = n * M * PQ + pq, x_at = n * C * H * W + h0 * W + w0;
#pragma unroll
        for (int j = 0; j < A_COPIES; ++j) {
            const int f = m0 + rt + j * STEP;
            a[j] = conv_dz(dy, relu_y, masked, k_ok && f < M, dz_at + f * PQ);
        }
#pragma unroll
        for (int j = 0; j < B_COPIES; ++j) {
            const bool ok = k_ok && (unsigned)(h0 + b_r[j]) < (unsigned)H && (unsigned)(w0 + b_s[j]) < (unsigned)W;
            gpuml_cp_async_4(sB + (rt + j * STEP) * (Tile::BK + Tile::PAD) + threadIdx.x % Tile::BK,
                             ok ? x + (x_at + b_off[j]) : x, ok ? 4 : 0);
        }
    }
    __device__ __forceinline__ void stage(float* sA, float*) {
        const int rt = threadIdx.x / Tile::BK;
#pragma unroll
        for (int j = 0; j < A_COPIES; ++j) {
            sA[(rt + j * STEP) * (Tile::BK + Tile::PAD) + threadIdx.x % Tile::BK] = a[j];
            row_sum[j] += a[j];
        }
    }
};
