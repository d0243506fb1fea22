"""`gpuml bench kernels` rows for the tensor-core precisions (gpuml/benchmark/precision_cases.py).
They run only on a GPU of sm_80 or newer; what a machine without one can check is here: which
cases a sweep holds, their families, ops and bounds, and the --families names."""

from __future__ import annotations

import pytest

from gpuml.benchmark import precision_cases
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
    full = precision_cases.precision_sweep("cuda", quick=False)
    assert {c.shape for c in full} >= {"1024x1024x1024", "8192x8192x8192"} and len(full) > len(quick)
    monkeypatch.setattr(precision_cases, "_has_tensor_cores", lambda: False)  # a GPU before sm_80
    assert precision_cases.precision_sweep("cuda", quick=True) == []


def test_families_option_names_the_tensor_core_families(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "kernels", "--device", "cpu", "--families", "matmul_tf33"]) == 2
    assert "matmul_bf16, matmul_tf32" in capsys.readouterr().err
