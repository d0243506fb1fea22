"""`gpuml bench kernels` rows for the tensor-core precisions (gpuml/benchmark/precision_cases.py).
They run only on a GPU of sm_80 or newer; what a machine without one can check is here: which
cases a sweep holds, their families, ops and bounds, the --families names, and that the FP32
GEMM anchor asks CuPy for FP32 (not TF32) while the TF32 anchor switches for its own call only.
The conv rows' anchors, bounds and fwd+bwd summary: tests/test_bench_conv_precision.py."""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np
import pytest

from gpuml.benchmark import kernels, precision_cases
from gpuml.benchmark.kernel_cases import full_sweep, quick_sweep
from gpuml.cli import main


def test_cpu_sweeps_have_no_tensor_core_rows() -> None:
    families = {c.family for c in full_sweep("cpu") + quick_sweep("cpu")}
    assert "matmul" in families and not families & set(precision_cases.PRECISION_FAMILIES.values())


def test_gpu_sweep_has_tf32_and_bf16_rows_next_to_cublas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_cases, "_has_tensor_cores", lambda: True)
    quick = precision_cases.precision_sweep("cuda", quick=True)
    ops = {(c.family, c.op, c.shape) for c in quick}
    for p in ("tf32", "bf16"):
        assert (f"matmul_{p}", f"gemm_square_{p}", "4096x4096x4096") in ops
        assert {o for f, o, _ in ops if f == f"matmul_{p}"} >= {f"dense_fwd_{p}", f"dense_dx_{p}", f"dense_dw_{p}"}
    assert all(c.flops == 2 * 4096**3 for c in quick if c.shape == "4096x4096x4096")
    assert {c.tolerance for c in quick} == {precision_cases.TOLERANCE["tf32"], precision_cases.TOLERANCE["bf16"]}
    assert all(c.tolerance == precision_cases.TOLERANCE[c.op.rsplit("_", 1)[1]] for c in quick)
    full = precision_cases.precision_sweep("cuda", quick=False)
    assert {c.shape for c in full} >= {"1024x1024x1024", "8192x8192x8192"} and len(full) > len(quick)
    monkeypatch.setattr(precision_cases, "_has_tensor_cores", lambda: False)  # a GPU before sm_80
    assert precision_cases.precision_sweep("cuda", quick=True) == []


def test_families_option_names_the_tensor_core_families(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "kernels", "--device", "cpu", "--families", "matmul_tf33"]) == 2
    assert "matmul_bf16, matmul_tf32" in capsys.readouterr().err
    assert main(["bench", "kernels", "--device", "cpu", "--families", "conv2d_tf33"]) == 2
    assert "conv2d, conv2d_bf16, conv2d_tf32" in capsys.readouterr().err


def _conv_rows(cases: list) -> set[tuple[str, str, str]]:
    return {(c.family, c.op, c.shape) for c in cases if c.family.startswith("conv2d")}


def test_gpu_sweep_has_conv_tf32_and_bf16_rows_for_the_seed_and_resnet_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """fwd, bwd_data and bwd_weight per precision: the ResNet layer in the quick sweep, the seed
    CNN's layers at batch 32 and 256 too in the full one, at the FP32 rows' shapes and bounds."""
    monkeypatch.setattr(precision_cases, "_has_tensor_cores", lambda: True)
    resnet = "ResNet-like: N=64 64->64 3x3 pad 1 on 56x56"
    seed = {f"seed CNN conv1: N={n} 1->32 3x3 pad 0 on 28x28" for n in (32, 256)}
    seed |= {f"seed CNN conv2: N={n} 32->64 3x3 pad 0 on 13x13" for n in (32, 256)}
    ops = ("conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight")
    quick = precision_cases.precision_sweep("cuda", quick=True)
    full = precision_cases.precision_sweep("cuda", quick=False)
    for p in ("tf32", "bf16"):
        assert _conv_rows(quick) >= {(f"conv2d_{p}", f"{op}_{p}", resnet) for op in ops}
        assert not {shape for _, _, shape in _conv_rows(quick)} & seed  # quick: the ResNet layer only
        assert _conv_rows(full) >= {(f"conv2d_{p}", f"{op}_{p}", s) for op in ops for s in seed | {resnet}}
        conv = [c for c in full if c.family == f"conv2d_{p}"]
        assert len(conv) == 15 and {c.tolerance for c in conv} == {precision_cases.TOLERANCE[p]}
    fp32 = {(c.shape, c.op): c for c in full_sweep("cuda") if c.family == "conv2d"}  # same shapes, same work
    for c in full:
        if c.family.startswith("conv2d"):
            twin = fp32[c.shape, c.op.rsplit("_", 1)[0]]
            assert (c.flops, c.bytes) == (twin.flops, twin.bytes) and twin.tolerance == 1e-4
    monkeypatch.setattr(precision_cases, "_has_tensor_cores", lambda: False)  # a GPU before sm_80
    assert not _conv_rows(precision_cases.precision_sweep("cuda", quick=False))


def test_cpu_sweeps_have_no_tensor_core_conv_rows() -> None:
    families = {c.family for c in full_sweep("cpu") + quick_sweep("cpu")}
    assert "conv2d" in families and not families & {"conv2d_tf32", "conv2d_bf16"}


def test_fp32_gemm_rows_at_the_issue_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13's FP32 targets: 4096^3, 1024^3, 512^3 and the seed models' Dense products (MLP
    784-1024-1024-10, CNN 1600-64-10) at batch 32 and 256, in the FP32 family, FP32 bound."""
    monkeypatch.setattr(precision_cases, "_has_tensor_cores", lambda: True)
    rows = {(c.op, c.shape.split(" (")[0]): c for c in full_sweep("cuda") if c.family == "matmul"}
    for s in (512, 1024, 4096):
        assert rows["gemm_square", f"{s}x{s}x{s}"].flops == 2 * s**3
    for batch in (32, 256):
        for fan_in, fan_out in ((784, 1024), (1024, 1024), (1024, 10), (1600, 64), (64, 10)):
            for op in ("dense_fwd", "dense_dx", "dense_dw"):
                assert rows[op, f"B={batch} {fan_in}->{fan_out}"].flops == 2 * batch * fan_in * fan_out
    assert {c.tolerance for c in rows.values()} == {1e-4}


class _FakeLinalg(types.ModuleType):
    """cupy._core._routines_linalg as far as the bench uses it: CuPy's compute-type numbering
    (cupy/_core/_routines_linalg.pxd: 4 = COMPUTE_TYPE_FP32, 7 = COMPUTE_TYPE_TF32) and the
    per-dtype setting, starting at TF32 as if an earlier caller had chosen it."""

    NAMES = {1: "COMPUTE_TYPE_DEFAULT", 4: "COMPUTE_TYPE_FP32", 7: "COMPUTE_TYPE_TF32"}

    def __init__(self) -> None:
        super().__init__("cupy._core._routines_linalg")
        self.types = {np.dtype(np.float32): 7}

    def compute_type_to_str(self, t: int) -> str:
        return self.NAMES[t]

    def set_compute_type(self, dtype: Any, t: int) -> None:
        self.types[np.dtype(dtype)] = t

    def get_compute_type(self, dtype: Any) -> int:
        return self.types[np.dtype(dtype)]


@pytest.fixture
def fake_linalg(monkeypatch: pytest.MonkeyPatch) -> _FakeLinalg:
    """A fake cupy with that module (the CUDA emulator's cupy does not model cuBLAS compute types,
    and this machine has no real one): what is checked is what gpuml asks CuPy for."""
    linalg, core, cupy = _FakeLinalg(), types.ModuleType("cupy._core"), types.ModuleType("cupy")
    core._routines_linalg, cupy._core = linalg, core
    for name, mod in (("cupy", cupy), ("cupy._core", core), ("cupy._core._routines_linalg", linalg)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setenv("CUPY_TF32", "1")
    return linalg


def test_fp32_anchor_cupy_computes_in_fp32(fake_linalg: _FakeLinalg) -> None:
    import os

    kernels.import_cupy_fp32()
    assert os.environ["CUPY_TF32"] == "0"
    assert fake_linalg.get_compute_type(np.float32) == 4  # was TF32: set back explicitly


def test_tf32_anchor_switches_cublas_to_tf32_for_its_call_only(fake_linalg: _FakeLinalg) -> None:
    """During the anchor's matmul the float32 compute type is TF32; after it, FP32 again, also
    when the call raises, so the FP32 rows timed later keep TF32 off."""
    kernels.import_cupy_fp32()
    seen: list[int] = []

    def matmul(a: Any, b: Any, out: Any) -> None:
        seen.append(fake_linalg.get_compute_type(np.float32))
        if len(seen) == 2:
            raise RuntimeError("cuBLAS failed")
        np.matmul(a, b, out=out)

    env = types.SimpleNamespace(xp=types.SimpleNamespace(empty=np.empty, float32=np.float32, matmul=matmul))
    a, b = np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)
    anchor = precision_cases._cublas_tf32(env, a, b, (2, 4))
    assert anchor is not None and anchor.name == "cuBLAS TF32 (cupy.matmul)"
    anchor.run()
    assert seen == [7] and fake_linalg.get_compute_type(np.float32) == 4
    np.testing.assert_array_equal(anchor.result(), np.full((2, 4), 3.0))
    with pytest.raises(RuntimeError, match="cuBLAS failed"):
        anchor.run()
    assert seen == [7, 7] and fake_linalg.get_compute_type(np.float32) == 4
