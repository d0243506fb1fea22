"""Convolution for the CPU backend: im2col (numba) + one BLAS GEMM per chunk of the batch.

With col the im2col matrix of a chunk of n images:
    fwd         gemm (K, n*P*Q) = W (K, C*R*S) @ col;  y = act(gemm + b), transposed to NCHW
    bwd_data    dyT (K, n*P*Q) = dy transposed;  dcol = W.T @ dyT;  dx = col2im(dcol)
    bwd_weight  dW (K, C*R*S) = sum over the chunks, in order, of dyT @ col.T
col is (C*R*S, n*P*Q) built from NCHW: row (c*R + r)*S + s, column n*P*Q + p*Q + q holds
x[n, c, p*sh - ph + r, q*sw - pw + s], or 0 where that falls in the padding. With
NHWC_MIN_CHANNELS input channels or more, col (and bwd_data's dcol) is channels-last instead,
(n*P*Q, R*S*C) with W reordered to match: im2col and col2im then move runs of S*C values instead
of runs of Q.

A chunk is sized so that col and the GEMM result stay near COL_BUDGET_BYTES: written and read back
by the GEMM in cache, which more than pays for the extra GEMM calls, and lets bwd_weight rebuild
col instead of keeping the forward's. The chunks run on all cores at once (cpu_loops.run_tasks),
each with single-threaded GEMMs, so that no core idles through the numba loops between GEMMs;
chunk bounds depend on the shapes alone, so results do not depend on the core count. Arguments
arrive validated (shapes, dtype, C-contiguous) from CpuBackend; these functions only compute.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from gpuml.backend.cpu_loops import run_tasks

#: the size one im2col matrix aims at; a batch is split into equal chunks of whole images
COL_BUDGET_BYTES = 4 << 20
#: chunks a batch is cut into at least (where it has that many images), so every core gets some
MIN_CHUNKS = 8
#: from this many input channels on, fwd and bwd_weight build im2col from a channels-last copy
NHWC_MIN_CHANNELS = 8

Geometry = tuple[int, int, int, int, int, int]  # kh, kw, sh, sw, ph, pw


# --------------------------------------------------------------------------- loops


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
def batch_to_channel_major(dy, dyt):
    """dyt (K, N*L) from dy (N, K, L): the layout the weight- and data-gradient GEMMs need."""
    N, K, L = dy.shape
    for n in range(N):
        for k in range(K):
            dyt[k, n * L : (n + 1) * L] = dy[n, k]


# --------------------------------------------------------------------------- drivers


class Workspace:
    """The CPU backend's scratch buffers. They live as long as the backend, so a training step
    allocates nothing after its first call."""

    def __init__(self) -> None:
        self._scratch: dict[tuple[str, np.dtype], np.ndarray] = {}

    def scratch(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous array of `shape` carved from the named buffer (contents left over from
        its last use; NaN when new, so a loop that skips an element shows up in its result)."""
        size = int(np.prod(shape))
        buf = self._scratch.get((name, dtype))
        if buf is None or buf.size < size:
            buf = np.full(size, np.nan, dtype=dtype)
            self._scratch[(name, dtype)] = buf
        return buf[:size].reshape(shape)


def _chunks(n_images: int, rows: int, cols_per_image: int, itemsize: int) -> list[tuple[int, int]]:
    """[n0, n1) ranges of near-equal size whose (rows, n*cols_per_image) scratch matrices fit
    COL_BUDGET_BYTES (one image at least), and at least MIN_CHUNKS of them where the batch allows,
    so that every core gets chunks. Fixed by the shapes alone, never by the core count: the
    weight gradient sums over the chunks."""
    per_image = rows * cols_per_image * itemsize
    count = max(1, min(n_images, max(MIN_CHUNKS, -(-n_images * per_image // COL_BUDGET_BYTES))))
    size = -(-n_images // count)
    return [(n0, min(n_images, n0 + size)) for n0 in range(0, n_images, size)]


def _use_nhwc(channels: int) -> bool:
    """Whether im2col goes through a channels-last copy of x (runs of kw*C contiguous inputs)
    rather than straight from NCHW (runs of Q): the copy pays from about 8 channels on."""
    return channels >= NHWC_MIN_CHANNELS


def _weight_rsc(ws: Workspace, w: np.ndarray) -> np.ndarray:
    """w (K, C, R, S) reordered to (K, R*S*C), the column order of im2col_nhwc."""
    K, C, R, S = w.shape
    w_rsc = ws.scratch("w_rsc", (K, R, S, C), w.dtype)
    np.copyto(w_rsc, w.transpose(0, 2, 3, 1))
    return w_rsc.reshape(K, R * S * C)


def _im2col_chunk(ws: Workspace, worker: int, x: np.ndarray, geom: Geometry, L: int) -> np.ndarray:
    """col of the images x: (C*R*S, n*L) from NCHW, or (n*L, R*S*C) channels-last."""
    n, C = x.shape[0], x.shape[1]
    crs = C * geom[0] * geom[1]
    if not _use_nhwc(C):
        col = ws.scratch(f"col{worker}", (crs, n * L), x.dtype)
        im2col(x, *geom, col)
        return col
    col = ws.scratch(f"col{worker}", (n * L, crs), x.dtype)
    im2col_nhwc(x, *geom, col.reshape(n, L, crs))
    return col


def _channel_major(ws: Workspace, worker: int, dy3: np.ndarray) -> np.ndarray:
    n, K, L = dy3.shape
    dyt = ws.scratch(f"gemm{worker}", (K, n * L), dy3.dtype)
    batch_to_channel_major(dy3, dyt)
    return dyt


def conv2d_fwd(
    ws: Workspace, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, geom: Geometry, relu: bool, y: np.ndarray
) -> None:
    N, K, P, Q = y.shape
    L = P * Q
    nhwc = _use_nhwc(x.shape[1])
    w2 = _weight_rsc(ws, w) if nhwc else w.reshape(K, -1)
    if bias is None:
        bias = ws.scratch("zero_bias", (K,), w.dtype)
        bias.fill(0)
    y3 = y.reshape(N, K, L)
    chunks = _chunks(N, max(w2.shape[1], K), L, x.itemsize)

    def chunk(worker: int, i: int) -> None:
        n0, n1 = chunks[i]
        col = _im2col_chunk(ws, worker, x[n0:n1], geom, L)
        gemm = ws.scratch(f"gemm{worker}", (K, (n1 - n0) * L), x.dtype)
        np.matmul(w2, col.T if nhwc else col, out=gemm)
        conv_epilogue(gemm, bias, relu, y3[n0:n1])

    run_tasks(chunk, len(chunks))


def conv2d_bwd_data(ws: Workspace, dy: np.ndarray, w: np.ndarray, geom: Geometry, dx: np.ndarray) -> None:
    N, K, P, Q = dy.shape
    L = P * Q
    nhwc = _use_nhwc(dx.shape[1])
    w2 = _weight_rsc(ws, w) if nhwc else w.reshape(K, -1)
    crs = w2.shape[1]
    dy3 = dy.reshape(N, K, L)
    chunks = _chunks(N, max(crs, K), L, dy.itemsize)

    def chunk(worker: int, i: int) -> None:
        n0, n1 = chunks[i]
        n = n1 - n0
        dyt = _channel_major(ws, worker, dy3[n0:n1])
        if nhwc:
            # channels-last dcol: col2im then adds runs of kw*C entries, not of Q
            dcol = ws.scratch(f"col{worker}", (n * L, crs), dy.dtype)
            np.matmul(dyt.T, w2, out=dcol)
            col2im_nhwc(dcol.reshape(n, L, crs), *geom, dx[n0:n1])
        else:
            dcol = ws.scratch(f"col{worker}", (crs, n * L), dy.dtype)
            np.matmul(w2.T, dyt, out=dcol)
            col2im(dcol, *geom, dx[n0:n1])

    run_tasks(chunk, len(chunks))


def conv2d_bwd_weight(ws: Workspace, x: np.ndarray, dy: np.ndarray, geom: Geometry, dw: np.ndarray) -> None:
    N, K, P, Q = dy.shape
    L = P * Q
    C = x.shape[1]
    nhwc = _use_nhwc(C)
    crs = dw[0].size
    dy3 = dy.reshape(N, K, L)
    chunks = _chunks(N, max(crs, K), L, x.itemsize)
    # one dW per chunk, in im2col's column order ((K, C*R*S), or (K, R*S*C) channels-last),
    # summed in chunk order below so the result does not depend on which thread ran which chunk
    parts = ws.scratch("dw_parts", (len(chunks), K, crs), dw.dtype)

    def chunk(worker: int, i: int) -> None:
        n0, n1 = chunks[i]
        col = _im2col_chunk(ws, worker, x[n0:n1], geom, L)
        dyt = _channel_major(ws, worker, dy3[n0:n1])
        np.matmul(dyt, col if nhwc else col.T, out=parts[i])

    run_tasks(chunk, len(chunks))
    dw2 = ws.scratch("dw_rsc", (K, crs), dw.dtype) if nhwc else dw.reshape(K, crs)
    np.copyto(dw2, parts[0])
    for i in range(1, len(chunks)):
        dw2 += parts[i]
    if nhwc:
        R, S = geom[0], geom[1]
        np.copyto(dw, dw2.reshape(K, R, S, C).transpose(0, 3, 1, 2))
