"""Numba loops of the CPU backend: the work NumPy cannot express without large temporaries.

Every function writes into arrays it is given and is deterministic: every sum runs in a fixed
order. Arrays are C-contiguous. The loops are single-threaded on purpose: OpenBLAS already runs
every GEMM on all cores, and a second thread pool (numba's OpenMP one) taking turns with it on a
2-core machine made whole training steps 5-10x slower with libgomp's default spin-waiting, and no
faster than serial loops with passive waiting. The loops are a third of the step; the GEMMs the rest.
Layouts:
- images NCHW; pooling loops see them as planes (M = N*C, H, W).
- the im2col matrix `col` is (C*R*S, N*P*Q): row (c*R + r)*S + s, column n*P*Q + p*Q + q holds
  x[n, c, p*sh - ph + r, q*sw - pw + s], or 0 where that falls in the padding. One GEMM with the
  (K, C*R*S) weight matrix then covers all N images, and the GEMM result is (K, N*P*Q).
Reductions over a float32 row (softmax, pooling sums, losses) accumulate in float64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _valid_span(offset, stride, size, count):
    """[lo, hi): the outputs q in [0, count) whose input q*stride + offset lies in [0, size)."""
    lo = 0 if offset >= 0 else (-offset + stride - 1) // stride
    hi = 0 if size - offset <= 0 else (size - offset + stride - 1) // stride
    lo = min(lo, count)
    hi = max(lo, min(hi, count))
    return lo, hi


@njit(cache=True, inline="always")
def _covering_span(i, kernel, stride, pad, count):
    """[lo, hi): the windows o in [0, count) whose input span [o*stride - pad, +kernel) holds i."""
    a = i + pad - kernel + 1
    lo = 0 if a <= 0 else (a + stride - 1) // stride
    hi = min((i + pad) // stride + 1, count)
    return lo, max(lo, hi)


# --------------------------------------------------------------------------- convolution


# The hot copy loops below index flat views with uint64 offsets: numba guards every signed index
# against negative wraparound, and that branch keeps LLVM from vectorising the loop (4x slower).
# A signed offset that is negative as a whole converts to the same bits, so sums stay exact.
_U = np.uint64


@njit(cache=True)
def im2col(x, kh, kw, sh, sw, ph, pw, col):
    """x (N, C, H, W) -> col (C*kh*kw, N*P*Q), zeros in the padding."""
    N, C, H, W = x.shape
    P = (H + 2 * ph - kh) // sh + 1
    Q = (W + 2 * pw - kw) // sw + 1
    PQ = P * Q
    NPQ = col.shape[1]
    xf = x.reshape(-1)
    cf = col.reshape(-1)
    for n in range(N):
        for c in range(C):
            for r in range(kh):
                for s in range(kw):
                    q_lo, q_hi = _valid_span(s - pw, sw, W, Q)
                    row = ((c * kh + r) * kw + s) * NPQ + n * PQ
                    for p in range(P):
                        h = p * sh - ph + r
                        dst = _U(row + p * Q)
                        if h < 0 or h >= H:
                            for q in range(_U(Q)):
                                cf[dst + q] = 0
                            continue
                        for q in range(_U(q_lo)):
                            cf[dst + q] = 0
                        src = ((n * C + c) * H + h) * W + s - pw
                        if sw == 1:
                            for q in range(_U(q_lo), _U(q_hi)):
                                cf[dst + q] = xf[_U(src) + q]
                        else:
                            for q in range(q_lo, q_hi):
                                cf[dst + _U(q)] = xf[_U(src + q * sw)]
                        for q in range(_U(q_hi), _U(Q)):
                            cf[dst + q] = 0


@njit(cache=True)
def col2im(col, kh, kw, sh, sw, ph, pw, dx):
    """dx (N, C, H, W) = the adjoint of im2col: every col entry added back onto its pixel, in a
    fixed order."""
    N, C, H, W = dx.shape
    P = (H + 2 * ph - kh) // sh + 1
    Q = (W + 2 * pw - kw) // sw + 1
    PQ = P * Q
    NPQ = col.shape[1]
    CHW = C * H * W
    cf = col.reshape(-1)
    dxf = dx.reshape(-1)
    for n in range(N):
        for i in range(_U(n * CHW), _U((n + 1) * CHW)):
            dxf[i] = 0
        for c in range(C):
            for r in range(kh):
                for s in range(kw):
                    q_lo, q_hi = _valid_span(s - pw, sw, W, Q)
                    row = ((c * kh + r) * kw + s) * NPQ + n * PQ
                    for p in range(P):
                        h = p * sh - ph + r
                        if h < 0 or h >= H:
                            continue
                        src = _U(row + p * Q)
                        dst = ((n * C + c) * H + h) * W + s - pw
                        if sw == 1:
                            for q in range(_U(q_lo), _U(q_hi)):
                                dxf[_U(dst) + q] += cf[src + q]
                        else:
                            for q in range(q_lo, q_hi):
                                dxf[_U(dst + q * sw)] += cf[src + _U(q)]


@njit(cache=True)
def conv_epilogue(gemm, bias, relu, y):
    """y (N, K, L) = act(gemm (K, N*L) + bias (K,)), transposing the GEMM's channel-major result
    into NCHW in the same pass. relu keeps NaN, as np.maximum does."""
    N, K, L = y.shape
    for n in range(N):
        for k in range(K):
            b = bias[k]
            src = gemm[k, n * L : (n + 1) * L]
            dst = y[n, k]
            if relu:
                for i in range(L):
                    v = src[i] + b
                    dst[i] = 0 if v < 0 else v
            else:
                for i in range(L):
                    dst[i] = src[i] + b


@njit(cache=True)
def batch_to_channel_major(dy, dyt):
    """dyt (K, N*L) from dy (N, K, L): the layout the weight- and data-gradient GEMMs need."""
    N, K, L = dy.shape
    for k in range(K):
        for n in range(N):
            dyt[k, n * L : (n + 1) * L] = dy[n, k]


@njit(cache=True)
def bias_act_rows(y, bias, has_bias, relu):
    """In place on y (B, N): y = act(y + bias); NaN passes through relu as in np.maximum."""
    B, N = y.shape
    for i in range(B):
        for j in range(N):
            v = y[i, j]
            if has_bias:
                v += bias[j]
            if relu and v < 0:
                v = 0
            y[i, j] = v


# --------------------------------------------------------------------------- pooling


@njit(cache=True, inline="always")
def _wins(v, best):
    """The max-pool comparison: strictly greater (so the first of equal values stays), and a NaN
    beats any number so that it propagates; once the best is NaN it stays."""
    return (v > best) | ((v != v) & (best == best))


@njit(cache=True)
def maxpool_fwd(x, kh, kw, sh, sw, ph, pw, y, argmax):
    """x (M, H, W) -> y, argmax (M, P, Q). Only in-image cells compete (the caller guarantees
    pad <= k/2, so every window holds one); visited in row-major window order."""
    M, H, W = x.shape
    _, P, Q = y.shape
    for m in range(M):
        for p in range(P):
            h0 = p * sh - ph
            r_lo = max(0, -h0)
            r_hi = min(kh, H - h0)
            for q in range(Q):
                w0 = q * sw - pw
                s_lo = max(0, -w0)
                s_hi = min(kw, W - w0)
                best = x[m, h0 + r_lo, w0 + s_lo]
                best_i = (h0 + r_lo) * W + w0 + s_lo
                for r in range(r_lo, r_hi):
                    for s in range(s_lo, s_hi):
                        v = x[m, h0 + r, w0 + s]
                        if _wins(v, best):
                            best = v
                            best_i = (h0 + r) * W + w0 + s
                y[m, p, q] = best
                argmax[m, p, q] = best_i


@njit(cache=True)
def maxpool_fwd_2x2(x, y, argmax):
    """maxpool_fwd for 2x2 windows, stride 2, no padding, unrolled: the common case, where the
    general loop's two-trip inner loops cost ten times the arithmetic."""
    M, H, W = x.shape
    _, P, Q = y.shape
    for m in range(M):
        for p in range(P):
            h = 2 * p
            top = x[m, h]
            bottom = x[m, h + 1]
            yr = y[m, p]
            ar = argmax[m, p]
            for q in range(Q):
                w = 2 * q
                best = top[w]
                i = h * W + w
                v = top[w + 1]
                c = _wins(v, best)
                best = v if c else best
                i = h * W + w + 1 if c else i
                v = bottom[w]
                c = _wins(v, best)
                best = v if c else best
                i = (h + 1) * W + w if c else i
                v = bottom[w + 1]
                c = _wins(v, best)
                best = v if c else best
                i = (h + 1) * W + w + 1 if c else i
                yr[q] = best
                ar[q] = i


@njit(cache=True)
def maxpool_bwd(dy, argmax, kh, kw, sh, sw, ph, pw, dx):
    """dx (M, H, W) as a gather: each input cell visits the windows covering it and sums the dy of
    those whose argmax is that cell, in row-major window order (no scatter, no race)."""
    M, H, W = dx.shape
    _, P, Q = dy.shape
    q_lo = np.empty(W, np.int64)
    q_hi = np.empty(W, np.int64)
    for w in range(W):
        q_lo[w], q_hi[w] = _covering_span(w, kw, sw, pw, Q)
    for m in range(M):
        for h in range(H):
            p_lo, p_hi = _covering_span(h, kh, sh, ph, P)
            for w in range(W):
                me = h * W + w
                acc = 0.0
                for p in range(p_lo, p_hi):
                    for q in range(q_lo[w], q_hi[w]):
                        g = dy[m, p, q]  # loaded unconditionally so the compare becomes a select
                        acc += g if argmax[m, p, q] == me else 0.0
                dx[m, h, w] = acc


@njit(cache=True)
def maxpool_bwd_tiled(dy, argmax, dx):
    """maxpool_bwd when the windows do not overlap (stride == kernel, no padding): a cell is
    covered by one window at most, so the gather reduces to dx = 0 except dx[argmax] = dy. One
    loop writes a whole plane in window order, so this is deterministic, and a fifth of the
    gather's cost (no per-cell compare). Indices outside the plane are skipped."""
    M, H, W = dx.shape
    _, P, Q = dy.shape
    HW = H * W
    for m in range(M):
        plane = dx[m].reshape(HW)
        plane[:] = 0
        for p in range(P):
            for q in range(Q):
                i = argmax[m, p, q]
                if 0 <= i < HW:
                    plane[i] += dy[m, p, q]


@njit(cache=True)
def avgpool_fwd(x, kh, kw, sh, sw, ph, pw, y):
    """y (M, P, Q): window sums over in-image cells divided by kh*kw (count_include_pad)."""
    M, H, W = x.shape
    _, P, Q = y.shape
    inv = 1.0 / (kh * kw)
    for m in range(M):
        for p in range(P):
            h0 = p * sh - ph
            for q in range(Q):
                w0 = q * sw - pw
                acc = 0.0
                for h in range(max(0, h0), min(H, h0 + kh)):
                    for w in range(max(0, w0), min(W, w0 + kw)):
                        acc += x[m, h, w]
                y[m, p, q] = acc * inv


@njit(cache=True)
def avgpool_bwd(dy, kh, kw, sh, sw, ph, pw, dx):
    """dx (M, H, W): each cell gathers dy / (kh*kw) from every window covering it."""
    M, H, W = dx.shape
    _, P, Q = dy.shape
    inv = 1.0 / (kh * kw)
    for m in range(M):
        for h in range(H):
            p_lo, p_hi = _covering_span(h, kh, sh, ph, P)
            for w in range(W):
                q_lo, q_hi = _covering_span(w, kw, sw, pw, Q)
                acc = 0.0
                for p in range(p_lo, p_hi):
                    for q in range(q_lo, q_hi):
                        acc += dy[m, p, q]
                dx[m, h, w] = acc * inv


# --------------------------------------------------------------------------- losses


@njit(cache=True)
def softmax_xent_rows(logits, labels, eps, dlogits):
    """Per row: stable log-softmax (max subtracted), loss against t = (1-eps) onehot + eps/K,
    dlogits = (softmax - t) / B. Returns the batch-mean loss as a float64. `dlogits` may be
    `logits`: a row's statistics are complete before any of its elements is overwritten."""
    B, K = logits.shape
    inv_b = 1.0 / B
    off = eps / K
    total = 0.0
    for i in range(B):
        m = float(logits[i, 0])
        for k in range(1, K):
            m = max(m, float(logits[i, k]))
        sum_exp = 0.0
        sum_z = 0.0
        for k in range(K):
            z = float(logits[i, k]) - m
            sum_exp += math.exp(z)
            sum_z += z
        lse = math.log(sum_exp)
        y = labels[i]
        logp_y = float(logits[i, y]) - m - lse
        total += -((1.0 - eps) * logp_y + off * (sum_z - K * lse))
        for k in range(K):
            t = off + (1.0 - eps if k == y else 0.0)
            dlogits[i, k] = (math.exp(float(logits[i, k]) - m - lse) - t) * inv_b
    return total * inv_b


@njit(cache=True)
def mse_flat(pred, target, dpred):
    """Returns mean((pred - target)^2) as float64; dpred = 2 (pred - target) / n."""
    n = pred.size
    scale = 2.0 / n
    acc = 0.0
    for i in range(n):
        d = float(pred[i]) - float(target[i])
        acc += d * d
        dpred[i] = d * scale
    return acc / n


# --------------------------------------------------------------------------- elementwise


@njit(cache=True)
def sigmoid_fwd(x, out):
    """Stable logistic: exp of -|x| only, so nothing overflows; 1/(1+e) for x >= 0, e/(1+e) below.
    Branch-free, as the sign of activations is a coin flip for the branch predictor."""
    one = x.dtype.type(1)
    for i in range(x.size):
        v = x[i]
        e = math.exp(-abs(v))
        r = one / (one + e)
        out[i] = r if v >= 0 else e * r


@njit(cache=True)
def relu_bwd(y, dy, out):
    """out = dy * (y > 0) as a select (a NaN dy where y <= 0 gives 0). out may be dy."""
    for i in range(y.size):
        g = dy[i]
        out[i] = g if y[i] > 0 else 0


@njit(cache=True)
def tanh_bwd(y, dy, out):
    """out = dy * (1 - y^2). out may be dy."""
    one = y.dtype.type(1)
    for i in range(y.size):
        v = y[i]
        out[i] = dy[i] * (one - v * v)


@njit(cache=True)
def sigmoid_bwd(y, dy, out):
    """out = dy * y * (1 - y). out may be dy."""
    one = y.dtype.type(1)
    for i in range(y.size):
        v = y[i]
        out[i] = dy[i] * v * (one - v)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True)
def dropout_fwd(x, p, seed, offset, scale, out, mask):
    """The splitmix64 keep test of gpuml.backend.rng.uniform, bit for bit (uint64 wrap-around),
    fused with out = x * mask * scale. seed and offset are uint64; p and scale floats."""
    for i in range(x.size):
        z = seed + _GOLDEN * (offset + np.uint64(i) + np.uint64(1))
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
        u = float(z >> np.uint64(40)) / 16777216.0
        keep = u >= p
        mask[i] = 1 if keep else 0
        out[i] = x[i] * (scale if keep else 0)


@njit(cache=True)
def mask_scale(dy, mask, scale, out):
    """out = dy * mask * scale (dropout backward)."""
    for i in range(dy.size):
        g = dy[i]
        out[i] = g * (scale if mask[i] else 0)


@njit(cache=True)
def axpy(dst, src, alpha):
    """dst += alpha * src."""
    for i in range(dst.size):
        dst[i] += alpha * src[i]


# --------------------------------------------------------------------------- data


@njit(cache=True)
def gather_rows_lut(images, indices, lut, out):
    """out[b, j] = lut[images[indices[b], j]]: uint8 pixels through a 256-entry table."""
    B, D = out.shape
    for b in range(B):
        src = indices[b]
        for j in range(D):
            out[b, j] = lut[images[src, j]]


@njit(cache=True)
def channel_sums(dy, out):
    """out[c] = sum of dy (N, C, L) over n and l, in float64 with four running accumulators."""
    N, C, L = dy.shape
    for c in range(C):
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        for n in range(N):
            i = 0
            while i + 4 <= L:
                a0 += dy[n, c, i]
                a1 += dy[n, c, i + 1]
                a2 += dy[n, c, i + 2]
                a3 += dy[n, c, i + 3]
                i += 4
            while i < L:
                a0 += dy[n, c, i]
                i += 1
        out[c] = (a0 + a1) + (a2 + a3)
