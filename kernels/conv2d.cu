// conv2d.cu: 2-D convolution (cross-correlation, zero padding) as implicit GEMM, NCHW.
//
// Shapes: x (N, C, H, W), w (K, C, R, S), y and dy (N, K, P, Q), stride (sh, sw), padding
// (ph, pw), P = (H + 2ph - R) / sh + 1, Q likewise. Every tensor is C-contiguous.
//
//   conv2d_fwd                y  = act(conv(x, w) + bias)     GEMM M=N*P*Q  N=K  Kg=C*R*S
//   conv2d_bwd_data           dx = d(conv)/dx applied to dz   GEMM M=N*H*W  N=C  Kg=K*R*S
//   conv2d_bwd_weight         dw (and db) from dz             GEMM M=C*R*S  N=K  Kg=N*P*Q
// The backward kernels read dz = dy, or with `mask` set dz = relu_y > 0 ? dy : 0 (relu_y the
// layer's ReLU output, same shape as dy): the ReLU backward rides in their operand gathers, so
// no launch writes dz. bwd_weight with CONV_BIAS_GRAD also writes db[k] = sum over n, p, q of
// dz: each thread adds up the dz values it stages (its reduction steps, in order), the 16
// threads of a column are added in a fixed order, the blocks of block row 0 write it.
//
// The im2col operand is never written to memory: each BK-deep slice of it is gathered from x
// (or dy) into shared memory, with zeros for padding, for rows/columns past the matrix edge and,
// in bwd_data, for the stride holes (an input pixel h receives dy[p] only where
// h + ph - r = p*sh exactly). Edge tiles take the same path: the gather zero-fills and the
// epilogue skips out-of-range stores, so no size needs to be a multiple of a tile.
//
// Launch (all 256 threads, 1-D blocks, no dynamic shared memory; the Python launcher in
// gpuml/backend/cuda_conv.py computes the grids):
//   fwd        grid (ceil(N*P*Q / 128), ceil(K / 64)),   tile 128 x 64 x 8,  8 x 4 per thread
//   bwd_data   grid (ceil(N*H*W / 128), ceil(C / 64)),   tile 128 x 64 x 8,  8 x 4 per thread
//   bwd_weight grid (ceil(C*R*S / 64), ceil(K / 64), splits), tile 64 x 64 x 16, 4 x 4 per thread;
//              split z sums reduction steps [z*chunk, min((z+1)*chunk, N*P*Q)) into
//              work[z] (K, C*R*S) (its db part into work + splits*K*C*R*S + z*K); in the same
//              launch the last of a tile's blocks to finish (gpuml_last_block, one ticket per
//              tile) adds the slices z = 0, 1, ... into dw (and db). With splits == 1 the
//              blocks write dw and db directly and work and tickets are not touched.
// Epilogues store 4 consecutive outputs as one float4 where the run they sit in (P*Q, H*W or
// C*R*S) is a multiple of 4 and the output pointer is 16-byte aligned, else one float at a time.
// Determinism: no float atomics (only the split ticket). Every output element is owned by one
// thread, each sum runs in an order fixed by the shapes alone, so results are bitwise identical
// from run to run.
//
// Precision: FP32 data, FP32 fused multiply-add accumulation. An output's error is bounded by
// gamma_L * sum|terms|, L the reduction length (C*R*S, K*R*S or N*P*Q), as for any dot product.
// Limits: every tensor (and the bwd_weight workspace) below 2^31 elements: 32-bit indexing.
// bwd_data gathers across stride holes, so at stride s it spends s^2 x the useful FMAs.
// The kernels are extern "C" inside namespace conv2d: C linkage, so their symbols are the plain
// names above, while the helpers stay out of the global namespace.
#include "common.cuh"

#define CONV_RELU_MASK 1
#define CONV_BIAS_GRAD 2

namespace conv2d {

constexpr int THREADS = 256;
constexpr int TGRID = 16;  // the 256 threads form a 16 x 16 grid over the output tile

// Thread t's accumulator i sits at tile row (or column) tile_offset(i, t): groups of 4
// consecutive rows, 4*16 rows apart. A group is one 16-byte shared-memory load in the mainloop
// and, when the output rows are contiguous and aligned, one 16-byte store in the epilogue.
__device__ __forceinline__ int tile_offset(int i, int t) {
    return (i / 4) * (4 * TGRID) + 4 * t + i % 4;
}

template <int COUNT>
__device__ __forceinline__ void load_fragment(float (&v)[COUNT], const float* row, int t) {
#pragma unroll
    for (int g = 0; g < COUNT / 4; ++g) {
        const float4 q = *reinterpret_cast<const float4*>(row + g * 4 * TGRID + 4 * t);
        v[4 * g] = q.x;
        v[4 * g + 1] = q.y;
        v[4 * g + 2] = q.z;
        v[4 * g + 3] = q.w;
    }
}

// Whether an epilogue may store 4 consecutive rows as one float4: the output's rows come in
// runs of `run` elements (an image plane, or C*R*S), so a 4-aligned group never straddles two
// runs when run % 4 == 0, and the base pointer must be 16-byte aligned. The stores go through
// __stwb (st.global.wb, the default policy) because a plain float4 assignment was split into
// four 4-byte stores by nvcc 13.0 in two of the three epilogues.
__device__ __forceinline__ bool vector_stores(const float* out, int run) {
    return run % 4 == 0 && (reinterpret_cast<unsigned long long>(out) & 15ull) == 0;
}

// Register-prefetched, double-buffered SIMT GEMM mainloop over reduction steps [k_begin, k_end).
// Thread (tx, ty) accumulates acc[i][j] = sum_k A[m0 + tile_offset(i, tx)][k] *
// B[k][n0 + tile_offset(j, ty)]. A warp's 16 tx read 256 contiguous bytes of an As row (the two
// ty of a warp read the same bytes: broadcast), its B reads are 2 broadcast addresses; no bank
// conflicts, and 3 (fwd) or 2 (bwd_weight) 16-byte loads per 32 or 16 FMAs.
// `Gather` fetches one BK slice of A and B from global memory into registers (zero outside the
// matrices) and stages it into shared memory as As[k][m], Bs[k][n]. One barrier per slice: the
// slice t+1 is staged into the buffer read during t-1, which every thread finished before the
// barrier that closed t-1.
template <typename Gather>
__device__ __forceinline__ void gemm_mainloop(Gather& g, int k_begin, int k_end,
                                              float (&acc)[Gather::TM][Gather::TN]) {
    constexpr int BK = Gather::BK, TM = Gather::TM, TN = Gather::TN;
    static_assert(TM % 4 == 0 && TN % 4 == 0 && Gather::A_LD % 4 == 0 && Gather::B_LD % 4 == 0,
                  "fragments are read as aligned float4");
    __shared__ __align__(16) float As[2][BK][Gather::A_LD];
    __shared__ __align__(16) float Bs[2][BK][Gather::B_LD];
    const int tx = threadIdx.x % TGRID, ty = threadIdx.x / TGRID;
    float a_next[Gather::A_LOADS], b_next[Gather::B_LOADS];

    g.load(k_begin, a_next, b_next);
    g.stage(As[0], Bs[0], a_next, b_next);
    __syncthreads();
    int buf = 0;
    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
        const bool more = k0 + BK < k_end;
        if (more) g.load(k0 + BK, a_next, b_next);  // in flight while this slice computes
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float a[TM], b[TN];
            load_fragment(a, As[buf][kk], tx);
            load_fragment(b, Bs[buf][kk], ty);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = __fmaf_rn(a[i], b[j], acc[i][j]);
        }
        if (more) g.stage(As[buf ^ 1], Bs[buf ^ 1], a_next, b_next);
        __syncthreads();
        buf ^= 1;
    }
}

// Shared geometry of the fwd and bwd_data gathers: a 128 x 64 x 8 tile. A slots: thread t owns
// tile row am = t % 128 and the 4 consecutive reduction steps ak*4 .. ak*4+3 (ak = t / 128), so
// its pixel is decoded once per kernel and its (c|k, r, s) once per slice. B slots: reduction
// step bk = t % 8 of filters bn and bn + 32 (bn = t / 8); in a warp the 8 steps x 4 filters land
// in 32 distinct banks because B_LD = 68 = 4 (mod 32).
struct WideTile {
    static constexpr int TM = 8, TN = 4, BM = TGRID * TM, BN = TGRID * TN, BK = 8;
    static constexpr int A_LD = BM, B_LD = BN + 4;
    static constexpr int A_LOADS = BM * BK / THREADS, B_LOADS = BN * BK / THREADS;
    static_assert(A_LOADS == 4 && B_LOADS == 2, "slot maps below assume 4 A and 2 B loads");
    int am, ak, bk, bn;

    __device__ void init_slots() {
        am = threadIdx.x % BM;
        ak = threadIdx.x / BM;
        bk = threadIdx.x % BK;
        bn = threadIdx.x / BK;
    }
    __device__ void stage(float (*as)[A_LD], float (*bs)[B_LD], const float (&a)[A_LOADS],
                          const float (&b)[B_LOADS]) const {
#pragma unroll
        for (int i = 0; i < A_LOADS; ++i) as[ak * A_LOADS + i][am] = a[i];
#pragma unroll
        for (int j = 0; j < B_LOADS; ++j) bs[bk][bn + 32 * j] = b[j];
    }
};

// Forward: A[m][kk] = x[n, c, p*sh - ph + r, q*sw - pw + s], m = (n, p, q), kk = (c, r, s);
// B[kk][k] = w[k][kk] (w is already the (K, C*R*S) matrix).
struct FwdGather : WideTile {
    const float* __restrict__ x_img;  // x + n*C*H*W of this thread's A row
    const float* __restrict__ w;
    int H, W, R, S, RS, CRS, K, n0;
    int h0, w0;  // window origin of this thread's A row
    bool m_ok;

    __device__ void load(int k0, float (&a)[A_LOADS], float (&b)[B_LOADS]) const {
        int kk = k0 + ak * A_LOADS;
        int c = kk / RS, rs = kk - c * RS;
        int r = rs / S, s = rs - r * S;
#pragma unroll
        for (int i = 0; i < A_LOADS; ++i) {
            const int h = h0 + r, ww = w0 + s;
            float v = 0.0f;
            if (m_ok && kk + i < CRS && (unsigned)h < (unsigned)H && (unsigned)ww < (unsigned)W)
                v = __ldg(x_img + (c * H + h) * W + ww);
            a[i] = v;
            if (++s == S) {
                s = 0;
                if (++r == R) { r = 0; ++c; }
            }
        }
        const int kb = k0 + bk;
#pragma unroll
        for (int j = 0; j < B_LOADS; ++j) {
            const int k = n0 + bn + 32 * j;
            b[j] = (k < K && kb < CRS) ? __ldg(w + k * CRS + kb) : 0.0f;
        }
    }
};

// NaN passes the ReLU, as in the CPU backend.
__device__ __forceinline__ float bias_relu(float v, float b, int relu) {
    v += b;
    return (relu && v < 0.0f) ? 0.0f : v;
}

extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_fwd(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias,
           float* __restrict__ y, int N, int C, int H, int W, int K, int R, int S, int P, int Q,
           int sh, int sw, int ph, int pw, int has_bias, int relu) {
    using G = FwdGather;
    const int PQ = P * Q, M = N * PQ;
    const int m0 = blockIdx.x * G::BM, n0 = blockIdx.y * G::BN;
    G g;
    g.init_slots();
    g.w = w;
    g.H = H; g.W = W; g.R = R; g.S = S; g.RS = R * S; g.CRS = C * R * S; g.K = K; g.n0 = n0;
    const int m = m0 + g.am;
    g.m_ok = m < M;
    const int n = g.m_ok ? m / PQ : 0;
    const int pq = g.m_ok ? m - n * PQ : 0;
    const int p = pq / Q, q = pq - (pq / Q) * Q;
    g.h0 = p * sh - ph;
    g.w0 = q * sw - pw;
    g.x_img = x + n * C * H * W;

    float acc[G::TM][G::TN] = {};
    gemm_mainloop(g, 0, g.CRS, acc);

    const int tx = threadIdx.x % TGRID, ty = threadIdx.x / TGRID;
    float b_k[G::TN];
#pragma unroll
    for (int j = 0; j < G::TN; ++j) {
        const int k = n0 + tile_offset(j, ty);
        b_k[j] = (has_bias && k < K) ? __ldg(bias + k) : 0.0f;
    }
    if (vector_stores(y, PQ)) {  // each group of 4 pixels: valid or not as a whole, one image
#pragma unroll
        for (int gi = 0; gi < G::TM / 4; ++gi) {
            const int m4 = m0 + tile_offset(4 * gi, tx);
            if (m4 >= M) continue;
            const int ni = m4 / PQ;
            float* y_pix = y + ni * K * PQ + (m4 - ni * PQ);
#pragma unroll
            for (int j = 0; j < G::TN; ++j) {
                const int k = n0 + tile_offset(j, ty);
                if (k >= K) continue;
                const float b = b_k[j];
                __stwb(reinterpret_cast<float4*>(y_pix + k * PQ),
                       make_float4(bias_relu(acc[4 * gi][j], b, relu),
                                   bias_relu(acc[4 * gi + 1][j], b, relu),
                                   bias_relu(acc[4 * gi + 2][j], b, relu),
                                   bias_relu(acc[4 * gi + 3][j], b, relu)));
            }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < G::TM; ++i) {
        const int mi = m0 + tile_offset(i, tx);
        if (mi >= M) continue;
        const int ni = mi / PQ;
        float* y_pix = y + ni * K * PQ + (mi - ni * PQ);
#pragma unroll
        for (int j = 0; j < G::TN; ++j) {
            const int k = n0 + tile_offset(j, ty);
            if (k < K) y_pix[k * PQ] = bias_relu(acc[i][j], b_k[j], relu);
        }
    }
}

// bwd_data: A[m][kk] = dy[n, k, p, q] with h + ph = p*sh + r and w + pw = q*sw + s (0 if there
// is no such p in [0, P) or q in [0, Q)), m = (n, h, w), kk = (k, r, s); B[kk][c] = w[k, c, r, s].
// Walking kk by one step moves s (and on wrap r) by one, so the floor quotient/remainder of
// (h + ph - r) / sh and (w + pw - s) / sw are stepped incrementally: four divisions per slice.
struct BwdDataGather : WideTile {
    const float* __restrict__ dy_img;  // dy + n*K*P*Q of this thread's A row
    const float* __restrict__ mask_img;  // relu_y + n*K*P*Q, read when `masked`
    bool masked;
    const float* __restrict__ w;
    int C, R, S, RS, KRS, P, Q, sh, sw, n0;
    int hp, wp;              // h + ph, w + pw of this thread's A row (both >= 0)
    int hq0, hr0, wq0, wr0;  // hp = hq0*sh + hr0, wp = wq0*sw + wr0
    bool m_ok;

    __device__ void load(int k0, float (&a)[A_LOADS], float (&b)[B_LOADS]) const {
        int kk = k0 + ak * A_LOADS;
        int k = kk / RS, rs = kk - k * RS;
        int r = rs / S, s = rs - r * S;
        // floor division of hp - r >= 1 - R and wp - s >= 1 - S, shifted to be non-negative
        const int pn = hp - r + R * sh, qn = wp - s + S * sw;
        int pq = pn / sh, pr = pn - pq * sh;
        int qq = qn / sw, qr = qn - qq * sw;
        pq -= R;
        qq -= S;
#pragma unroll
        for (int i = 0; i < A_LOADS; ++i) {
            float v = 0.0f;
            if (m_ok && kk + i < KRS && pr == 0 && qr == 0 && (unsigned)pq < (unsigned)P &&
                (unsigned)qq < (unsigned)Q) {
                const int at = (k * P + pq) * Q + qq;
                v = __ldg(dy_img + at);
                if (masked && !(__ldg(mask_img + at) > 0.0f)) v = 0.0f;  // a select: NaN dy gives 0
            }
            a[i] = v;
            if (++s == S) {
                s = 0;
                qq = wq0; qr = wr0;
                if (++r == R) {
                    r = 0;
                    ++k;
                    pq = hq0; pr = hr0;
                } else if (--pr < 0) {
                    pr += sh; --pq;
                }
            } else if (--qr < 0) {
                qr += sw; --qq;
            }
        }
        const int kb = k0 + bk;
        const int kf = kb / RS, rsb = kb - kf * RS;
#pragma unroll
        for (int j = 0; j < B_LOADS; ++j) {
            const int c = n0 + bn + 32 * j;
            b[j] = (c < C && kb < KRS) ? __ldg(w + (kf * C + c) * RS + rsb) : 0.0f;
        }
    }
};

extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_bwd_data(const float* __restrict__ dy, const float* __restrict__ relu_y, const float* __restrict__ w,
                float* __restrict__ dx, int N, int C, int H, int W, int K, int R, int S, int P, int Q,
                int sh, int sw, int ph, int pw, int flags) {
    using G = BwdDataGather;
    const int HW = H * W, M = N * HW;
    const int m0 = blockIdx.x * G::BM, n0 = blockIdx.y * G::BN;
    G g;
    g.init_slots();
    g.w = w;
    g.C = C; g.R = R; g.S = S; g.RS = R * S; g.KRS = K * R * S; g.P = P; g.Q = Q;
    g.sh = sh; g.sw = sw; g.n0 = n0;
    const int m = m0 + g.am;
    g.m_ok = m < M;
    const int n = g.m_ok ? m / HW : 0;
    const int hw = g.m_ok ? m - n * HW : 0;
    const int h = hw / W;
    g.hp = h + ph;
    g.wp = hw - h * W + pw;
    g.hq0 = g.hp / sh; g.hr0 = g.hp - g.hq0 * sh;
    g.wq0 = g.wp / sw; g.wr0 = g.wp - g.wq0 * sw;
    g.dy_img = dy + n * K * P * Q;
    g.mask_img = relu_y + n * K * P * Q;
    g.masked = (flags & CONV_RELU_MASK) != 0;

    float acc[G::TM][G::TN] = {};
    gemm_mainloop(g, 0, g.KRS, acc);

    const int tx = threadIdx.x % TGRID, ty = threadIdx.x / TGRID;
    if (vector_stores(dx, HW)) {  // each group of 4 pixels: valid or not as a whole, one image
#pragma unroll
        for (int gi = 0; gi < G::TM / 4; ++gi) {
            const int m4 = m0 + tile_offset(4 * gi, tx);
            if (m4 >= M) continue;
            const int ni = m4 / HW;
            float* dx_pix = dx + ni * C * HW + (m4 - ni * HW);
#pragma unroll
            for (int j = 0; j < G::TN; ++j) {
                const int c = n0 + tile_offset(j, ty);
                if (c >= C) continue;
                __stwb(reinterpret_cast<float4*>(dx_pix + c * HW),
                       make_float4(acc[4 * gi][j], acc[4 * gi + 1][j], acc[4 * gi + 2][j],
                                   acc[4 * gi + 3][j]));
            }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < G::TM; ++i) {
        const int mi = m0 + tile_offset(i, tx);
        if (mi >= M) continue;
        const int ni = mi / HW;
        float* dx_pix = dx + ni * C * HW + (mi - ni * HW);
#pragma unroll
        for (int j = 0; j < G::TN; ++j) {
            const int c = n0 + tile_offset(j, ty);
            if (c < C) dx_pix[c * HW] = acc[i][j];
        }
    }
}

// bwd_weight: A[m][kk] = x[n, c, p*sh - ph + r, q*sw - pw + s], m = (c, r, s), kk = (n, p, q);
// B[kk][k] = dy[n, k, p, q]. Tile 64 x 64 x 16. Thread t loads reduction step ak = t % 16 for
// A rows am + 16i and B columns am + 16j (am = t / 16), so a warp reads 16 consecutive (p, q)
// of two rows. Rows of 68 floats keep the float4 reads aligned; the warp's 16 steps x 2 rows
// then meet 2 to a bank when staged (8 stores per slice, against 32 conflict-free float4 loads).
// Each A row's (c, r, s) is decoded once per kernel; each slice costs one (n, p, q) decode.
struct BwdWeightGather {
    static constexpr int TM = 4, TN = 4, BM = TGRID * TM, BN = TGRID * TN, BK = 16;
    static constexpr int A_LD = BM + 4, B_LD = BN + 4;
    static constexpr int A_LOADS = BM * BK / THREADS, B_LOADS = BN * BK / THREADS;
    static_assert(A_LOADS == 4 && B_LOADS == 4 && TM == 4 && THREADS / BK == TGRID, "slot map");
    const float* __restrict__ x;
    const float* __restrict__ dy;
    const float* __restrict__ relu_y;  // read when `masked`
    bool masked;
    float col_sum[B_LOADS];  // this thread's staged dz of columns am + 16j (the bias gradient)
    int C, H, W, K, P, Q, PQ, sh, sw, ph, pw, n0;
    int k_stop;  // end of this block's split: steps past it belong to the next split
    int ak, am;
    int c_off[A_LOADS], r_of[A_LOADS], s_of[A_LOADS];  // per A row: c*H*W, r, s
    bool row_ok[A_LOADS];

    __device__ void load(int k0, float (&a)[A_LOADS], float (&b)[B_LOADS]) const {
        const int kk = k0 + ak;
        const bool k_ok = kk < k_stop;
        const int n = k_ok ? kk / PQ : 0;
        const int pq = k_ok ? kk - n * PQ : 0;
        const int p = pq / Q, q = pq - (pq / Q) * Q;
        const int h0 = p * sh - ph, w0 = q * sw - pw;
        const float* x_img = x + n * C * H * W;
#pragma unroll
        for (int i = 0; i < A_LOADS; ++i) {
            const int h = h0 + r_of[i], ww = w0 + s_of[i];
            float v = 0.0f;
            if (k_ok && row_ok[i] && (unsigned)h < (unsigned)H && (unsigned)ww < (unsigned)W)
                v = __ldg(x_img + c_off[i] + h * W + ww);
            a[i] = v;
        }
        const int pix = n * K * PQ + pq;
#pragma unroll
        for (int j = 0; j < B_LOADS; ++j) {
            const int k = n0 + am + TGRID * j;
            float v = 0.0f;
            if (k_ok && k < K) {
                v = __ldg(dy + pix + k * PQ);
                if (masked && !(__ldg(relu_y + pix + k * PQ) > 0.0f)) v = 0.0f;  // select, as relu_bwd
            }
            b[j] = v;
        }
    }
    // Every loaded slice is staged exactly once, in step order: the bias sums are taken here.
    __device__ void stage(float (*as)[A_LD], float (*bs)[B_LD], const float (&a)[A_LOADS],
                          const float (&b)[B_LOADS]) {
#pragma unroll
        for (int i = 0; i < A_LOADS; ++i) as[ak][am + TGRID * i] = a[i];
#pragma unroll
        for (int j = 0; j < B_LOADS; ++j) {
            bs[ak][am + TGRID * j] = b[j];
            col_sum[j] += b[j];
        }
    }
};

// Stores a tile of dw (4 consecutive (c, r, s) x 4 filters per thread) into `out` (K, C*R*S).
__device__ __forceinline__ void store_wgrad_tile(float* out, const float (&acc)[4][4], int m0, int n0, int K,
                                                 int CRS) {
    const int tx = threadIdx.x % TGRID, ty = threadIdx.x / TGRID;
    const int crs4 = m0 + tile_offset(0, tx);  // this thread's 4 consecutive (c, r, s)
    if (vector_stores(out, CRS)) {  // the 4 are valid or not as a whole
        if (crs4 >= CRS) return;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int k = n0 + tile_offset(j, ty);
            if (k >= K) continue;
            __stwb(reinterpret_cast<float4*>(out + k * CRS + crs4),
                   make_float4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (crs4 + i >= CRS) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int k = n0 + tile_offset(j, ty);
            if (k < K) out[k * CRS + crs4 + i] = acc[i][j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_bwd_weight(const float* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ relu_y,
                  float* __restrict__ dw, float* __restrict__ db, float* __restrict__ work,
                  unsigned int* __restrict__ tickets, int N, int C, int H, int W, int K, int R, int S,
                  int P, int Q, int sh, int sw, int ph, int pw, int chunk, int flags) {
    using G = BwdWeightGather;
    __shared__ float col_part[G::BK][G::BN + 1];
    __shared__ int last_flag;
    const int RS = R * S, CRS = C * RS, PQ = P * Q, NPQ = N * PQ;
    const int m0 = blockIdx.x * G::BM, n0 = blockIdx.y * G::BN;
    const int splits = gridDim.z;
    G g;
    g.x = x; g.dy = dy; g.relu_y = relu_y;
    g.masked = (flags & CONV_RELU_MASK) != 0;
    g.C = C; g.H = H; g.W = W; g.K = K; g.P = P; g.Q = Q; g.PQ = PQ;
    g.sh = sh; g.sw = sw; g.ph = ph; g.pw = pw; g.n0 = n0;
    g.ak = threadIdx.x % G::BK;
    g.am = threadIdx.x / G::BK;
#pragma unroll
    for (int j = 0; j < G::B_LOADS; ++j) g.col_sum[j] = 0.0f;
#pragma unroll
    for (int i = 0; i < G::A_LOADS; ++i) {
        const int crs = m0 + g.am + TGRID * i;
        g.row_ok[i] = crs < CRS;
        const int c = crs / RS, rs = crs - c * RS;
        g.c_off[i] = c * H * W;
        g.r_of[i] = rs / S;
        g.s_of[i] = rs - (rs / S) * S;
    }
    const int k_begin = blockIdx.z * chunk;
    const int k_end = min(NPQ, k_begin + chunk);
    g.k_stop = k_end;

    float acc[G::TM][G::TN] = {};
    gemm_mainloop(g, k_begin, k_end, acc);

    const bool bias = (flags & CONV_BIAS_GRAD) && blockIdx.x == 0;
    float* db_work = work + (gpuml_i64)splits * K * CRS;
    if (bias) {  // column am + 16j: the 16 step lanes ak added in lane order
#pragma unroll
        for (int j = 0; j < G::B_LOADS; ++j) col_part[g.ak][g.am + TGRID * j] = g.col_sum[j];
        __syncthreads();
        const int k = n0 + (int)threadIdx.x;
        if (threadIdx.x < G::BN && k < K) {
            float t = col_part[0][threadIdx.x];
#pragma unroll
            for (int l = 1; l < G::BK; ++l) t += col_part[l][threadIdx.x];
            if (splits == 1)
                db[k] = t;
            else
                db_work[blockIdx.z * K + k] = t;
        }
    }
    if (splits == 1) {
        store_wgrad_tile(dw, acc, m0, n0, K, CRS);
        return;
    }
    store_wgrad_tile(work + (gpuml_i64)blockIdx.z * K * CRS, acc, m0, n0, K, CRS);
    if (!gpuml_last_block(tickets + blockIdx.y * gridDim.x + blockIdx.x, (unsigned int)splits, &last_flag))
        return;
    // The tile's last block: dw = sum of the slices in the order z = 0, 1, ... (thread t: one
    // (c, r, s) column of the tile, every 4th filter; consecutive threads, consecutive columns).
    const int crs = m0 + (int)threadIdx.x % G::BM;
    if (crs < CRS) {
        for (int kr = (int)threadIdx.x / G::BM; kr < G::BN; kr += THREADS / G::BM) {
            const int k = n0 + kr;
            if (k >= K) break;
            const gpuml_i64 at = (gpuml_i64)k * CRS + crs;
            float v = 0.0f;
            for (int z = 0; z < splits; ++z) v += __ldcg(work + z * (gpuml_i64)K * CRS + at);
            dw[at] = v;
        }
    }
    if (bias && threadIdx.x < G::BN && n0 + (int)threadIdx.x < K) {
        const int k = n0 + threadIdx.x;
        float v = 0.0f;
        for (int z = 0; z < splits; ++z) v += __ldcg(db_work + z * K + k);
        db[k] = v;
    }
}

}  // namespace conv2d
