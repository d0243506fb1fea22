"""The pure-Python half of gpuml.backend.cuda.conv: geometry checks, the per-shape tile / split plans
and the index tables. No GPU needed: these decide which output elements the CUDA kernels write, so a grid that
misses a tile or a split that skips a reduction step would be a silent wrong answer there."""

from __future__ import annotations

import numpy as np
import pytest

from gpuml.backend.cuda import common as cuda_common
from gpuml.backend.cuda import conv as cc
from gpuml.backend.cuda import launch
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


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("op", cc.CONV_OPS)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_plans_cover_every_output_exactly(case: tuple, op: str, precision: str) -> None:
    g = _geom(case)
    plan = cc.conv_plan(op, g, precision)
    M, N, L = cc.conv_gemm_dims(op, g)
    tile = plan.kernel.rsplit("_", 1)[1]
    assert plan.kernel == f"conv2d_{op}_{precision}_{tile}"
    t = launch.gemm_tiles("CONV")[tile]
    assert plan.block == (32 * t["WARPS_M"] * t["WARPS_N"], 1, 1)
    assert plan.grid[0] * t["BM"] >= M > (plan.grid[0] - 1) * t["BM"]  # every row, no empty block row
    assert plan.grid[1] * t["BN"] >= N > (plan.grid[1] - 1) * t["BN"]
    assert plan.tiles == plan.grid[0] * plan.grid[1] and plan.grid[2] == plan.splits >= 1
    # splits [z*chunk, (z+1)*chunk) tile [0, L): none empty, none missing
    assert plan.chunk % t["BK"] == 0
    assert plan.splits * plan.chunk >= L > (plan.splits - 1) * plan.chunk
    if op != "bwd_weight":
        assert plan.splits == 1
    if plan.splits > 1:
        assert plan.chunk >= cc.WGRAD_MIN_STEPS
        assert plan.workspace_elems == plan.splits * g.K * g.C * g.R * g.S
    else:
        assert plan.workspace_elems == 0
    assert plan.splits <= cc.MAX_GRID_YZ and plan.workspace_elems <= cc.INDEX_LIMIT


def test_bwd_weight_plan_gives_small_layers_enough_blocks() -> None:
    # the seed CNN's layers have one or a few output tiles; the split must fill an H100 (132 SMs)
    for case in CONV_CASES[:3]:
        plan = cc.conv_bwd_weight_plan(_geom(case))
        assert plan.grid[0] * plan.grid[1] * plan.grid[2] >= 264


def test_bwd_weight_plan_does_not_depend_on_the_device() -> None:
    # the split fixes the summation order, so it must be a function of the shape alone
    g = _geom(CONV_CASES[1])
    assert cc.conv_bwd_weight_plan(g) == cc.conv_bwd_weight_plan(g)
    assert cc.conv_bwd_weight_plan(g).splits == 29  # 18 tiles of 32 x 32 (64 filters x 288 taps)


# Issue 13 item 2, the shapes that wasted the GPU with one tile for every shape (all failed with
# the fixed 128 x 64 / 64 x 64 tiles): the CNN's conv2 at batch 32 launched 31 CTAs on 132 SMs,
# conv1's weight gradient (32 filters x 9 taps) filled 7% of a 64 x 64 tile, bwd_data with 32
# channels used a 64-wide N tile.
SEED_B32 = [((32, 1, 28, 28), (32, 1, 3, 3), (1, 1), (0, 0)), ((32, 32, 13, 13), (64, 32, 3, 3), (1, 1), (0, 0))]


def test_conv2_at_batch_32_fills_132_sms() -> None:
    plan = cc.conv_plan("fwd", _geom(SEED_B32[1]))
    assert plan.tiles >= 132 and plan.kernel == "conv2d_fwd_fp32_small"
    for op in cc.CONV_OPS:  # its backward too (dW: 18 tiles x 15 slices; 126 CTAs with 512-step slices)
        plan = cc.conv_plan(op, _geom(SEED_B32[1]))
        assert plan.tiles * plan.splits >= 132, (op, plan)


def test_conv1_weight_gradient_takes_a_32x32_tile() -> None:
    plan = cc.conv_plan("bwd_weight", _geom(SEED_B32[0]))
    tile = launch.gemm_tiles("CONV")[plan.kernel.rsplit("_", 1)[1]]
    assert (tile["BM"], tile["BN"]) == (32, 32) and plan.tiles == 1
    # the 21632-step N*P*Q reduction is split as far as WGRAD_MIN_STEPS allows: 80 slices of 272
    assert plan.splits == 80 and plan.chunk == 272


@pytest.mark.parametrize("case", SEED_B32 + CONV_CASES)
def test_conv_tiles_are_no_wider_than_the_channels_need(case: tuple) -> None:
    g = _geom(case)
    for op in cc.CONV_OPS:
        M, N, _ = cc.conv_gemm_dims(op, g)
        tile = launch.gemm_tiles("CONV")[cc.conv_plan(op, g).kernel.rsplit("_", 1)[1]]
        assert tile["BN"] <= max(32, -(-N // 32) * 32)
    assert launch.gemm_tiles("CONV")[cc.conv_plan("bwd_data", _geom(SEED_B32[1])).kernel.rsplit("_", 1)[1]]["BN"] == 32


def test_conv_plan_picks_the_large_tile_for_a_resnet_layer() -> None:
    g = _geom(((64, 64, 56, 56), (64, 64, 3, 3), (1, 1), (1, 1)))
    assert cc.conv_plan("fwd", g).kernel == "conv2d_fwd_fp32_large"
    assert cc.conv_plan("bwd_data", g, "bf16").kernel == "conv2d_bwd_data_bf16_large"


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_tables_hold_each_reduction_index_decoded(case: tuple) -> None:
    """kernels/conv_gather.cuh reads these instead of dividing per element: check them against the
    plain decode of kk = (c | k, r, s)."""
    g = _geom(case)
    fwd = cc.conv_table("fwd", g).reshape(-1, 2)
    c, r, s = np.unravel_index(np.arange(g.C * g.R * g.S), (g.C, g.R, g.S))
    np.testing.assert_array_equal(fwd[:, 0], c * g.H * g.W + r * g.W + s)
    np.testing.assert_array_equal(fwd[:, 1] >> 16, r)
    np.testing.assert_array_equal(fwd[:, 1] & 0xFFFF, s)
    bwd = cc.conv_table("bwd_data", g).reshape(-1, 4)
    k, r, s = np.unravel_index(np.arange(g.K * g.R * g.S), (g.K, g.R, g.S))
    np.testing.assert_array_equal(bwd[:, 0], k * g.P * g.Q)
    np.testing.assert_array_equal(bwd[:, 1] & 0xFFFF, r // g.sh)
    np.testing.assert_array_equal(bwd[:, 1] >> 16, r % g.sh)
    np.testing.assert_array_equal(bwd[:, 2] & 0xFFFF, s // g.sw)
    np.testing.assert_array_equal(bwd[:, 2] >> 16, s % g.sw)
    np.testing.assert_array_equal(bwd[:, 3], k * g.C * g.R * g.S + r * g.S + s)
    assert fwd.dtype == np.int32 and bwd.dtype == np.int32


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
        (((1, 1, 40000, 3), (1, 1, 32768, 1), (1, 1), (0, 0)), "kernel side past 32767"),
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
