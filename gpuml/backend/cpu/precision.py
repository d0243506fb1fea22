"""The operand rounding of the tensor-core precisions, so the CPU backend stays the reference.

The CUDA kernels round each matmul operand once before the product (kernels/mma.cuh):
- tf32: cvt.rna.tf32.f32, to 10 mantissa bits, round to nearest with ties AWAY from zero;
- bf16: cvt.rn.bf16x2.f32, to 7 mantissa bits, round to nearest even.
The products are then summed in FP32 on the GPU; here in the backend's dtype (float32, or
float64 for the checks), which is at least as exact. Inf stays Inf and NaN stays NaN; a finite
value past the format's largest rounds to Inf, as the hardware does. The result is a new array in
x's dtype; x is untouched (it is the FP32 master copy).
"""

from __future__ import annotations

import numpy as np

_EXP = np.uint32(0x7F800000)
_MANT = np.uint32(0x007FFFFF)


def round_operand(x: np.ndarray, precision: str) -> np.ndarray:
    """x with every element rounded as the `precision` ("tf32" or "bf16") kernels round it."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    special = (u & _EXP) == _EXP  # Inf or NaN: kept (a NaN keeps a nonzero mantissa below)
    if precision == "tf32":
        r = (u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
        keep = special & ((u & _MANT) == 0)  # Inf
        r = np.where(special, np.where(keep, u, np.uint32(0x7FFFE000)), r)
    elif precision == "bf16":
        r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
        nan = special & ((u & _MANT) != 0)
        r = np.where(nan, (u | np.uint32(0x00400000)) & np.uint32(0xFFFF0000), np.where(special, u, r))
    else:
        raise ValueError(f"round_operand: precision must be 'tf32' or 'bf16', got {precision!r}")
    return r.astype(np.uint32, copy=False).view(np.float32).astype(x.dtype, copy=False)
