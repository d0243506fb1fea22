"""The tensor-core GEMM cases of `gpuml bench kernels` (issue 13): ours with precision tf32 or
bf16 (kernels/gemm_tc_<precision>.cu) next to cuBLAS computing with the same operand type, in the same run.

- tf32: cuBLAS through `cupy.matmul` with CuPy's float32 compute type switched to TF32 for the
  anchor's call only (the FP32 rows keep COMPUTE_TYPE_FP32, kernels.import_cupy_fp32).
- bf16: cuBLAS through `torch.matmul` on BF16 copies of the inputs (CuPy has no bfloat16), made
  once outside the timing, as a BF16 model keeps them; its output is BF16 (FP32 sums inside).
Families matmul_tf32 / matmul_bf16, apart from `matmul`, whose rows set the run's FP32 peak.
Only on a GPU with tensor cores for both (sm_80 or newer); a CPU sweep has none of these rows.
The agreement bound covers the rounding differences: both sides round the operands (cuBLAS may
round TF32 to nearest even where ours rounds ties away), and the bf16 anchor's BF16 output.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuml.benchmark import formulas as fm
from gpuml.benchmark.kernel_cases import MLP_LAYERS, OURS, Case, Impl

PRECISION_FAMILIES = {"tf32": "matmul_tf32", "bf16": "matmul_bf16"}
#: max |ours - anchor| / max |anchor|: a few units of the format's rounding at K = 8192
TOLERANCE = {"tf32": 5e-3, "bf16": 3e-2}
_COMPUTE_TYPE_FP32, _COMPUTE_TYPE_TF32 = 4, 7  # cupy._core._routines_linalg, checked by name


def precision_gemm_case(precision: str, op: str, m: int, n: int, k: int, trans_a: bool, trans_b: bool,
                        label: str) -> Case:
    def build(env: Any) -> list[Impl]:
        from gpuml.backend import get_backend

        be = get_backend(env.device)
        be.set_precision(precision)
        a = env.rand((k, m) if trans_a else (m, k))
        b = env.rand((n, k) if trans_b else (k, n))
        out = be.empty((m, n))
        impls = [Impl(OURS, lambda: be.matmul(a, b, trans_a=trans_a, trans_b=trans_b, out=out), lambda: out)]
        opa, opb = (a.T if trans_a else a), (b.T if trans_b else b)
        anchor = _cublas_tf32(env, opa, opb, (m, n)) if precision == "tf32" else _cublas_bf16(env, opa, opb, (m, n))
        return impls + ([anchor] if anchor else [])

    return Case(PRECISION_FAMILIES[precision], f"{op}_{precision}", label, fm.gemm_flops(m, n, k),
                fm.gemm_bytes(m, n, k), build, TOLERANCE[precision])


def _cublas_tf32(env: Any, opa: Any, opb: Any, shape: tuple[int, int]) -> Impl | None:
    try:
        from cupy._core import _routines_linalg as linalg
    except ImportError:
        return None
    if linalg.compute_type_to_str(_COMPUTE_TYPE_TF32) != "COMPUTE_TYPE_TF32":
        return None  # a CuPy whose numbering changed: no anchor rather than a mislabelled one
    ref = env.xp.empty(shape, dtype=env.xp.float32)

    def run() -> None:
        linalg.set_compute_type(np.float32, _COMPUTE_TYPE_TF32)
        try:
            env.xp.matmul(opa, opb, out=ref)
        finally:
            linalg.set_compute_type(np.float32, _COMPUTE_TYPE_FP32)

    return Impl("cuBLAS TF32 (cupy.matmul)", run, lambda: ref)


def _cublas_bf16(env: Any, opa: Any, opb: Any, shape: tuple[int, int]) -> Impl | None:
    torch = env.torch
    if torch is None:
        return None
    ta, tb = env.as_torch(opa).to(torch.bfloat16), env.as_torch(opb).to(torch.bfloat16)
    tout = torch.empty(shape, dtype=torch.bfloat16, device=env.torch_device)
    return Impl("cuBLAS BF16 (torch.matmul)", lambda: torch.matmul(ta, tb, out=tout), lambda: tout.float(), "torch")


def precision_sweep(device: str, quick: bool) -> list[Case]:
    """TF32 and BF16 rows at 4096^3 and the seed MLP's Dense products (batch 256; the full sweep
    adds 1024^3, 8192^3 and batch 4096). None on a CPU or a GPU before sm_80."""
    if device != "cuda" or not _has_tensor_cores():
        return []
    squares = (4096,) if quick else (1024, 4096, 8192)
    batches = (256,) if quick else (256, 4096)
    cases = []
    for precision in PRECISION_FAMILIES:
        for s in squares:
            cases.append(precision_gemm_case(precision, "gemm_square", s, s, s, False, False, f"{s}x{s}x{s}"))
        for batch in batches:
            for fan_in, fan_out in MLP_LAYERS[: 1 if quick else None]:
                tag = f"B={batch} {fan_in}->{fan_out}"
                cases += [
                    precision_gemm_case(precision, "dense_fwd", batch, fan_out, fan_in, False, False, tag),
                    precision_gemm_case(precision, "dense_dx", batch, fan_in, fan_out, False, True, tag),
                    precision_gemm_case(precision, "dense_dw", fan_in, fan_out, batch, True, False, tag),
                ]
    return cases


def _has_tensor_cores() -> bool:
    import cupy

    return int(cupy.cuda.Device().compute_capability) >= 80
