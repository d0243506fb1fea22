"""Pooling for the CPU backend: numba loops over (n, c) planes, and the Backend methods on them.

Planes are (M = N*C, H, W) views of NCHW tensors. Max pooling records argmax as the flat index
h*W + w of the winner in its plane; its backward is a gather (each input cell visits the windows
covering it), except for non-overlapping windows, where each cell has one window at most. Loops are
deterministic and run on several threads by ranges of planes (loops.run_parts).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from gpuml.backend.base import Pair
from gpuml.backend.cpu.checks import Checks
from gpuml.backend.cpu.loops import run_parts

# --------------------------------------------------------------------------- loops


@njit(cache=True, inline="always")
def _covering_span(i, kernel, stride, pad, count):
    """[lo, hi): the windows o in [0, count) whose input span [o*stride - pad, +kernel) holds i."""
    a = i + pad - kernel + 1
    lo = 0 if a <= 0 else (a + stride - 1) // stride
    hi = min((i + pad) // stride + 1, count)
    return lo, max(lo, hi)


@njit(cache=True, inline="always")
def _wins(v, best):
    """The max-pool comparison: strictly greater (so the first of equal values stays), and a NaN
    beats any number so that it propagates; once the best is NaN it stays."""
    return (v > best) | ((v != v) & (best == best))


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def maxpool_fwd_2x2(x, y, argmax):
    """maxpool_fwd for 2x2 windows, stride 2, no padding, in two vectorisable passes per output
    row: the max of each window by plain strict-greater selects (the general loop's chain, so the
    same value, -0.0 and 0.0 included), then its argmax as the first cell in row-major order equal
    to it, which is the cell the chain kept. A row holding a NaN is redone by the exact rule (a NaN
    wins, the first NaN stays), which the plain selects do not follow. The NaN-aware select chain
    of the general loop does not vectorise: this is 1.4-2x faster on the seed CNN's layers."""
    M, H, W = x.shape
    _, P, Q = y.shape
    for m in range(M):
        for p in range(P):
            h = 2 * p
            top = x[m, h]
            bot = x[m, h + 1]
            yr = y[m, p]
            ar = argmax[m, p]
            nan = False
            for q in range(Q):
                a = top[2 * q]
                b = top[2 * q + 1]
                c = bot[2 * q]
                d = bot[2 * q + 1]
                best = a
                best = b if b > best else best
                best = c if c > best else best
                best = d if d > best else best
                yr[q] = best
                nan |= (a != a) | (b != b) | (c != c) | (d != d)
            base = h * W
            for q in range(Q):
                best = yr[q]
                i = base + W + 2 * q + 1
                i = base + W + 2 * q if bot[2 * q] == best else i
                i = base + 2 * q + 1 if top[2 * q + 1] == best else i
                i = base + 2 * q if top[2 * q] == best else i
                ar[q] = i
            if nan:
                for q in range(Q):
                    w = 2 * q
                    best = top[w]
                    i = base + w
                    for v, j in ((top[w + 1], base + w + 1), (bot[w], base + W + w), (bot[w + 1], base + W + w + 1)):
                        if _wins(v, best):
                            best = v
                            i = j
                    yr[q] = best
                    ar[q] = i


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True)
def avgpool_fwd_tiled(x, kh, kw, y):
    """avgpool_fwd for non-overlapping windows (stride == kernel, no padding): each window row is
    read once, contiguously, into a float64 row of Q sums, in avgpool_fwd's order (window rows,
    then columns), so the results are the same bits."""
    M, H, W = x.shape
    _, P, Q = y.shape
    inv = 1.0 / (kh * kw)
    acc = np.empty(Q, np.float64)
    for m in range(M):
        for p in range(P):
            acc[:] = 0.0
            for r in range(kh):
                row = x[m, p * kh + r]
                for q in range(Q):
                    for s in range(kw):
                        acc[q] += row[q * kw + s]
            out = y[m, p]
            for q in range(Q):
                out[q] = acc[q] * inv


@njit(cache=True, nogil=True)
def avgpool_bwd_tiled(dy, kh, kw, dx):
    """avgpool_bwd for non-overlapping windows: each cell has one window at most, so dx is dy / (kh
    kw) repeated over its window (0 in the rows and columns no window covers), written row by row.
    The same bits as the gather (a sum of one term)."""
    M, H, W = dx.shape
    _, P, Q = dy.shape
    inv = 1.0 / (kh * kw)
    for m in range(M):
        for h in range(H):
            out = dx[m, h]
            p = h // kh
            if p >= P:
                out[:] = 0
                continue
            src = dy[m, p]
            for q in range(Q):
                v = src[q] * inv
                for s in range(kw):
                    out[q * kw + s] = v
            for w in range(Q * kw, W):
                out[w] = 0


# --------------------------------------------------------------------------- Backend methods


def _planes(a: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N*C, H, W) view."""
    return a.reshape(-1, a.shape[2], a.shape[3])


class PoolingOps(Checks):
    """The Backend's pooling methods, mixed into CpuBackend."""

    def maxpool2d_fwd(
        self,
        x: np.ndarray,
        kernel: Pair,
        stride: Pair,
        padding: Pair,
        *,
        out: np.ndarray | None = None,
        argmax: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        c = self.checks("maxpool2d_fwd", x, kernel, stride, padding, out, argmax)
        x = c.float_in("x", x, ndim=4)
        geom, y_shape = c.pool_geometry(x.shape, kernel, stride, padding)
        out = c.out_buf("out", out, y_shape)
        argmax = c.out_buf("argmax", argmax, y_shape, np.int32)
        c.done()
        if geom == (2, 2, 2, 2, 0, 0):
            run_parts(maxpool_fwd_2x2, (_planes(x), _planes(out), _planes(argmax)), (0, 1, 2), x.size)
        else:
            run_parts(maxpool_fwd, (_planes(x), *geom, _planes(out), _planes(argmax)), (0, 7, 8), x.size)
        return out, argmax

    def maxpool2d_bwd(
        self,
        dy: np.ndarray,
        argmax: np.ndarray,
        x_shape: Sequence[int],
        kernel: Pair,
        stride: Pair,
        padding: Pair,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        c = self.checks("maxpool2d_bwd", dy, argmax, x_shape, kernel, stride, padding, out)
        x_shape = c.shape4("x_shape", x_shape)
        geom, y_shape = c.pool_geometry(x_shape, kernel, stride, padding)
        dy = c.float_in("dy", dy, shape=y_shape)
        argmax = c.typed_in("argmax", argmax, np.int32, y_shape)
        out = c.out_buf("out", out, x_shape)
        c.done()
        kh, kw, sh, sw, ph, pw = geom
        if (sh, sw) == (kh, kw) and ph == pw == 0:
            run_parts(maxpool_bwd_tiled, (_planes(dy), _planes(argmax), _planes(out)), (0, 1, 2), out.size)
        else:
            run_parts(maxpool_bwd, (_planes(dy), _planes(argmax), *geom, _planes(out)), (0, 1, 8), out.size)
        return out

    def avgpool2d_fwd(
        self,
        x: np.ndarray,
        kernel: Pair,
        stride: Pair,
        padding: Pair,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        c = self.checks("avgpool2d_fwd", x, kernel, stride, padding, out)
        x = c.float_in("x", x, ndim=4)
        geom, y_shape = c.pool_geometry(x.shape, kernel, stride, padding)
        out = c.out_buf("out", out, y_shape)
        c.done()
        kh, kw, sh, sw, ph, pw = geom
        if (sh, sw) == (kh, kw) and ph == pw == 0:
            run_parts(avgpool_fwd_tiled, (_planes(x), kh, kw, _planes(out)), (0, 3), x.size)
        else:
            run_parts(avgpool_fwd, (_planes(x), *geom, _planes(out)), (0, 7), x.size)
        return out

    def avgpool2d_bwd(
        self,
        dy: np.ndarray,
        x_shape: Sequence[int],
        kernel: Pair,
        stride: Pair,
        padding: Pair,
        *,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        c = self.checks("avgpool2d_bwd", dy, x_shape, kernel, stride, padding, out)
        x_shape = c.shape4("x_shape", x_shape)
        geom, y_shape = c.pool_geometry(x_shape, kernel, stride, padding)
        dy = c.float_in("dy", dy, shape=y_shape)
        out = c.out_buf("out", out, x_shape)
        c.done()
        kh, kw, sh, sw, ph, pw = geom
        if (sh, sw) == (kh, kw) and ph == pw == 0:
            run_parts(avgpool_bwd_tiled, (_planes(dy), kh, kw, _planes(out)), (0, 3), out.size)
        else:
            run_parts(avgpool_bwd, (_planes(dy), *geom, _planes(out)), (0, 7), out.size)
        return out
