"""Allocation failures as one-line errors naming the layer and the bytes it asked for."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gpuml.errors import DeviceError


def out_of_memory(layer: str, what: str, hint: str, exc: MemoryError,
                  shape: tuple[int, ...] | None = None, dtype: Any = None) -> DeviceError:
    """DeviceError for an allocation of `what` that failed in `layer`. numpy's MemoryError
    carries the shape and dtype asked for; otherwise the caller's are used, or the exception's
    own text (CuPy's OutOfMemoryError, a MemoryError too, says how many bytes)."""
    shape = getattr(exc, "shape", shape)
    dtype = getattr(exc, "dtype", dtype)
    where = "GPU" if type(exc).__name__ == "OutOfMemoryError" else "host"
    if shape is not None and dtype is not None:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        asked = f"{nbytes:,} bytes ({nbytes / 2**30:,.1f} GiB) for shape {tuple(shape)} {np.dtype(dtype).name}"
    else:
        asked = str(exc).strip() or "the allocation failed"
    return DeviceError(f"layer {layer}: out of {where} memory allocating {what}: {asked}; {hint}")
