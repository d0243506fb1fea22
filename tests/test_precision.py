"""precision: fp32 | tf32 | bf16 on the CPU reference (issue 13): the config key and fit kwarg,
and the operand rounding that makes the CPU the reference of the tensor-core kernels
(gpuml/backend/cpu/precision.py; the kernels' side is tests/test_cuda_tensor_cores.py)."""

from __future__ import annotations

import numpy as np
import pytest

import gpuml
from gpuml import layers
from gpuml.backend.cpu import CpuBackend
from gpuml.backend.cpu.precision import round_operand
from gpuml.errors import ConfigError
from gpuml.train.config import validate
from tests.test_finetune import synthetic


def test_rounding_is_cvt_rna_for_tf32_and_nearest_even_for_bf16() -> None:
    """tf32 ties go away from zero (cvt.rna), bf16 ties to even; Inf/NaN kept, overflow to Inf."""
    one = np.float32(1.0)
    tie_tf32 = np.float32(1.0 + 2.0**-11)  # exactly halfway between 1 and 1 + 2^-10
    x = np.array([tie_tf32, -tie_tf32, 1.0 + 2.0**-12, np.inf, np.nan, np.finfo(np.float32).max], dtype=np.float32)
    r = round_operand(x, "tf32")
    assert r[0] == one + np.float32(2.0**-10) and r[1] == -(one + np.float32(2.0**-10)) and r[2] == one
    assert r[3] == np.inf and np.isnan(r[4]) and r[5] == np.inf
    b = round_operand(np.array([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -np.inf, np.nan], dtype=np.float32), "bf16")
    assert b[0] == one and b[1] == np.float32(1.0 + 2.0**-6) and b[2] == -np.inf and np.isnan(b[3])
    assert x[0] == tie_tf32  # the operand itself (the FP32 master copy) is left alone


@pytest.mark.parametrize("precision,bits", [("tf32", 10), ("bf16", 7)])
def test_cpu_matmul_rounds_operands_only(precision: str, bits: int) -> None:
    gen = np.random.default_rng(0)
    a, b = gen.standard_normal((5, 40)), gen.standard_normal((40, 3))
    cpu = CpuBackend(dtype="float64")
    exact = cpu.matmul(a, b)
    cpu.set_precision(precision)
    got = cpu.matmul(a, b)
    want = round_operand(a, precision) @ round_operand(b, precision)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    err = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert 2.0**-(bits + 8) < err < 2.0**-bits
    sums = np.empty(3)
    cpu.matmul(a, b, col_sums=sums)  # the bias gradient stays exact (FP32 on the GPU)
    np.testing.assert_allclose(sums, b.sum(axis=0), rtol=1e-12)


@pytest.mark.parametrize("precision,bits", [("tf32", 10), ("bf16", 7)])
@pytest.mark.parametrize("case", [((2, 3, 9, 8), (4, 3, 3, 3), (2, 1), (1, 0)),   # few channels: NCHW paths
                                  ((2, 9, 7, 7), (5, 9, 3, 3), (1, 1), (1, 1))])  # channels-last paths
def test_cpu_conv_rounds_the_operands_the_kernels_round(case: tuple, precision: str, bits: int) -> None:
    """The conv tensor-core kernels (kernels/conv2d_<precision>.cu) round x and w forward, dz (dy
    through the ReLU mask) and w for dx, x and dz for dw; the bias gradient is the sum of the
    unrounded dz. The CPU reference in that precision is the exact conv of those rounded operands."""
    x_shape, w_shape, stride, padding = case
    gen = np.random.default_rng(1)
    exact, cpu = CpuBackend(dtype="float64"), CpuBackend(dtype="float64")
    cpu.set_precision(precision)
    x, w, b = gen.standard_normal(x_shape), gen.standard_normal(w_shape), gen.standard_normal(w_shape[0])
    y = exact.conv2d_fwd(x, w, None, stride, padding)
    dy, mask = gen.standard_normal(y.shape), gen.standard_normal(y.shape)
    dz = np.where(mask > 0, dy, 0.0)
    rx, rw, rdz = (round_operand(a, precision) for a in (x, w, dz))

    got = cpu.conv2d_fwd(x, w, b, stride, padding, activation="relu")
    np.testing.assert_allclose(got, exact.conv2d_fwd(rx, rw, b, stride, padding, activation="relu"), rtol=1e-12,
                               atol=1e-12)
    got = cpu.conv2d_bwd_data(dy, w, x_shape, stride, padding, relu_mask=mask)
    np.testing.assert_allclose(got, exact.conv2d_bwd_data(rdz, rw, x_shape, stride, padding), rtol=1e-12, atol=1e-12)
    db = np.empty(w_shape[0])
    got = cpu.conv2d_bwd_weight(x, dy, w_shape, stride, padding, relu_mask=mask, db=db)
    want = exact.conv2d_bwd_weight(rx, rdz, w_shape, stride, padding)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, dz.sum(axis=(0, 2, 3)), rtol=1e-12)  # unrounded
    err = np.linalg.norm(got - exact.conv2d_bwd_weight(x, dz, w_shape, stride, padding)) / np.linalg.norm(want)
    assert 2.0 ** -(bits + 8) < err < 2.0**-bits


def test_precision_config_key() -> None:
    assert validate({"model": {"layers": [{"type": "flatten"}]}}, "t.yaml")["precision"] == "fp32"
    with pytest.raises(ConfigError, match="precision") as exc:
        validate({"precision": "fp16", "model": {"layers": [{"type": "flatten"}]}}, "t.yaml")
    assert "\n" not in str(exc.value)


def test_fit_with_precision_bf16_trains_on_the_cpu(capsys: pytest.CaptureFixture, tmp_path) -> None:
    x, y = synthetic(64)
    model = gpuml.Sequential([layers.Flatten(), layers.Dense(16, activation="relu"), layers.Dense(4)])
    model.compile(optimizer="adam")
    history = model.fit(x, y.astype(np.uint8), epochs=1, batch_size=32, device="cpu", precision="bf16", verbose=2,
                        run_dir=tmp_path / "run")
    assert np.isfinite(history.history["loss"]).all()
    loaded = gpuml.load_model(tmp_path / "run", device="cpu")  # predicts as the run trained
    assert loaded.backend.precision == "bf16"
    captured = capsys.readouterr()
    assert "precision: bf16" in captured.err + captured.out  # the first log line says so
    with pytest.raises(ConfigError, match="precision"):
        model.fit(x, y.astype(np.uint8), epochs=1, device="cpu", precision="half", verbose=0)


def test_tensor_core_tile_comes_from_the_shared_table() -> None:
    """launch.py reads kernels/gemm_tiles.h: the large tile when its grid fills a wave, else small."""
    from gpuml.backend.cuda import launch

    tiles = launch.tc_tiles()
    assert list(tiles) == ["large", "small"] and tiles["large"]["BM"] == 128
    big = launch.gemm_tc_plan(4096, 4096, 4096, False, False, "tf32")
    assert big.kernel == "gemm_tc_nn_tf32_large" and big.grid == (32, 32, 1) and big.block == (256, 1, 1)
    small = launch.gemm_tc_plan(32, 1024, 784, False, True, "bf16")  # batch-32 Dense: 16 tiles, split K
    assert small.kernel == "gemm_tc_nt_bf16_small" and small.grid == (16, 1, 6) and small.block == (128, 1, 1)
    assert small.k_per_split % tiles["small"]["BK"] == 0 and small.splits * small.k_per_split >= 784
    assert small.workspace_elems == 6 * 32 * 1024 and small.tiles == 16
    with pytest.raises(ValueError, match="precision"):
        launch.gemm_tc_plan(8, 8, 8, False, False, "fp32")
