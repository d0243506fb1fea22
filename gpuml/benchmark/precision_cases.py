"""The tensor-core cases of `gpuml bench kernels` (issue 13): ours with precision tf32 or bf16
(Backend.set_precision, then the public matmul / conv2d_* calls) next to cuBLAS / cuDNN computing
with the same operand type, in the same run.

GEMM (families matmul_tf32 / matmul_bf16; kernels/gemm_tc_<precision>.cu):
- tf32: cuBLAS through `cupy.matmul` with CuPy's float32 compute type switched to TF32 for the
  anchor's call only (the FP32 rows keep COMPUTE_TYPE_FP32, kernels.import_cupy_fp32).
- bf16: cuBLAS through `torch.matmul` on BF16 copies of the inputs (CuPy has no bfloat16), made
  once outside the timing, as a BF16 model keeps them; its output is BF16 (FP32 sums inside).
Convolution (families conv2d_tf32 / conv2d_bf16: fwd, bwd_data, bwd_weight of the seed CNN's
layers at batch 32 and 256 and the ResNet 64->64 3x3 layer at batch 64, as the FP32 rows):
- tf32: cuDNN through PyTorch's ATen ops with torch.backends.cudnn.allow_tf32 = True around the
  anchor's call only, the previous setting restored after (kernel_cases.with_cudnn_tf32); the
  FP32 conv rows set it False around theirs.
- bf16: cuDNN on BF16 copies of the inputs made outside the timing; BF16 output (FP32 sums).
Ours runs whatever the backend does for that precision (the tensor-core conv once it exists; FP32
before), so the rows hold either way. The families stand apart from `matmul` and `conv2d`, whose
rows are FP32 and set the run's FP32 peak. Only on a GPU with tensor cores for both (sm_80 or
newer); a CPU sweep has none of these rows.

Agreement bound, max |ours - anchor| / max |anchor| (the same per precision for GEMM and conv):
both sides round the operands once (half an ulp: 2^-11 for tf32, 2^-8 for bf16) and sum in FP32.
For random-sign data the difference and the largest output both grow like sqrt(reduction length),
so the measure does not grow with K (9 for conv1's forward, 200,704 for the ResNet weight
gradient). What differs between the sides is the rounding: cuDNN/cuBLAS may round TF32 to nearest
even or truncate (the mma reads the top 19 bits) where ours rounds ties away, ours may still be
FP32 (a conv not yet on tensor cores), and the BF16 anchor rounds its output (and bias) to BF16.
Each term then moves by at most 2 x 2^-10 (tf32, truncated) or 2 x 2^-8 (bf16) plus 2^-8 for the
BF16 output; computed for every row's reduction length, the measure stays below 1.1e-3 (tf32) and
5e-3 (bf16) (tests/test_bench_conv_precision.py). 5e-3 and 3e-2 leave a margin of 3 or more for
FP32 summation order and cuDNN's algorithms (Winograd, FFT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gpuml.benchmark import formulas as fm
from gpuml.benchmark.kernel_cases import (
    CONV_OPS,
    MLP_LAYERS,
    OURS,
    RESNET_CONV_LAYER,
    SEED_CONV_LAYERS,
    Case,
    Impl,
    conv_inputs,
    conv_label,
    ours_conv_impl,
    torch_conv_impl,
)

PRECISIONS = ("tf32", "bf16")
#: the family of each (op kind, precision): apart from the FP32 families matmul and conv2d
PRECISION_FAMILIES = {(kind, p): f"{kind}_{p}" for kind in ("matmul", "conv2d") for p in PRECISIONS}
#: max |ours - anchor| / max |anchor|: a few units of the format's rounding (module docstring)
TOLERANCE = {"tf32": 5e-3, "bf16": 3e-2}
CUDNN_NAMES = {"tf32": "cuDNN TF32 (torch)", "bf16": "cuDNN BF16 (torch)"}
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

    return Case(PRECISION_FAMILIES["matmul", precision], f"{op}_{precision}", label, fm.gemm_flops(m, n, k),
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


def precision_conv_cases(precision: str, n: int, c: int, h: int, k: int, r: int, pad: int, tag: str) -> list[Case]:
    """fwd (with bias), bwd_data and bwd_weight of a stride-1 convolution in `precision`: ours on a
    backend of its own set to it (the run's backend stays FP32 for the FP32 rows), cuDNN with the
    same compute type."""
    label = conv_label(n, c, h, k, r, pad, tag)
    flops = fm.conv_flops(n, c, h, h, k, r, r, 1, pad)

    def build(op: str) -> Callable[[Any], list[Impl]]:
        def impls(env: Any) -> list[Impl]:
            from gpuml.backend import get_backend

            be = get_backend(env.device)
            be.set_precision(precision)
            x, w, b, dy = conv_inputs(env, n, c, h, k, r, pad)
            torch = env.torch
            anchor = torch_conv_impl(env, op, x, w, b, dy, pad, name=CUDNN_NAMES[precision],
                                     dtype=torch.bfloat16 if torch and precision == "bf16" else None,
                                     tf32=precision == "tf32")
            return [ours_conv_impl(be, op, x, w, b, dy, pad)] + ([anchor] if anchor else [])

        return impls

    shape = (n, c, h, h, k, r, r, 1, pad)
    return [Case(PRECISION_FAMILIES["conv2d", precision], f"{op}_{precision}", label, flops,
                 fm.conv_bytes(op, *shape), build(op), TOLERANCE[precision]) for op in CONV_OPS]


def precision_sweep(device: str, quick: bool) -> list[Case]:
    """TF32 and BF16 rows at 4096^3, the seed MLP's Dense products (batch 256) and the ResNet conv
    layer; the full sweep adds 1024^3, 8192^3, batch 4096 and the seed CNN's conv layers at batch
    32 and 256. None on a CPU or a GPU before sm_80."""
    if device != "cuda" or not _has_tensor_cores():
        return []
    squares = (4096,) if quick else (1024, 4096, 8192)
    batches = (256,) if quick else (256, 4096)
    conv_layers = (RESNET_CONV_LAYER,) if quick else (*SEED_CONV_LAYERS, RESNET_CONV_LAYER)
    cases = []
    for precision in PRECISIONS:
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
        for layer in conv_layers:
            cases += precision_conv_cases(precision, *layer)
    return cases


def _has_tensor_cores() -> bool:
    import cupy

    return int(cupy.cuda.Device().compute_capability) >= 80
