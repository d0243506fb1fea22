"""Convolution for the CPU backend: im2col (numba) + one BLAS GEMM per op and batch chunk.

With col (C*R*S, n*P*Q) the im2col matrix of a chunk of n images (layout in cpu_loops):
    fwd         gemm (K, n*P*Q) = W (K, C*R*S) @ col;  y = act(gemm + b), transposed to NCHW
    bwd_data    dyT (K, n*P*Q) = dy transposed;  dcol = W.T @ dyT;  dx = col2im(dcol)
    bwd_weight  dW (K, C*R*S) = sum over chunks of dyT @ col.T
A batch is one chunk unless its col would pass COL_BUDGET_BYTES. Arguments arrive validated
(shapes, dtype, C-contiguous) from CpuBackend; these functions only compute.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from gpuml.backend import cpu_loops as loops

#: the most bytes one im2col matrix may take before the batch is split into chunks
COL_BUDGET_BYTES = 64 << 20
#: how many forward im2col matrices are kept for conv2d_bwd_weight to reuse
MAX_CACHED_COLS = 4

Geometry = tuple[int, int, int, int, int, int]  # kh, kw, sh, sw, ph, pw


class Workspace:
    """The CPU backend's scratch buffers, which live as long as the backend so that a training
    step allocates nothing after its first call, and a cache of forward im2col matrices.

    The cache lets conv2d_bwd_weight skip rebuilding the forward's col. An entry is used only
    when x still holds exactly the values it held in the forward (compared element by element
    against a snapshot), so a buffer rewritten in between, as in a finite-difference check,
    costs a rebuild and never a wrong gradient."""

    def __init__(self) -> None:
        self._scratch: dict[tuple[str, np.dtype], np.ndarray] = {}
        self._cols: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def scratch(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A C-contiguous array of `shape` carved from the named buffer (contents left over from
        its last use; NaN when new, so a loop that skips an element shows up in its result)."""
        size = int(np.prod(shape))
        buf = self._scratch.get((name, dtype))
        if buf is None or buf.size < size:
            buf = np.full(size, np.nan, dtype=dtype)
            self._scratch[(name, dtype)] = buf
        return buf[:size].reshape(shape)

    def forward_col(self, x: np.ndarray, geom: Geometry, col_shape: tuple[int, int]) -> np.ndarray:
        """im2col of the whole batch into a cached matrix, remembering x's values."""
        key = (x.shape, x.dtype, geom)
        entry = self._cols.pop(key, None)
        if entry is None:
            entry = (np.empty_like(x), np.full(col_shape, np.nan, dtype=x.dtype))
            while len(self._cols) >= MAX_CACHED_COLS:
                self._cols.popitem(last=False)
        self._cols[key] = entry
        snapshot, col = entry
        loops.im2col(x, *geom, col)
        np.copyto(snapshot, x)
        return col

    def cached_col(self, x: np.ndarray, geom: Geometry) -> np.ndarray | None:
        entry = self._cols.get((x.shape, x.dtype, geom))
        if entry is None or loops.count_differences(entry[0].reshape(-1), x.reshape(-1)):
            return None
        return entry[1]


def _chunk(n_images: int, rows: int, cols_per_image: int, itemsize: int) -> int:
    per_image = rows * cols_per_image * itemsize
    return max(1, min(n_images, COL_BUDGET_BYTES // max(per_image, 1)))


def conv2d_fwd(
    ws: Workspace,
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None,
    geom: Geometry,
    relu: bool,
    y: np.ndarray,
) -> None:
    N = x.shape[0]
    K = w.shape[0]
    P, Q = y.shape[2], y.shape[3]
    L = P * Q
    w2 = w.reshape(K, -1)
    crs = w2.shape[1]
    b = bias if bias is not None else ws.scratch("zero_bias", (K,), w.dtype)
    if bias is None:
        b.fill(0)
    y3 = y.reshape(N, K, L)
    nb = _chunk(N, crs, L, x.itemsize)
    for n0 in range(0, N, nb):
        n1 = min(N, n0 + nb)
        if nb == N:
            col = ws.forward_col(x, geom, (crs, N * L))
        else:
            col = ws.scratch("col", (crs, (n1 - n0) * L), x.dtype)
            loops.im2col(x[n0:n1], *geom, col)
        gemm = ws.scratch("gemm", (K, (n1 - n0) * L), x.dtype)
        np.matmul(w2, col, out=gemm)
        loops.conv_epilogue(gemm, b, relu, y3[n0:n1])


def conv2d_bwd_data(ws: Workspace, dy: np.ndarray, w: np.ndarray, geom: Geometry, dx: np.ndarray) -> None:
    N, K, P, Q = dy.shape
    L = P * Q
    w2 = w.reshape(K, -1)
    crs = w2.shape[1]
    dy3 = dy.reshape(N, K, L)
    nb = _chunk(N, crs, L, dy.itemsize)
    for n0 in range(0, N, nb):
        n1 = min(N, n0 + nb)
        dyt = ws.scratch("dyT", (K, (n1 - n0) * L), dy.dtype)
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
    nb = _chunk(N, crs, L, x.itemsize)
    for n0 in range(0, N, nb):
        n1 = min(N, n0 + nb)
        col = ws.cached_col(x, geom) if nb == N else None
        if col is None:
            col = ws.scratch("col", (crs, (n1 - n0) * L), x.dtype)
            loops.im2col(x[n0:n1], *geom, col)
        dyt = ws.scratch("dyT", (K, (n1 - n0) * L), dy.dtype)
        loops.batch_to_channel_major(dy3[n0:n1], dyt)
        if n0 == 0:
            np.matmul(dyt, col.T, out=dw2)
        else:
            part = ws.scratch("dw_part", dw2.shape, dw.dtype)
            np.matmul(dyt, col.T, out=part)
            dw2 += part
