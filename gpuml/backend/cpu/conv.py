"""Convolution for the CPU backend: im2col (numba) + one BLAS GEMM per chunk of the batch.

With col the im2col matrix of a chunk of n images:
    fwd         gemm (K, n*P*Q) = W (K, C*R*S) @ col;  y = act(gemm + b), transposed to NCHW
    bwd_data    dyT (K, n*P*Q) = dy transposed;  dcol = W.T @ dyT;  dx = col2im(dcol)
    bwd_weight  dW (K, C*R*S) = sum over the chunks, in order, of dyT @ col.T
col is (C*R*S, n*P*Q) built from NCHW: row (c*R + r)*S + s, column n*P*Q + p*Q + q holds
x[n, c, p*sh - ph + r, q*sw - pw + s], or 0 where that falls in the padding. With
NHWC_MIN_CHANNELS input channels or more, col (and bwd_data's dcol) is channels-last instead,
(n*P*Q, R*S*C) with W reordered to match: im2col and col2im then move runs of S*C values instead
of runs of Q. With few input channels, fwd and bwd_weight run one small GEMM per image on the NCHW
tensors as they are (numpy loops BLAS over the stack): col is thin there, and copying y or dy
between NCHW and channel-major order cost more than the GEMM.

A chunk is sized so that col and the GEMM result stay near COL_BUDGET_BYTES: written and read back
by the GEMM in cache, which more than pays for the extra GEMM calls, and lets bwd_weight rebuild
col instead of keeping the forward's. The chunks run on all cores at once (loops.run_tasks),
each with single-threaded GEMMs, so that no core idles through the numba loops between GEMMs;
chunk bounds depend on the shapes alone, so results do not depend on the core count. Arguments
arrive validated (shapes, dtype, C-contiguous) from CpuBackend; these functions only compute.
"""

from __future__ import annotations

import math

import numpy as np

from gpuml.backend.cpu.conv_loops import (
    bias_act_planes,
    col2im,
    col2im_nhwc,
    conv_epilogue,
    gather_dz,
    im2col,
    im2col_nhwc,
    lane_sums,
)
from gpuml.backend.cpu.loops import run_tasks
from gpuml.backend.cpu.mkl import Mkl
from gpuml.backend.cpu.precision import round_operand

#: the size one im2col matrix aims at; a batch is split into equal chunks of whole images
COL_BUDGET_BYTES = 4 << 20
#: chunks a batch is cut into at least (where it has that many images), so that two cores get
#: some; more chunks at a small batch cost more in hand-offs and smaller GEMMs than they balance
#: (the seed CNN at batch 32: 8 chunks 6.9 ms a step, 4 chunks 6.4 ms, 2 chunks 5.9-6.2 ms on 2 cores)
MIN_CHUNKS = 2
#: the chunk count is rounded up to a multiple of this, so that two workers finish together (3
#: chunks on 2 cores left one idle for a third of the op: 6.7 ms a step)
CHUNK_GRAIN = 2
#: from this many input channels on, fwd and bwd_weight build im2col from a channels-last copy
NHWC_MIN_CHANNELS = 8

Geometry = tuple[int, int, int, int, int, int]  # kh, kw, sh, sw, ph, pw


class Workspace:
    """The CPU backend's scratch buffers. They live as long as the backend, so a training step
    allocates nothing after its first call."""

    def __init__(self, mkl: Mkl | None = None) -> None:
        self._scratch: dict[tuple[str, np.dtype], np.ndarray] = {}
        self.mkl = mkl

    def gemm(self, a: np.ndarray, b: np.ndarray, out: np.ndarray, *, alone: bool = True) -> None:
        """out = a @ b (2-D) on MKL where it is loaded and takes the operands (mkl.py), else numpy's
        BLAS. `alone`: on the calling thread, for a run_tasks chunk (numpy's OpenBLAS is then
        single-threaded by run_tasks); else a dense product on MKL's threads."""
        done = self.mkl is not None and (self.mkl.matmul_here(a, b, out) if alone else self.mkl.matmul(a, b, out))
        if not done:
            np.matmul(a, b, out=out)

    def scratch(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous array of `shape` carved from the named buffer (contents left over from
        its last use; NaN when new, so a loop that skips an element shows up in its result)."""
        size = math.prod(shape)
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
    count = max(MIN_CHUNKS, -(-n_images * per_image // COL_BUDGET_BYTES))
    count = max(1, min(n_images, -(-count // CHUNK_GRAIN) * CHUNK_GRAIN))
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


class Dz:
    """How the backward ops get their dz from dy: through the ReLU backward of `mask` (the conv's
    output) when given, and with the bias gradient summed into `db` when given, both in the pass
    that lays dz out for the GEMMs (conv_loops.gather_dz), chunk by chunk, so no pass over the
    whole batch writes dz or reads it for the sums. `precision` (tf32 / bf16) rounds the GEMM
    operand after the sums: the bias gradient comes from the unrounded dz, as on the GPU."""

    def __init__(self, dy: np.ndarray, mask: np.ndarray | None = None, db: np.ndarray | None = None,
                 precision: str = "fp32") -> None:
        self.dy3 = dy.reshape(dy.shape[0], dy.shape[1], -1)
        self.mask3 = None if mask is None else mask.reshape(self.dy3.shape)
        self.db = db
        self.precision = precision

    @property
    def plain(self) -> bool:
        """dz is dy as it is: the GEMMs may read dy in place."""
        return self.mask3 is None and self.db is None and self.precision == "fp32"

    def gather(self, ws: Workspace, worker: int, chunk: int, n0: int, n1: int, channel_major: bool,
               sums: np.ndarray | None) -> np.ndarray:
        """dz of images [n0, n1): (K, n*L) channel-major or (n, K, L), in the worker's scratch;
        with a db, its float64 partial sums go to sums[chunk]."""
        dy = self.dy3[n0:n1]
        n, K, L = dy.shape
        shape = (K, n * L) if channel_major else (n, K, L)
        dst = ws.scratch(f"gemm{worker}" if channel_major else f"dz{worker}", shape, dy.dtype)
        with_sums = self.db is not None
        acc = ws.scratch(f"dz_lanes{worker}", (K * L,), np.dtype(np.float64)) if with_sums else _NO_LANES
        if with_sums:
            acc.fill(0)
        mask = dy if self.mask3 is None else self.mask3[n0:n1]
        gather_dz(dy, mask, self.mask3 is not None, dst, channel_major, acc, with_sums)
        if with_sums:
            lane_sums(acc, K, L, sums[chunk])  # type: ignore[index]
        if self.precision != "fp32":
            np.copyto(dst, round_operand(dst, self.precision))
        return dst

    def sums_buffer(self, ws: Workspace, chunks: int) -> np.ndarray | None:
        if self.db is None:
            return None
        return ws.scratch("db_parts", (chunks, self.dy3.shape[1]), np.dtype(np.float64))

    def finish(self, sums: np.ndarray | None) -> None:
        """db = the chunks' partial sums added in chunk order (float64), then rounded once."""
        if self.db is not None and sums is not None:
            total = sums[0].copy()
            for part in sums[1:]:
                total += part
            np.copyto(self.db, total, casting="same_kind")


_NO_LANES = np.zeros(1, np.float64)


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
        n = n1 - n0
        col = _im2col_chunk(ws, worker, x[n0:n1], geom, L)
        if nhwc:
            gemm = ws.scratch(f"gemm{worker}", (K, n * L), x.dtype)
            ws.gemm(w2, col.T, gemm)
            conv_epilogue(gemm, bias, relu, y3[n0:n1])
            return
        # few input channels: one GEMM per image straight into y (K rows of L pixels), then the
        # bias and activation in place, rather than a channel-major result transposed into y
        y_chunk = y3[n0:n1]
        np.matmul(w2, col.reshape(-1, n, L).transpose(1, 0, 2), out=y_chunk)
        bias_act_planes(y_chunk, bias, relu)

    run_tasks(chunk, len(chunks))


def conv2d_bwd_data(ws: Workspace, dz: Dz, w: np.ndarray, geom: Geometry, dx: np.ndarray) -> None:
    N, K, L = dz.dy3.shape
    nhwc = _use_nhwc(dx.shape[1])
    w2 = _weight_rsc(ws, w) if nhwc else w.reshape(K, -1)
    crs = w2.shape[1]
    chunks = _chunks(N, max(crs, K), L, dx.itemsize)

    def chunk(worker: int, i: int) -> None:
        n0, n1 = chunks[i]
        n = n1 - n0
        dyt = dz.gather(ws, worker, i, n0, n1, True, None)
        if nhwc:
            # channels-last dcol: col2im then adds runs of kw*C entries, not of Q
            dcol = ws.scratch(f"col{worker}", (n * L, crs), dx.dtype)
            ws.gemm(dyt.T, w2, dcol)
            col2im_nhwc(dcol.reshape(n, L, crs), *geom, dx[n0:n1])
        else:
            dcol = ws.scratch(f"col{worker}", (crs, n * L), dx.dtype)
            ws.gemm(w2.T, dyt, dcol)
            col2im(dcol, *geom, dx[n0:n1])

    run_tasks(chunk, len(chunks))


def conv2d_bwd_weight(ws: Workspace, x: np.ndarray, dz: Dz, geom: Geometry, dw: np.ndarray) -> None:
    N, K, L = dz.dy3.shape
    C = x.shape[1]
    nhwc = _use_nhwc(C)
    crs = dw[0].size
    chunks = _chunks(N, max(crs, K), L, x.itemsize)
    # one dW per chunk, in im2col's column order ((K, C*R*S), or (K, R*S*C) channels-last),
    # summed in chunk order below so the result does not depend on which thread ran which chunk
    parts = ws.scratch("dw_parts", (len(chunks), K, crs), dw.dtype)
    sums = dz.sums_buffer(ws, len(chunks))

    def chunk(worker: int, i: int) -> None:
        n0, n1 = chunks[i]
        col = _im2col_chunk(ws, worker, x[n0:n1], geom, L)
        if nhwc:
            ws.gemm(dz.gather(ws, worker, i, n0, n1, True, sums), col, parts[i])
            return
        # few input channels: col has few rows, so the GEMM is cheap next to copying dy into
        # channel-major order; one small GEMM per image on dz laid out as dy, summed in image order
        n = n1 - n0
        dz3 = dz.dy3[n0:n1] if dz.plain else dz.gather(ws, worker, i, n0, n1, False, sums)
        per_image = ws.scratch(f"dw_images{worker}", (n, K, crs), dw.dtype)
        np.matmul(dz3, col.reshape(crs, n, L).transpose(1, 2, 0), out=per_image)
        np.sum(per_image, axis=0, out=parts[i])

    run_tasks(chunk, len(chunks))
    dz.finish(sums)
    _sum_parts(ws, parts, nhwc, geom, dw)


def _sum_parts(ws: Workspace, parts: np.ndarray, nhwc: bool, geom: Geometry, dw: np.ndarray) -> None:
    """dw = the chunks' weight gradients added in chunk order (from im2col's column order)."""
    K, C = dw.shape[0], dw.shape[1]
    crs = dw[0].size
    dw2 = ws.scratch("dw_rsc", (K, crs), dw.dtype) if nhwc else dw.reshape(K, crs)
    np.copyto(dw2, parts[0])
    for i in range(1, parts.shape[0]):
        dw2 += parts[i]
    if nhwc:
        R, S = geom[0], geom[1]
        np.copyto(dw, dw2.reshape(K, R, S, C).transpose(0, 3, 1, 2))


def fused_bwd(channels: int) -> bool:
    """Whether conv2d_bwd can serve a layer's two gradients in one pass: the channels-last path,
    where both GEMMs take dz in the same (K, n*L) layout."""
    return _use_nhwc(channels)


def conv2d_bwd(ws: Workspace, x: np.ndarray, w: np.ndarray, dz: Dz, geom: Geometry, dw: np.ndarray,
               dx: np.ndarray) -> None:
    """conv2d_bwd_weight and conv2d_bwd_data of one layer in one run_tasks (channels-last only,
    fused_bwd): each chunk lays dz out once for both GEMMs and hands off once, where the two ops
    each did both (the seed CNN's second layer at batch 32: two gathers of 16 x 64 x 121 masked
    values per chunk and two thread hand-offs of 50-90 us). Same chunks, same GEMMs on the same
    operands, same summation order: the same bits as the two ops."""
    N, K, L = dz.dy3.shape
    crs = dw[0].size
    w2 = _weight_rsc(ws, w)
    chunks = _chunks(N, max(crs, K), L, x.itemsize)
    parts = ws.scratch("dw_parts", (len(chunks), K, crs), dw.dtype)
    sums = dz.sums_buffer(ws, len(chunks))

    def chunk(worker: int, i: int) -> None:
        n0, n1 = chunks[i]
        n = n1 - n0
        dzt = dz.gather(ws, worker, i, n0, n1, True, sums)
        ws.gemm(dzt, _im2col_chunk(ws, worker, x[n0:n1], geom, L), parts[i])
        dcol = ws.scratch(f"col{worker}", (n * L, crs), dx.dtype)  # im2col's buffer, read by now
        ws.gemm(dzt.T, w2, dcol)
        col2im_nhwc(dcol.reshape(n, L, crs), *geom, dx[n0:n1])

    run_tasks(chunk, len(chunks))
    dz.finish(sums)
    _sum_parts(ws, parts, True, geom, dw)
