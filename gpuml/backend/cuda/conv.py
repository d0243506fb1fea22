"""Convolution and pooling of the CUDA backend: check -> output buffer -> launch of the kernels in
kernels/conv2d[_tf32|_bf16].cu (contract: kernels/conv_core.cuh; the one per the backend's precision)
and kernels/pool.cu.

The first half is pure Python (geometry, argument checks, the per-shape tile / split plans and the
index tables) and runs without CuPy, so it is unit-tested on any machine. The second half is `ConvPoolOps`, the
mixin that gives `CudaBackend` its seven conv/pool methods. It never synchronises, never calls
cuDNN or cuBLAS, and after the first call for a shape it allocates nothing unless the caller
leaves `out=` unset: the plans, tables and the bwd_weight workspace are cached on the backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuml.backend.base import Array, Pair, check_pair, conv_out_size, fail
from gpuml.backend.cuda.launch import TILE_KIND, ceil_div, gemm_tiles

THREADS = 256  # the pooling kernels' blocks
#: bwd_weight splits its N*P*Q reduction until the grid has about this many blocks (a constant,
#: not the device's SM count, so that dw has the same bits on every GPU: the split changes the
#: summation order) ...
WGRAD_TARGET_BLOCKS = 512
#: ... but no split gets fewer reduction steps than this (adding up the slices would dominate; at
#: 256 the seed CNN's conv2 dW at batch 32 runs 15 slices x 18 tiles, 270 CTAs: 126 at 512)
WGRAD_MIN_STEPS = 256
#: the kernels index with 32-bit ints
INDEX_LIMIT = 2**31 - 1
MAX_GRID_YZ = 65535
#: the per-shape tables pack r and s (and r % sh, s % sw) in 16 bits
MAX_KERNEL_SIZE = 2**15 - 1
#: conv tiles (the CONV rows of kernels/gemm_tiles.h) are not wider than the GEMM's N rounded up to this
TILE_N_GRAIN = 32

Grid = tuple[int, int, int]
BLOCK: Grid = (THREADS, 1, 1)
#: conv_core.cuh backward flags
CONV_RELU_MASK, CONV_BIAS_GRAD = 1, 2
CONV_OPS = ("fwd", "bwd_data", "bwd_weight")


def _dims4(op: str, name: str, shape: Sequence[int]) -> tuple[int, int, int, int]:
    try:
        dims = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        fail(op, f"{name} must have 4 positive dims (N, C, H, W), got {tuple(shape)!r}")
    return dims  # type: ignore[return-value]


def _fits_int32(op: str, **shapes: tuple[int, ...]) -> None:
    for name, shape in shapes.items():
        if int(np.prod(shape, dtype=np.int64)) > INDEX_LIMIT:
            fail(op, f"{name} {shape} has 2^31 or more elements, past the kernels' 32-bit indexing")


@dataclass(frozen=True)
class ConvGeometry:
    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    P: int
    Q: int
    sh: int
    sw: int
    ph: int
    pw: int

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.H, self.W)

    @property
    def w_shape(self) -> tuple[int, int, int, int]:
        return (self.K, self.C, self.R, self.S)

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.K, self.P, self.Q)

    def args(self) -> tuple[np.int32, ...]:
        """The kernels' shape arguments: N, C, H, W, K, R, S, P, Q, sh, sw, ph, pw."""
        g = (self.N, self.C, self.H, self.W, self.K, self.R, self.S, self.P, self.Q)
        return tuple(np.int32(v) for v in (*g, self.sh, self.sw, self.ph, self.pw))


def conv_geometry(
    op: str, x_shape: Sequence[int], w_shape: Sequence[int], stride: Any, padding: Any,
    x_name: str = "x", w_name: str = "w",
) -> ConvGeometry:
    """Check that x (N, C, H, W) and w (K, C, R, S) fit under stride/padding; ShapeError if not."""
    N, C, H, W = _dims4(op, x_name, x_shape)
    K, Cw, R, S = _dims4(op, w_name, w_shape)
    sh, sw = check_pair(op, "stride", stride, 1)
    ph, pw = check_pair(op, "padding", padding, 0)
    if C != Cw:
        fail(op, f"{x_name} {(N, C, H, W)} and {w_name} {(K, Cw, R, S)} do not fit "
                  f"({C} != {Cw} input channels)")
    P, Q = conv_out_size(H, R, sh, ph), conv_out_size(W, S, sw, pw)
    if P < 1 or Q < 1:
        fail(op, f"{x_name} {(N, C, H, W)} padded by {(ph, pw)} is smaller than the {R}x{S} kernel")
    _fits_int32(op, **{x_name: (N, C, H, W), w_name: (K, C, R, S), "y": (N, K, P, Q)})
    if max(R, S) > MAX_KERNEL_SIZE:
        fail(op, f"{w_name} {(K, C, R, S)}: a kernel side past {MAX_KERNEL_SIZE} is not supported")
    return ConvGeometry(N, C, H, W, K, R, S, P, Q, sh, sw, ph, pw)


@dataclass(frozen=True)
class PoolGeometry:
    N: int
    C: int
    H: int
    W: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    P: int
    Q: int

    @property
    def x_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.H, self.W)

    @property
    def y_shape(self) -> tuple[int, int, int, int]:
        return (self.N, self.C, self.P, self.Q)

    def args(self) -> tuple[np.int32, ...]:
        """The kernels' geometry arguments: N*C, H, W, P, Q, kh, kw, sh, sw, ph, pw."""
        g = (self.N * self.C, self.H, self.W, self.P, self.Q, self.kh, self.kw)
        return tuple(np.int32(v) for v in (*g, self.sh, self.sw, self.ph, self.pw))


def pool_geometry(op: str, x_shape: Sequence[int], kernel: Any, stride: Any, padding: Any) -> PoolGeometry:
    """Check a pooling window; padding at most half the kernel (as PyTorch), so every window
    holds at least one real cell."""
    N, C, H, W = _dims4(op, "x", x_shape)
    kh, kw = check_pair(op, "kernel", kernel, 1)
    sh, sw = check_pair(op, "stride", stride, 1)
    ph, pw = check_pair(op, "padding", padding, 0)
    if 2 * ph > kh or 2 * pw > kw:
        fail(op, f"padding {(ph, pw)} is more than half the kernel {(kh, kw)}")
    P, Q = conv_out_size(H, kh, sh, ph), conv_out_size(W, kw, sw, pw)
    if P < 1 or Q < 1:
        fail(op, f"x {(N, C, H, W)} padded by {(ph, pw)} is smaller than the kernel {(kh, kw)}")
    _fits_int32(op, x=(N, C, H, W), y=(N, C, P, Q))
    return PoolGeometry(N, C, H, W, kh, kw, sh, sw, ph, pw, P, Q)


# ------------------------------------------------------------------------------------ launch plans


def elementwise_grid(total: int) -> Grid:
    """One thread per element, THREADS per block (the pooling kernels)."""
    return (ceil_div(total, THREADS), 1, 1)


def conv_gemm_dims(op: str, g: ConvGeometry) -> tuple[int, int, int]:
    """(M, N, reduction) of the implicit GEMM of conv2d_<op> (kernels/conv_core.cuh)."""
    crs, pixels = g.C * g.R * g.S, g.N * g.P * g.Q
    return {"fwd": (pixels, g.K, crs), "bwd_data": (g.N * g.H * g.W, g.C, g.K * g.R * g.S),
            "bwd_weight": (g.K, crs, pixels)}[op]


def conv_tile(M: int, N: int) -> tuple[str, dict[str, int]]:
    """The CONV row of gemm_tiles.h for an M x N output: among the tiles no wider than N rounded up
    to TILE_N_GRAIN (else the narrowest), the first whose grid has MIN_BLOCKS blocks, else the last
    (the smallest). Shapes only, never the SM count."""
    rows = list(gemm_tiles("CONV").items())
    limit = ceil_div(max(N, 1), TILE_N_GRAIN) * TILE_N_GRAIN
    fits = [(n, t) for n, t in rows if t["BN"] <= limit] or [min(rows, key=lambda r: r[1]["BN"])]
    return next(((n, t) for n, t in fits if ceil_div(M, t["BM"]) * ceil_div(N, t["BN"]) >= t["MIN_BLOCKS"]),
                fits[-1])


@dataclass(frozen=True)
class ConvPlan:
    """One conv kernel launch: conv2d_<op>_<precision>_<tile>, grid (M tiles, N tiles, splits).
    bwd_weight splits its N*P*Q reduction: split z sums steps [z*chunk, min((z+1)*chunk, N*P*Q))
    into workspace slice z, then, in the same launch, the last block of each output tile adds the
    slices in a fixed order. With one split (and for fwd / bwd_data) there is no workspace."""

    kernel: str
    grid: Grid
    block: Grid
    chunk: int  # reduction steps per split (the whole reduction without a split)
    splits: int
    tiles: int  # output tiles: the split tickets
    workspace_elems: int  # splits * K*C*R*S (the db slices, splits * K, come on top); 0 unsplit


def conv_plan(op: str, g: ConvGeometry, precision: str = "fp32", name: str | None = None) -> ConvPlan:
    """The launch of conv2d_<op> (fwd, bwd_data, bwd_weight) for geometry g in `precision`."""
    if op not in CONV_OPS or precision not in TILE_KIND:
        raise ValueError(f"conv_plan: op {op!r} / precision {precision!r} unknown")
    name = name or f"conv2d_{op}"
    M, N, L = conv_gemm_dims(op, g)
    tile, t = conv_tile(M, N)
    tiles = (ceil_div(M, t["BM"]), ceil_div(N, t["BN"]))
    if tiles[1] > MAX_GRID_YZ:
        fail(name, f"{N} output columns are more than one launch covers ({MAX_GRID_YZ * t['BN']})")
    splits = 1
    if op == "bwd_weight":
        splits = ceil_div(WGRAD_TARGET_BLOCKS, tiles[0] * tiles[1])
        splits = max(1, min(splits, max(1, L // WGRAD_MIN_STEPS), MAX_GRID_YZ, INDEX_LIMIT // (M * N)))
    chunk = ceil_div(ceil_div(L, splits), t["BK"]) * t["BK"]
    splits = ceil_div(L, chunk)  # rounding the chunk up can leave the last split empty
    return ConvPlan(
        kernel=f"{name}_{precision}_{tile}",
        grid=(tiles[0], tiles[1], splits),
        block=(32 * t["WARPS_M"] * t["WARPS_N"], 1, 1),
        chunk=chunk,
        splits=splits,
        tiles=tiles[0] * tiles[1],
        workspace_elems=splits * M * N if splits > 1 else 0,
    )


def conv_bwd_weight_plan(g: ConvGeometry, precision: str = "fp32") -> ConvPlan:
    return conv_plan("bwd_weight", g, precision)


def conv_table(op: str, g: ConvGeometry) -> np.ndarray:
    """The per-shape reduction-index table of conv2d_fwd / conv2d_bwd_data (kernels/conv_gather.cuh):
    the offsets and kernel taps of every kk, so the kernels decode no index per element.
    fwd: kk = (c, r, s) -> [c*H*W + r*W + s, r << 16 | s];
    bwd_data: kk = (k, r, s) -> [k*P*Q, r // sh | (r % sh) << 16, s // sw | (s % sw) << 16, k*C*R*S + r*S + s]."""
    r = np.arange(g.R, dtype=np.int64)[:, None]
    s = np.arange(g.S, dtype=np.int64)[None, :]
    if op == "fwd":
        c = np.arange(g.C, dtype=np.int64)[:, None, None]
        off = c * g.H * g.W + (r * g.W + s)[None]
        taps = np.broadcast_to(((r << 16) | s)[None], off.shape)
        table = np.stack([off.ravel(), taps.ravel()], axis=1)
    elif op == "bwd_data":
        k = np.arange(g.K, dtype=np.int64)[:, None, None]
        shape = (g.K, g.R, g.S)
        cols = [np.broadcast_to(k * g.P * g.Q, shape),
                np.broadcast_to(((r // g.sh) | ((r % g.sh) << 16))[None], shape),
                np.broadcast_to(((s // g.sw) | ((s % g.sw) << 16))[None], shape),
                np.broadcast_to(k * g.C * g.R * g.S + (r * g.S + s)[None], shape)]
        table = np.stack([col.ravel() for col in cols], axis=1)
    else:
        raise ValueError(f"conv_table: no table for op {op!r}")
    return np.ascontiguousarray(table.ravel(), dtype=np.int32)


# ------------------------------------------------------------------------------------ the mixin


class ConvPoolOps:
    """conv2d_* / maxpool2d_* / avgpool2d_* of the CUDA backend (mixed into CudaBackend, which
    provides `dtype` and `xp` = cupy). Kernels are launched through DevicePlumbing._launch.
    Every kernel reads its inputs while it writes its outputs, so an output overlapping an input
    is refused. Argument checks, launches and scratch buffers come from DevicePlumbing."""

    dtype: np.dtype
    xp: Any

    # ------------------------------------------------------------------ convolution
    def _conv_launch(self, op: str, g: ConvGeometry, args_of: Any) -> None:
        """Launches conv2d_<op> in the backend's precision: the plan and the per-shape table are made
        on the first call for a shape and cached (nothing is allocated after it: graph capture);
        args_of(plan, table) gives the kernel arguments."""
        cache = self.__dict__.setdefault("_conv_cache", {})
        precision = self.precision  # fp32: conv2d.cu, tf32 / bf16: conv2d_<precision>.cu (tensor cores)
        key = (op, g, precision)
        hit = cache.get(key)
        if hit is None:
            table = self.xp.asarray(conv_table(op, g)) if op != "bwd_weight" else None
            hit = cache[key] = (conv_plan(op, g, precision), table)
        plan, table = hit
        family = "conv2d" if precision == "fp32" else f"conv2d_{precision}"
        self._launch(family, plan.kernel, plan.grid, plan.block, args_of(plan, table))

    def conv2d_fwd(self, x: Array, w: Array, bias: Array | None, stride: Pair, padding: Pair, *,
                   activation: str | None = None, out: Array | None = None) -> Array:
        op = "conv2d_fwd"
        x = self._dev_in(op, "x", x, ndim=4)
        w = self._dev_in(op, "w", w, ndim=4)
        if activation not in (None, "relu"):
            raise ValueError(f"{op}: fused activation must be None or 'relu', got {activation!r}")
        g = conv_geometry(op, x.shape, w.shape, stride, padding)
        if bias is not None:
            bias = self._dev_in(op, "bias", bias, shape=(g.K,))
        out = self._dev_out(op, "out", out, g.y_shape, x=x, w=w, bias=bias)
        flags = (np.int32(bias is not None), np.int32(activation == "relu"))
        self._conv_launch("fwd", g, lambda plan, table: (
            x, w, w if bias is None else bias, table, out, *g.args(), *flags))
        return out

    def conv2d_bwd_data(self, dy: Array, w: Array, x_shape: Sequence[int], stride: Pair,
                        padding: Pair, *, relu_mask: Array | None = None, out: Array | None = None) -> Array:
        op = "conv2d_bwd_data"
        w = self._dev_in(op, "w", w, ndim=4)
        g = conv_geometry(op, x_shape, w.shape, stride, padding, x_name="x_shape")
        dy = self._dev_in(op, "dy", dy, shape=g.y_shape)
        if relu_mask is not None:
            relu_mask = self._dev_in(op, "relu_mask", relu_mask, shape=g.y_shape)
        out = self._dev_out(op, "out", out, g.x_shape, dy=dy, w=w, relu_mask=relu_mask)
        flags = np.int32(CONV_RELU_MASK if relu_mask is not None else 0)
        self._conv_launch("bwd_data", g, lambda plan, table: (
            dy, dy if relu_mask is None else relu_mask, w, table, out, *g.args(), flags))
        return out

    def conv2d_bwd_weight(self, x: Array, dy: Array, w_shape: Sequence[int], stride: Pair,
                          padding: Pair, *, relu_mask: Array | None = None, db: Array | None = None,
                          out: Array | None = None) -> Array:
        op = "conv2d_bwd_weight"
        x = self._dev_in(op, "x", x, ndim=4)
        g = conv_geometry(op, x.shape, w_shape, stride, padding, w_name="w_shape")
        dy = self._dev_in(op, "dy", dy, shape=g.y_shape)
        if relu_mask is not None:
            relu_mask = self._dev_in(op, "relu_mask", relu_mask, shape=g.y_shape)
        if db is not None:
            db = self._dev_out(op, "db", db, (g.K,), x=x, dy=dy, relu_mask=relu_mask)
        out = self._dev_out(op, "out", out, g.w_shape, x=x, dy=dy, relu_mask=relu_mask, db=db)
        flags = (CONV_RELU_MASK if relu_mask is not None else 0) | (CONV_BIAS_GRAD if db is not None else 0)

        def args(plan: ConvPlan, table: Any) -> tuple:
            if plan.splits > 1:  # one launch: the last block of each tile adds the slices
                work = self._scratch("conv2d_bwd_weight", plan.workspace_elems + plan.splits * g.K)
                tickets = self._tickets(plan.tiles)
            else:
                work, tickets = out, self._tickets(1)
            return (x, dy, dy if relu_mask is None else relu_mask, out, out if db is None else db, work, tickets,
                    *g.args(), np.int32(plan.chunk), np.int32(flags))

        self._conv_launch("bwd_weight", g, args)
        return out

    # ------------------------------------------------------------------ pooling
    def maxpool2d_fwd(self, x: Array, kernel: Pair, stride: Pair, padding: Pair, *,
                      out: Array | None = None, argmax: Array | None = None) -> tuple[Array, Array]:
        op = "maxpool2d_fwd"
        x = self._dev_in(op, "x", x, ndim=4)
        g = pool_geometry(op, x.shape, kernel, stride, padding)
        out = self._dev_out(op, "out", out, g.y_shape, x=x)
        argmax = self._dev_out(op, "argmax", argmax, g.y_shape, np.int32, x=x, y=out)
        self._launch("pool", "maxpool2d_fwd", elementwise_grid(out.size), BLOCK, (x, out, argmax, *g.args()))
        return out, argmax

    def maxpool2d_bwd(self, dy: Array, argmax: Array, x_shape: Sequence[int], kernel: Pair,
                      stride: Pair, padding: Pair, *, out: Array | None = None) -> Array:
        op = "maxpool2d_bwd"
        g = pool_geometry(op, x_shape, kernel, stride, padding)
        dy = self._dev_in(op, "dy", dy, shape=g.y_shape)
        argmax = self._dev_in(op, "argmax", argmax, shape=g.y_shape, dtype=np.int32)
        out = self._dev_out(op, "out", out, g.x_shape, dy=dy, argmax=argmax)
        self._launch("pool", "maxpool2d_bwd", elementwise_grid(out.size), BLOCK, (dy, argmax, out, *g.args()))
        return out

    def avgpool2d_fwd(self, x: Array, kernel: Pair, stride: Pair, padding: Pair, *,
                      out: Array | None = None) -> Array:
        op = "avgpool2d_fwd"
        x = self._dev_in(op, "x", x, ndim=4)
        g = pool_geometry(op, x.shape, kernel, stride, padding)
        out = self._dev_out(op, "out", out, g.y_shape, x=x)
        self._launch("pool", "avgpool2d_fwd", elementwise_grid(out.size), BLOCK, (x, out, *g.args()))
        return out

    def avgpool2d_bwd(self, dy: Array, x_shape: Sequence[int], kernel: Pair, stride: Pair,
                      padding: Pair, *, out: Array | None = None) -> Array:
        op = "avgpool2d_bwd"
        g = pool_geometry(op, x_shape, kernel, stride, padding)
        dy = self._dev_in(op, "dy", dy, shape=g.y_shape)
        out = self._dev_out(op, "out", out, g.x_shape, dy=dy)
        self._launch("pool", "avgpool2d_bwd", elementwise_grid(out.size), BLOCK, (dy, out, *g.args()))
        return out
