"""A stand-in for CuPy that runs gpuml's CUDA kernels on the CPU (tests/cuda_emulator/README.md).

Device arrays are NumPy arrays (a subclass carrying CuPy's `.data.ptr`), kernels come from
`_emu.RawModule`. Only the CuPy surface gpuml and its tests use is here; anything else is an
AttributeError, which is the signal to add it.

Every allocation sits between two GUARD-byte zones of 0xff (NaN as float, -1 as int): a kernel
reading just past an array gets NaN, and one writing there is reported after its launch
(`guards_intact`). Fresh `empty` float arrays are NaN too, so an element that no kernel writes
cannot pass for a plausible value.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from . import cuda
from ._emu import RawKernel, RawModule

__version__ = "0.0+cpu-emulator"
__all__ = ["RawKernel", "RawModule", "ndarray", "cuda"]


class _Pointer:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class ndarray(np.ndarray):
    @property
    def data(self) -> _Pointer:  # type: ignore[override]
        return _Pointer(self.__array_interface__["data"][0])

    def set(self, arr: Any, stream: Any = None) -> None:
        src = np.asarray(arr)
        if cuda.capturing_stream() is not None:
            # Inside a capture only a copy from pinned host memory becomes a graph node (read
            # at each replay); a pageable copy would stage and synchronise: refused, as on a GPU.
            if not cuda.is_pinned(src):
                cuda.fail_if_capturing("host-to-device copy from pageable memory (ndarray.set)")
            cuda.capturing_stream()._record(cuda.CopyNode(self, src))
            return
        np.copyto(self.view(np.ndarray), src)

    def get(self, stream: Any = None) -> np.ndarray:
        return asnumpy(self)

    def fill(self, value: Any) -> None:
        # A fill would be a memset node on a GPU; the emulator would run it at capture time.
        cuda.fail_if_capturing("ndarray.fill (not recorded by the emulator: use a kernel)")
        super().fill(value)


GUARD = 256  # bytes; a multiple of 16, so the data keeps malloc's 16-byte alignment


def _allocation(a: np.ndarray) -> np.ndarray:
    """The guarded byte buffer that device array `a` (or a view of it) lives in."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


# id -> buffer of every guarded allocation alive; an array NumPy made from a device array
# (x + y, x.copy()) has no guards and goes unchecked.
_guarded: weakref.WeakValueDictionary[int, np.ndarray] = weakref.WeakValueDictionary()


def guards_intact(a: ndarray) -> bool:
    return buffer_guards_intact(_allocation(a))


def buffer_guards_intact(buf: np.ndarray) -> bool:
    if _guarded.get(id(buf)) is not buf:
        return True
    return bool((buf[:GUARD] == 0xFF).all() and (buf[-GUARD:] == 0xFF).all())


def _device(a: np.ndarray) -> ndarray:
    cuda.fail_if_capturing("device memory allocation (cudaMalloc)")
    a = np.asarray(a)
    buf = np.full(a.nbytes + 2 * GUARD, 0xFF, dtype=np.uint8)
    _guarded[id(buf)] = buf
    out = buf[GUARD:GUARD + a.nbytes].view(a.dtype).reshape(a.shape).view(ndarray)
    np.copyto(out, a, casting="no")
    return out


def empty(shape: Any, dtype: Any = np.float32) -> ndarray:
    a = np.empty(shape, dtype=dtype)
    a.fill(np.nan if a.dtype.kind == "f" else 0)
    return _device(a)


def empty_like(a: Any, dtype: Any = None) -> ndarray:
    return empty(np.shape(a), dtype=a.dtype if dtype is None else dtype)


def zeros(shape: Any, dtype: Any = np.float32) -> ndarray:
    return _device(np.zeros(shape, dtype=dtype))


def full(shape: Any, fill_value: Any, dtype: Any = None) -> ndarray:
    return _device(np.full(shape, fill_value, dtype=dtype))


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K") -> ndarray:
    return _device(np.array(np.asarray(obj), dtype=dtype, order=order, copy=True))


def asarray(obj: Any, dtype: Any = None, order: str = "C") -> ndarray:
    if isinstance(obj, ndarray) and (dtype is None or obj.dtype == dtype):
        return obj
    return array(obj, dtype=dtype, order=order)


def asnumpy(a: Any, stream: Any = None) -> np.ndarray:
    cuda.fail_if_capturing("device-to-host copy (asnumpy), which synchronises")
    return np.array(np.asarray(a), copy=True)
