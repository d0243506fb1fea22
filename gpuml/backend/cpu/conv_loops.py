"""Numba loops of the CPU convolution (conv.py drives them): im2col and its adjoint col2im, in
NCHW and channels-last column order, and the layout passes around the GEMMs. Each writes into the
arrays it is given, serially (conv.py runs them on several threads by chunks of the batch), and
sums in a fixed order.
"""

from __future__ import annotations

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


# The hot copy loops below index flat views with uint64 offsets: numba guards every signed index
# against negative wraparound, and that branch keeps LLVM from vectorising the loop (4x slower).
# A signed offset that is negative as a whole converts to the same bits, so sums stay exact.
_U = np.uint64


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def _image_to_hwc(x, n, xh):
    """xh (H*W*C) = image n of x (N, C, H, W) channels-last, so a pixel's channels are contiguous."""
    _, C, H, W = x.shape
    HW = H * W
    xf = x.reshape(-1)
    for c in range(C):
        src = _U((n * C + c) * HW)
        for i in range(_U(HW)):
            xh[i * _U(C) + _U(c)] = xf[src + i]


@njit(cache=True, nogil=True)
def im2col_nhwc(x, kh, kw, sh, sw, ph, pw, col):
    """x (N, C, H, W) -> col (N, P*Q, kh*kw*C): row p*Q + q of image n, column (r*kw + s)*C + c.
    Each image is first made channels-last in a small scratch that stays in cache; then for a fixed
    (output pixel, r) the kw*C inputs are one contiguous run, so with many channels this copies
    long runs where the NCHW im2col copies rows of Q."""
    N, C, H, W = x.shape
    P = (H + 2 * ph - kh) // sh + 1
    Q = (W + 2 * pw - kw) // sw + 1
    SC = kw * C
    xh = np.empty(H * W * C, x.dtype)
    cf = col.reshape(-1)
    for n in range(N):
        _image_to_hwc(x, n, xh)
        for p in range(P):
            for q in range(Q):
                w0 = q * sw - pw
                s_lo = max(0, -w0)
                s_hi = max(s_lo, min(kw, W - w0))
                row = ((n * P + p) * Q + q) * kh * SC
                for r in range(kh):
                    h = p * sh - ph + r
                    dst = _U(row + r * SC)
                    if h < 0 or h >= H:
                        for i in range(_U(SC)):
                            cf[dst + i] = 0
                        continue
                    for i in range(_U(s_lo * C)):
                        cf[dst + i] = 0
                    src = _U((h * W + w0 + s_lo) * C)
                    d = dst + _U(s_lo * C)
                    for i in range(_U((s_hi - s_lo) * C)):
                        cf[d + i] = xh[src + i]
                    for i in range(_U(s_hi * C), _U(SC)):
                        cf[dst + i] = 0


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def col2im_nhwc(col, kh, kw, sh, sw, ph, pw, dx):
    """dx (N, C, H, W) = the adjoint of im2col_nhwc, col (N, P*Q, kh*kw*C): per image, the runs of
    kw*C entries are added onto a channels-last scratch (output pixels in row-major order, then r),
    which is then transposed into dx[n]."""
    N, C, H, W = dx.shape
    P = (H + 2 * ph - kh) // sh + 1
    Q = (W + 2 * pw - kw) // sw + 1
    SC = kw * C
    HW = H * W
    acc = np.empty(HW * C, dx.dtype)
    cf = col.reshape(-1)
    dxf = dx.reshape(-1)
    for n in range(N):
        acc[:] = 0
        for p in range(P):
            for q in range(Q):
                w0 = q * sw - pw
                s_lo = max(0, -w0)
                s_hi = max(s_lo, min(kw, W - w0))
                row = ((n * P + p) * Q + q) * kh * SC
                for r in range(kh):
                    h = p * sh - ph + r
                    if h < 0 or h >= H:
                        continue
                    src = _U(row + r * SC + s_lo * C)
                    dst = _U((h * W + w0 + s_lo) * C)
                    for i in range(_U((s_hi - s_lo) * C)):
                        acc[dst + i] += cf[src + i]
        for c in range(C):
            out = _U((n * C + c) * HW)
            for i in range(_U(HW)):
                dxf[out + i] = acc[i * _U(C) + _U(c)]


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def bias_act_planes(y, bias, relu):
    """In place on y (N, K, L): y = act(y + bias (K,)); relu keeps NaN, as np.maximum does."""
    N, K, L = y.shape
    for n in range(N):
        for k in range(K):
            b = bias[k]
            row = y[n, k]
            if relu:
                for i in range(L):
                    v = row[i] + b
                    row[i] = 0 if v < 0 else v
            else:
                for i in range(L):
                    row[i] += b


@njit(cache=True, nogil=True)
def gather_dz(dy, mask, masked, dst, channel_major, acc, sums):
    """The backward ops' dz, in one pass over dy (N, K, L) with the ReLU backward and the bias
    gradient's sums riding along (no separate pass writes dz or reads it for the sums):
    dz = mask > 0 ? dy : 0 where `masked` (a select: a NaN dy under a closed mask gives 0), else dy;
    written to dst (contiguous) channel-major (K, N*L) or, not channel_major, as dy (N, K, L).
    With `sums`, acc (K*L, float64) += dz for each n in order: one accumulator per (k, l), so the
    loop vectorises without reassociating (lane_sums then adds the lanes). mask and acc are not
    read when their flag is off (pass any array of the right rank)."""
    N, K, L = dy.shape
    df = dst.reshape(-1)
    for n in range(N):
        for k in range(K):
            src = dy[n, k]
            base = _U(k) * _U(N * L) + _U(n * L) if channel_major else _U(n * K + k) * _U(L)
            a0 = _U(k) * _U(L)
            if masked:
                m = mask[n, k]
                if sums:
                    for i in range(L):
                        v = src[i] if m[i] > 0 else src.dtype.type(0)
                        df[base + _U(i)] = v
                        acc[a0 + _U(i)] += v
                else:
                    for i in range(L):
                        df[base + _U(i)] = src[i] if m[i] > 0 else src.dtype.type(0)
            elif sums:
                for i in range(L):
                    v = src[i]
                    df[base + _U(i)] = v
                    acc[a0 + _U(i)] += v
            else:
                for i in range(L):
                    df[base + _U(i)] = src[i]


@njit(cache=True, nogil=True)
def lane_sums(acc, K, L, out):
    """out[k] (float64) = sum of the L lanes acc[k*L : (k+1)*L], in lane order."""
    for k in range(K):
        s = 0.0
        for i in range(L):
            s += acc[k * L + i]
        out[k] = s
