"""The pure-Python half of gpuml.backend.cuda.conv: geometry checks, grids and the bwd_weight split
plan. No GPU needed: these decide which output elements the CUDA kernels write, so a grid that
misses a tile or a split that skips a reduction step would be a silent wrong answer there."""

from __future__ import annotations

import numpy as np
import pytest

from gpuml.backend.cuda import common as cuda_common
from gpuml.backend.cuda import conv as cc
from gpuml.errors import ShapeError

# (x shape, w shape, stride, padding): the seed CNN's layers, a ResNet stage, and odd edge shapes
CONV_CASES = [
    ((256, 1, 28, 28), (32, 1, 3, 3), (1, 1), (0, 0)),
    ((256, 32, 13, 13), (64, 32, 3, 3), (1, 1), (0, 0)),
    ((64, 64, 56, 56), (64, 64, 3, 3), (1, 1), (1, 1)),
    ((1, 1, 1, 1), (1, 1, 1, 1), (1, 1), (0, 0)),
    ((3, 3, 7, 9), (5, 3, 5, 3), (2, 1), (2, 1)),
    ((1, 7, 5, 5), (130, 7, 1, 1), (2, 2), (0, 0)),
    ((5, 200, 3, 3), (3, 200, 3, 3), (1, 1), (2, 2)),
    ((2, 3, 300, 301), (1, 3, 5, 5), (1, 1), (2, 2)),
]


def _geom(case: tuple) -> cc.ConvGeometry:
    x, w, stride, padding = case
    return cc.conv_geometry("op", x, w, stride, padding)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_geometry_matches_floor_formula(case: tuple) -> None:
    (N, C, H, W), (K, _, R, S), (sh, sw), (ph, pw) = case
    g = _geom(case)
    assert g.y_shape == (N, K, (H + 2 * ph - R) // sh + 1, (W + 2 * pw - S) // sw + 1)
    assert g.x_shape == (N, C, H, W) and g.w_shape == (K, C, R, S)
    args = g.args()
    assert all(isinstance(a, np.int32) for a in args)
    assert [int(a) for a in args] == [N, C, H, W, K, R, S, g.P, g.Q, sh, sw, ph, pw]


@pytest.mark.parametrize("case", CONV_CASES)
def test_wide_grids_cover_every_output_exactly(case: tuple) -> None:
    g = _geom(case)
    bm, bn = cc.WIDE_TILE
    for grid, pixels, channels in (
        (cc.conv_fwd_grid(g), g.N * g.P * g.Q, g.K),
        (cc.conv_bwd_data_grid(g), g.N * g.H * g.W, g.C),
    ):
        assert grid[2] == 1
        assert grid[0] * bm >= pixels > (grid[0] - 1) * bm  # every pixel, no empty block column
        assert grid[1] * bn >= channels > (grid[1] - 1) * bn


@pytest.mark.parametrize("case", CONV_CASES)
def test_bwd_weight_plan_covers_the_reduction_once(case: tuple) -> None:
    g = _geom(case)
    plan = cc.conv_bwd_weight_plan(g)
    crs, steps = g.C * g.R * g.S, g.N * g.P * g.Q
    bm, bn = cc.WGRAD_TILE
    assert plan.grid[0] * bm >= crs > (plan.grid[0] - 1) * bm
    assert plan.grid[1] * bn >= g.K > (plan.grid[1] - 1) * bn
    assert plan.grid[2] == plan.splits >= 1
    # splits [z*chunk, (z+1)*chunk) tile [0, steps): none empty, none missing
    assert plan.chunk % cc.WGRAD_SLICE == 0
    assert plan.splits * plan.chunk >= steps > (plan.splits - 1) * plan.chunk
    if plan.splits > 1:
        assert plan.chunk >= cc.WGRAD_MIN_STEPS
        assert plan.workspace_elems == plan.splits * g.K * crs
        assert plan.tiles == plan.grid[0] * plan.grid[1]  # one split ticket per output tile
    else:
        assert plan.workspace_elems == 0
    assert plan.splits <= cc.MAX_GRID_YZ and plan.workspace_elems <= cc.INDEX_LIMIT


def test_bwd_weight_plan_gives_small_layers_enough_blocks() -> None:
    # the seed CNN's layers have one or five output tiles; the split must fill an H100 (132 SMs)
    for case in CONV_CASES[:3]:
        plan = cc.conv_bwd_weight_plan(_geom(case))
        assert plan.grid[0] * plan.grid[1] * plan.grid[2] >= 264


def test_bwd_weight_plan_does_not_depend_on_the_device() -> None:
    # the split fixes the summation order, so it must be a function of the shape alone
    g = _geom(CONV_CASES[1])
    assert cc.conv_bwd_weight_plan(g) == cc.conv_bwd_weight_plan(g)
    assert cc.conv_bwd_weight_plan(g).splits == 59


@pytest.mark.parametrize(
    "x, kernel, stride, padding",
    [((256, 32, 26, 26), (2, 2), (2, 2), (0, 0)), ((3, 2, 7, 9), (3, 2), (2, 1), (1, 1)),
     ((1, 1, 5, 5), (5, 5), (1, 1), (2, 2)), ((2, 1, 1, 1), (1, 1), (3, 3), (0, 0))],
)
def test_pool_geometry_and_grid(x: tuple, kernel: tuple, stride: tuple, padding: tuple) -> None:
    g = cc.pool_geometry("op", x, kernel, stride, padding)
    N, C, H, W = x
    assert g.y_shape == (N, C, (H + 2 * padding[0] - kernel[0]) // stride[0] + 1,
                         (W + 2 * padding[1] - kernel[1]) // stride[1] + 1)
    assert [int(a) for a in g.args()] == [N * C, H, W, g.P, g.Q, *kernel, *stride, *padding]
    for total in (int(np.prod(g.y_shape)), int(np.prod(x))):
        grid = cc.elementwise_grid(total)
        assert grid[0] * cc.THREADS >= total > (grid[0] - 1) * cc.THREADS


@pytest.mark.parametrize("total, blocks", [(1, 1), (255, 1), (256, 1), (257, 2), (1 << 20, 4096)])
def test_elementwise_grid_edges(total: int, blocks: int) -> None:
    assert cc.elementwise_grid(total) == (blocks, 1, 1)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (((2, 3, 5, 5), (4, 2, 3, 3), (1, 1), (0, 0)), "(2, 3, 5, 5) and w (4, 2, 3, 3) do not fit"),
        (((2, 3, 2, 2), (4, 3, 3, 3), (1, 1), (0, 0)), "smaller than the 3x3 kernel"),
        (((2, 3, 5, 5), (4, 3, 3), (1, 1), (0, 0)), "w must have 4 positive dims"),
        (((0, 3, 5, 5), (4, 3, 3, 3), (1, 1), (0, 0)), "x must have 4 positive dims"),
        (((2, 3, 5, 5), (4, 3, 3, 3), (0, 1), (0, 0)), "stride (0, 1) must be >= 1"),
        (((2, 3, 5, 5), (4, 3, 3, 3), (1, 1), (-1, 0)), "padding (-1, 0) must be >= 0"),
        (((2, 3, 5, 5), (4, 3, 3, 3), 1, (0, 0)), "stride must be an (h, w) pair"),
        (((1 << 16, 1 << 8, 1 << 4, 1 << 4), (1, 256, 1, 1), (1, 1), (0, 0)), "32-bit indexing"),
    ],
)
def test_conv_geometry_errors_are_one_line_naming_op_and_shapes(args: tuple, fragment: str) -> None:
    with pytest.raises(ShapeError) as info:
        cc.conv_geometry("conv2d_fwd", *args)
    msg = str(info.value)
    assert msg.startswith("conv2d_fwd: ") and fragment in msg and "\n" not in msg


@pytest.mark.parametrize(
    "args, fragment",
    [
        (((2, 3, 5, 5), (3, 3), (1, 1), (2, 1)), "more than half the kernel"),
        (((2, 3, 2, 2), (3, 3), (1, 1), (0, 0)), "smaller than the kernel"),
        (((2, 3, 5), (2, 2), (2, 2), (0, 0)), "x must have 4 positive dims"),
        (((2, 3, 5, 5), (0, 2), (2, 2), (0, 0)), "kernel (0, 2) must be >= 1"),
    ],
)
def test_pool_geometry_errors(args: tuple, fragment: str) -> None:
    with pytest.raises(ShapeError, match="^maxpool2d_fwd: ") as info:
        cc.pool_geometry("maxpool2d_fwd", *args)
    assert fragment in str(info.value)


def test_check_array_names_the_culprit() -> None:
    a = np.zeros((2, 3, 4, 4), np.float32)
    cuda_common.check_array("op", "x", a, np.float32, shape=(2, 3, 4, 4), ndim=4)
    with pytest.raises(ShapeError, match=r"^op: x \(2, 3, 4, 4\) has dtype float32, expected float64$"):
        cuda_common.check_array("op", "x", a, np.float64)
    with pytest.raises(ShapeError, match=r"^op: x has shape \(2, 3, 4, 4\), expected \(2, 3, 4, 5\)$"):
        cuda_common.check_array("op", "x", a, np.float32, shape=(2, 3, 4, 5))
    with pytest.raises(ShapeError, match=r"^op: x must be 3-D"):
        cuda_common.check_array("op", "x", a, np.float32, ndim=3)
    with pytest.raises(ShapeError, match="must be C-contiguous"):
        cuda_common.check_array("op", "x", a.transpose(0, 1, 3, 2)[..., :3], np.float32)
