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


#: Host copies of a parameter while training on the CPU: value, gradient and up to two
#: optimizer moments (Adam's m and v), each in the backend's dtype.
TRAINING_COPIES = 4


def available_host_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), None when
    /proc/meminfo cannot tell (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def ensure_host_memory(layer: str, shape: tuple[int, ...], dtype: Any, hint: str) -> None:
    """DeviceError when training copies of a (shape, dtype) parameter cannot fit in the host
    memory left. Linux overcommits: numpy's allocation of a few GiB too many succeeds, and the
    kernel's OOM killer ends the process later without a word (seen: a dense layer of 10**6
    units, killed with exit 137), so the check comes before the allocation."""
    free = available_host_memory()
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize * TRAINING_COPIES
    if free is not None and nbytes > free:
        raise DeviceError(
            f"layer {layer}: out of host memory for its parameters: shape {tuple(shape)} {np.dtype(dtype).name} "
            f"needs {nbytes:,} bytes ({nbytes / 2**30:,.1f} GiB) for value, gradient and optimizer state, "
            f"{free / 2**30:,.1f} GiB available; {hint}")
