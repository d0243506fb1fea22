"""Backend registry: `get_backend("cpu" | "cuda" | "cuda:N" | "auto")`.

Imports are lazy so that `import gpuml` works on machines without CuPy or numba-compiled loops
already built; `cupy` is only imported by `gpuml.backend.cuda`.
"""

from __future__ import annotations

import re

from gpuml.backend.base import Backend
from gpuml.errors import DeviceError

DEVICES = ("auto", "cpu", "cuda")
_CUDA_N = re.compile(r"cuda:(\d+)")


def cuda_status() -> tuple[bool, str]:
    """(available, reason): whether CuPy imports and sees at least one GPU, and why not."""
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return False, (f"CuPy is not installed or failed to import ({type(exc).__name__}: {exc}); "
                       "install gpuml[cuda12] or gpuml[cuda13]")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy found no usable CUDA driver ({type(exc).__name__}: {exc})"
    if n < 1:
        return False, "CuPy sees no GPU"
    return True, f"{n} GPU(s)"


def get_backend(device: str = "auto", dtype: str = "float32") -> Backend:
    """The backend for `device`. "auto" picks CUDA when CuPy sees a GPU, else CPU (the caller
    logs which via `backend.describe()`); "cuda" without one is a DeviceError, never a silent
    fallback. "cuda:N" makes GPU N CuPy's current device for this thread (where every later
    allocation and launch of the backend goes) and needs N below the number of GPUs."""
    match = _CUDA_N.fullmatch(device) if isinstance(device, str) else None
    if device not in DEVICES and match is None:
        raise DeviceError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)} or cuda:N")
    if device != "cpu":
        ok, why = cuda_status()
        if ok:
            from gpuml.backend.cuda import CudaBackend

            if match is not None:
                _use_gpu(int(match.group(1)))
            return CudaBackend(dtype=dtype)
        if device != "auto":
            raise DeviceError(f"device {device!r} requested but no GPU is usable: {why}")
    from gpuml.backend.cpu import CpuBackend

    return CpuBackend(dtype=dtype)


def _use_gpu(index: int) -> None:
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    if index >= count:
        raise DeviceError(f"device 'cuda:{index}' requested but this machine has {count} GPU"
                          f"{'s' if count != 1 else ''} (cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    cupy.cuda.Device(index).use()


__all__ = ["Backend", "DEVICES", "cuda_status", "get_backend"]
