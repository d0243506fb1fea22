"""Plumbing shared by every part of the CUDA backend (backend.py and its mixins): argument checks,
overlap tests by pointer arithmetic (no sync), kernel launches with a per-backend memo, and
per-shape scratch buffers. The free functions are pure Python and work on numpy arrays too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gpuml.backend.base import Array, fail
from gpuml.backend.cuda.kernels import get_function


def buffers_overlap(a: Any, b: Any) -> bool:
    """Whether two device arrays share a byte (pointer arithmetic on cupy arrays: no sync)."""
    a0, b0 = a.data.ptr, b.data.ptr
    return a.nbytes > 0 and b.nbytes > 0 and a0 < b0 + b.nbytes and b0 < a0 + a.nbytes


def same_buffer(a: Any, b: Any) -> bool:
    return a.data.ptr == b.data.ptr and a.nbytes == b.nbytes


def aligned16(*arrays: Any) -> bool:
    return all(a is None or a.data.ptr % 16 == 0 for a in arrays)


def check_array(op: str, name: str, a: Any, dtype: Any, shape: Sequence[int] | None = None,
                ndim: int | None = None) -> None:
    """dtype, shape and C-contiguity of an array (numpy or cupy alike); ShapeError if wrong."""
    if a.dtype != np.dtype(dtype):
        fail(op, f"{name} {tuple(a.shape)} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if ndim is not None and a.ndim != ndim:
        fail(op, f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        fail(op, f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    if not a.flags.c_contiguous:
        fail(op, f"{name} {tuple(a.shape)} must be C-contiguous")


class DevicePlumbing:
    """Mixed into CudaBackend, which provides `dtype` and `xp` (cupy)."""

    dtype: np.dtype
    xp: Any
    #: kernels launched through this backend so far (`_launch` is the only launch path): the
    #: benchmark and tests/test_cuda_launch_count.py read the difference over one step
    launch_count: int = 0

    def _launch(self, family: str, name: str, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
        # Kernels are memoised here, not only in kernels.get_function: that one re-derives the
        # kernel folder and device arch per call, too slow for a launch-bound batch-32 step.
        kernels = self.__dict__.setdefault("_kernel_memo", {})
        fn = kernels.get((family, name))
        if fn is None:
            fn = kernels[(family, name)] = get_function(family, name)
        fn(grid, block, args, shared_mem=shared_mem)
        self.launch_count += 1

    def _scratch(self, name: str, elems: int, dtype: Any = np.float32, *, zeroed: bool = False) -> Array:
        """A per-backend scratch vector, allocated on the first call for its size and reused
        (launches are stream-ordered, so consecutive ops never use one concurrently); a training
        step then allocates nothing after its first run. `zeroed`: filled with zeros when it is
        allocated (the single-launch reductions' ticket counters, which their kernels reset)."""
        buffers = self.__dict__.setdefault("_scratch_buffers", {})
        key = (name, int(elems), np.dtype(dtype))
        buf = buffers.get(key)
        if buf is None:
            alloc = self.xp.zeros if zeroed else self.xp.empty
            buf = buffers[key] = alloc(max(1, int(elems)), dtype=dtype)
        return buf

    def _tickets(self, count: int) -> Array:
        """`count` zeroed uint32 ticket counters for gpuml_last_block (kernels/common.cuh)."""
        return self._scratch("tickets", count, np.uint32, zeroed=True)

    def _dev_in(self, op: str, name: str, a: Any, *, shape: Sequence[int] | None = None,
                ndim: int | None = None, dtype: Any = None) -> Array:
        if not isinstance(a, self.xp.ndarray):
            fail(op, f"{name} must be a device array ({self.xp.__name__}.ndarray), got {type(a).__name__}")
        check_array(op, name, a, self.dtype if dtype is None else dtype, shape, ndim)
        return a

    def _dev_out(self, op: str, name: str, out: Any, shape: Sequence[int], dtype: Any = None,
                 **inputs: Array | None) -> Array:
        """The caller's `out=` (checked, and refused where it overlaps one of `inputs`) or a
        fresh array."""
        dtype = self.dtype if dtype is None else dtype
        if out is None:
            return self.xp.empty(tuple(shape), dtype=dtype)
        out = self._dev_in(op, f"{name} buffer", out, shape=shape, dtype=dtype)
        self._no_alias(op, f"{name} buffer", out, **inputs)
        return out

    def _out_may_alias(self, op: str, out_name: str, out: Array, src_name: str, src: Array, /) -> None:
        """`out` may be `src` itself, but may not partly overlap it."""
        if buffers_overlap(out, src) and not same_buffer(out, src):
            fail(op, f"{out_name} {out.shape} partly overlaps {src_name} {src.shape}")

    def _no_alias(self, op: str, target_name: str, target: Array, /, **inputs: Array | None) -> None:
        """`target` (an output) shares no byte with any of `inputs`."""
        for name, a in inputs.items():
            if a is not None and buffers_overlap(target, a):
                fail(op, f"{target_name} {tuple(target.shape)} overlaps {name} {tuple(a.shape)}")
