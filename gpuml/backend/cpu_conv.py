"""Convolution for the CPU backend: im2col (numba) + one BLAS GEMM per chunk of the batch.

With col (C*R*S, n*P*Q) the im2col matrix of a chunk of n images (layout in cpu_loops):
    fwd         gemm (K, n*P*Q) = W (K, C*R*S) @ col;  y = act(gemm + b), transposed to NCHW
    bwd_data    dyT (K, n*P*Q) = dy transposed;  dcol = W.T @ dyT;  dx = col2im(dcol)
    bwd_weight  dW (K, C*R*S) = sum over the chunks, in order, of dyT @ col.T
The chunk is sized so that col and the GEMM result stay near COL_BUDGET_BYTES: a col that fits in cache is written
and read back by the GEMM at cache speed, which on a 2-core machine more than pays for the extra
GEMM calls, and lets bwd_weight rebuild col instead of keeping the forward's. Arguments arrive
validated (shapes, dtype, C-contiguous) from CpuBackend; these functions only compute.
"""

from __future__ import annotations

import numpy as np

from gpuml.backend import cpu_loops as loops

#: the size one im2col matrix aims at; a batch is split into equal chunks of whole images
COL_BUDGET_BYTES = 4 << 20

Geometry = tuple[int, int, int, int, int, int]  # kh, kw, sh, sw, ph, pw


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
    COL_BUDGET_BYTES (one image at least)."""
    per_image = rows * cols_per_image * itemsize
    count = max(1, min(n_images, -(-n_images * per_image // COL_BUDGET_BYTES)))
    size = -(-n_images // count)
    return [(n0, min(n_images, n0 + size)) for n0 in range(0, n_images, size)]


def conv2d_fwd(
    ws: Workspace, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None, geom: Geometry, relu: bool, y: np.ndarray
) -> None:
    N, K, P, Q = y.shape
    L = P * Q
    w2 = w.reshape(K, -1)
    crs = w2.shape[1]
    if bias is None:
        bias = ws.scratch("zero_bias", (K,), w.dtype)
        bias.fill(0)
    y3 = y.reshape(N, K, L)
    for n0, n1 in _chunks(N, max(crs, K), L, x.itemsize):
        col = ws.scratch("col", (crs, (n1 - n0) * L), x.dtype)
        loops.im2col(x[n0:n1], *geom, col)
        gemm = ws.scratch("gemm", (K, (n1 - n0) * L), x.dtype)
        np.matmul(w2, col, out=gemm)
        loops.conv_epilogue(gemm, bias, relu, y3[n0:n1])


def conv2d_bwd_data(ws: Workspace, dy: np.ndarray, w: np.ndarray, geom: Geometry, dx: np.ndarray) -> None:
    N, K, P, Q = dy.shape
    L = P * Q
    w2 = w.reshape(K, -1)
    crs = w2.shape[1]
    dy3 = dy.reshape(N, K, L)
    for n0, n1 in _chunks(N, max(crs, K), L, dy.itemsize):
        dyt = ws.scratch("gemm", (K, (n1 - n0) * L), dy.dtype)
        loops.batch_to_channel_major(dy3[n0:n1], dyt)
        dcol = ws.scratch("col", (crs, (n1 - n0) * L), dy.dtype)
        np.matmul(w2.T, dyt, out=dcol)
        loops.col2im(dcol, *geom, dx[n0:n1])


def conv2d_bwd_weight(ws: Workspace, x: np.ndarray, dy: np.ndarray, geom: Geometry, dw: np.ndarray) -> None:
    N, K, P, Q = dy.shape
    L = P * Q
    dw2 = dw.reshape(K, -1)
    crs = dw2.shape[1]
    dy3 = dy.reshape(N, K, L)
    for n0, n1 in _chunks(N, max(crs, K), L, x.itemsize):
        col = ws.scratch("col", (crs, (n1 - n0) * L), x.dtype)
        loops.im2col(x[n0:n1], *geom, col)
        dyt = ws.scratch("gemm", (K, (n1 - n0) * L), dy.dtype)
        loops.batch_to_channel_major(dy3[n0:n1], dyt)
        if n0 == 0:
            np.matmul(dyt, col.T, out=dw2)
        else:
            part = ws.scratch("dw_part", dw2.shape, dw.dtype)
            np.matmul(dyt, col.T, out=part)
            dw2 += part
