"""Launch plans of the CUDA backend's MLP kernels (gemm, softmax_xent, elementwise, optim).

Pure Python, no CuPy: every grid, block and split decision is a function of the shapes only, so
it is unit-tested on any machine and the backend caches it per shape. Decisions never depend on
the GPU's SM count: the GEMM split-K factor and the number of reduction partials change the
summation order, and a fixed rule gives the same bits on every GPU.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

from gpuml.errors import ShapeError
from gpuml.paths import kernel_dir

Grid = tuple[int, int, int]

THREADS = 256
#: 1-D grid-stride kernels never launch more blocks than this (enough to fill any current GPU)
MAX_BLOCKS = 4096
#: deterministic two-pass reductions use at most this many per-block partials
MAX_PARTIALS = 1024
#: the kernels index rows, columns and grid coordinates with 32-bit ints
INT32_MAX = 2**31 - 1
MAX_GRID_YZ = 65535

# GEMM tiles: kernels/gemm_tiles.h (gemm_tiles()); split-K of any tile whose grid is small:
#: a grid is split along K until it has about this many blocks ...
SPLITK_TARGET_BLOCKS = 256
#: ... giving each slice at least this much of K ...
SPLITK_MIN_K = 128
#: ... and using at most this many slices
SPLITK_MAX = 16

#: softmax_xent uses a warp per row below this many classes, a block per row from it
XENT_WARP_MAX_K = 1024
XENT_ROWS_PER_BLOCK = 8

EPILOGUE_BIAS, EPILOGUE_RELU, EPILOGUE_ACCUMULATE, EPILOGUE_RELU_MASK, EPILOGUE_COL_SUMS = 1, 2, 4, 8, 16


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def grid_1d(n: int, cap: int = MAX_BLOCKS) -> Grid:
    """Blocks of THREADS for a grid-stride loop over n items (at least one block)."""
    return (max(1, min(ceil_div(n, THREADS), cap)), 1, 1)


@dataclass(frozen=True)
class GemmPlan:
    kernel: str  # entry point in kernels/gemm.cu or kernels/gemm_tc_<precision>.cu
    grid: Grid
    block: Grid
    splits: int
    k_per_split: int
    workspace_elems: int  # splits * M * N when splits > 1, else 0 (+ splits * N for column sums)
    tiles: int  # output tiles of the grid: the split-K ticket counters (gemm_core.cuh)


def split_k(blocks: int, K: int, k_step: int) -> tuple[int, int]:
    """(splits, k_per_split) for a grid of `blocks` output tiles: split K until about
    SPLITK_TARGET_BLOCKS blocks, each slice at least SPLITK_MIN_K deep and a multiple of k_step,
    at most SPLITK_MAX slices; (1, >= K) when the grid is big enough or K too short."""
    splits = 1
    if blocks < SPLITK_TARGET_BLOCKS and K >= 2 * SPLITK_MIN_K:
        splits = min(ceil_div(SPLITK_TARGET_BLOCKS, blocks), K // SPLITK_MIN_K, SPLITK_MAX)
    k_per_split = ceil_div(ceil_div(max(K, 1), splits), k_step) * k_step
    return ceil_div(max(K, 1), k_per_split), k_per_split  # rounding the slice up can leave one empty


#: the model precisions with a tensor-core GEMM (kernels/gemm_tc_<precision>.cu); fp32 is gemm.cu
TENSOR_CORE_PRECISIONS = ("tf32", "bf16")
#: tile-table kind of each precision (the GEMM_<KIND>_ rows of kernels/gemm_tiles.h)
TILE_KIND = {"fp32": "F32", "tf32": "TC", "bf16": "TC"}
_DEFINE_RE = re.compile(r"^#define\s+GEMM_(F32|TC|CONV)_([A-Z0-9]+)_([A-Z_]+)\s+(\d+)\s*$", re.M)
_TILE_FIELDS = {"BM", "BN", "BK", "WARPS_M", "WARPS_N", "STAGES", "MIN_BLOCKS"}


@functools.cache
def gemm_tiles(kind: str) -> dict[str, dict[str, int]]:
    """The tile table of one kind ("F32", "TC" or "CONV"), read from kernels/gemm_tiles.h (the kernels
    include the same file, so a grid cannot disagree with its kernel's tile): {"large": {"BM": 128,
    ...}, ...}, in file order (largest first)."""
    tiles: dict[str, dict[str, int]] = {}
    for k, name, field, value in _DEFINE_RE.findall((kernel_dir() / "gemm_tiles.h").read_text()):
        if k == kind:
            tiles.setdefault(name.lower(), {})[field] = int(value)
    for name, fields in tiles.items():
        if fields.keys() != _TILE_FIELDS:
            raise RuntimeError(
                f"kernels/gemm_tiles.h: tile {kind} {name} has {sorted(fields)}, needs {sorted(_TILE_FIELDS)}")
    if not tiles:
        raise RuntimeError(f"kernels/gemm_tiles.h defines no {kind} tile")
    return tiles


def tc_tiles() -> dict[str, dict[str, int]]:
    """The tensor-core rows of gemm_tiles.h (gemm_tiles("TC"))."""
    return gemm_tiles("TC")


def gemm_plan(M: int, N: int, K: int, trans_a: bool, trans_b: bool, precision: str = "fp32") -> GemmPlan:
    """The kernel for op(A) (M x K) @ op(B) (K x N) in `precision`: fp32 -> gemm_<ab>_fp32_<tile>
    (kernels/gemm.cu), tf32 / bf16 -> gemm_tc_<ab>_<precision>_<tile> (kernels/gemm_tc_<precision>.cu).
    The tile is the first row of the precision's kind in gemm_tiles.h whose grid has MIN_BLOCKS blocks
    (else the last), then K is split (split_k) while that grid is still small. Shapes only: no
    device property enters, so the bits are the same on every GPU."""
    if precision not in TILE_KIND:
        raise ValueError(f"gemm_plan: precision must be one of {tuple(TILE_KIND)}, got {precision!r}")
    for name, v in (("M", M), ("N", N), ("K", K)):
        if not 0 <= v <= INT32_MAX:
            raise ShapeError(f"matmul: {name} = {v} is past the kernels' 32-bit indexing")

    def grid_of(t: dict[str, int]) -> Grid:
        return (max(1, ceil_div(N, t["BN"])), max(1, ceil_div(M, t["BM"])), 1)

    rows = list(gemm_tiles(TILE_KIND[precision]).items())
    tile, t = next(((n, t) for n, t in rows if math.prod(grid_of(t)) >= t["MIN_BLOCKS"]), rows[-1])
    gx, gy, _ = grid_of(t)
    if gy > MAX_GRID_YZ:
        raise ShapeError(f"matmul: M = {M} rows are more than one launch covers")
    splits, k_per_split = split_k(gx * gy, K, t["BK"])
    ab = ("t" if trans_a else "n") + ("t" if trans_b else "n")
    kernel = f"gemm_{ab}_fp32_{tile}" if precision == "fp32" else f"gemm_tc_{ab}_{precision}_{tile}"
    threads = 32 * t["WARPS_M"] * t["WARPS_N"]
    return GemmPlan(kernel, (gx, gy, splits), (threads, 1, 1), splits, k_per_split,
                    splits * M * N if splits > 1 else 0, gx * gy)


def gemm_tc_plan(M: int, N: int, K: int, trans_a: bool, trans_b: bool, precision: str) -> GemmPlan:
    """gemm_plan for a tensor-core precision (tf32 or bf16); ValueError for any other."""
    if precision not in TENSOR_CORE_PRECISIONS:
        raise ValueError(f"gemm_tc_plan: precision must be one of {TENSOR_CORE_PRECISIONS}, got {precision!r}")
    return gemm_plan(M, N, K, trans_a, trans_b, precision)


@dataclass(frozen=True)
class XentPlan:
    kernel: str
    grid: Grid
    vec4: bool  # only meaningful for the block kernel


def softmax_xent_plan(B: int, K: int, aligned16: bool) -> XentPlan:
    if B < 1 or K < 1:
        raise ShapeError(f"softmax_xent: logits ({B}, {K}) must have at least one row and class")
    if B > INT32_MAX or K > INT32_MAX:
        raise ShapeError(f"softmax_xent: logits ({B}, {K}) are past the kernels' 32-bit indexing")
    if K < XENT_WARP_MAX_K:
        return XentPlan("softmax_xent_fwd_bwd_warp", (ceil_div(B, XENT_ROWS_PER_BLOCK), 1, 1), False)
    return XentPlan("softmax_xent_fwd_bwd_block", (B, 1, 1), aligned16 and K % 4 == 0)


def count_correct_grid(B: int) -> Grid:
    return grid_1d(B * 32, cap=MAX_PARTIALS)  # a warp per row, 8 rows per block


def partials_grid(n: int) -> Grid:
    """Grid of a deterministic two-pass reduction over n items (fixed for a given n)."""
    return grid_1d(n, cap=MAX_PARTIALS)


def gather_grid(B: int, D: int) -> Grid:
    """gather_batch: x covers the D pixels of a row, y the B rows (grid-strided past 65535)."""
    return (max(1, min(ceil_div(D, THREADS), 64)), max(1, min(B, MAX_GRID_YZ)), 1)


def bias_grad_nc_grid(C: int) -> Grid:
    return (ceil_div(C, 32), 1, 1)
