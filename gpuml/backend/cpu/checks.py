"""Argument checks of the CPU backend: every op validates here before any loop runs, so a wrong
shape, dtype or buffer surfaces as one ShapeError line naming the op, never as a numba crash or a
silently broadcast result.

Validated once per signature. An op asks `self.checks(op, *args)` for the checker of its call:
the arguments' signature (each array's type, shape, strides, dtype and writeability; every other
argument as it is) is looked up in a table of signatures that passed before. For a new signature
the answer is an `ArgChecks`, which checks everything and records the signature when the op calls
`done()`; for a known one it is the backend's `TrustedArgs`, whose methods do the conversions
only (a contiguous copy of a strided input, an output allocated when none is given). A training
step repeats the same signatures, so after its first run it pays one table look-up per op however
many checks a call has. Checks of values rather than shapes (labels and indices in range) are not
signature checks: they run on every call, inside the numba loops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gpuml.backend.base import check_pair, conv_out_size, fail
from gpuml.backend.cpu.loops import first_outside_range

Geometry = tuple[int, int, int, int, int, int]  # kh, kw, sh, sw, ph, pw

#: signatures remembered per backend before the table starts afresh (a bound, not a tuning knob)
MAX_SIGNATURES = 4096


def signature(value: Any) -> Any:
    """What an op's checks depend on: an array's type, shape, strides, dtype and writeability;
    a list (of arrays: an optimizer's) element by element; anything else as it is (a tuple of
    arrays is unhashable, so such a call is checked every time)."""
    if type(value) is np.ndarray:
        return (value.shape, value.strides, value.dtype, value.flags.writeable)
    if type(value) is list:
        return tuple(map(signature, value))
    return value


class ArgChecks:
    """The checks of one op call whose argument signature is new; `done()` records it."""

    def __init__(self, dtype: np.dtype, op: str, key: Any = None, known: dict | None = None) -> None:
        self.dtype, self.op, self._key, self._known = dtype, op, key, known

    def done(self) -> None:
        """Every check of the call passed: later calls with its signature skip them."""
        if self._known is not None:
            if len(self._known) >= MAX_SIGNATURES:
                self._known.clear()
            self._known[self._key] = True

    def fail(self, message: str) -> None:
        fail(self.op, message)

    def _array(self, name: str, a: Any) -> np.ndarray:
        if not isinstance(a, np.ndarray):
            fail(self.op, f"{name} must be a numpy array, got {type(a).__name__}")
        return a

    def _shape(self, name: str, a: np.ndarray, ndim: int | None, shape: Sequence[int] | None) -> None:
        if shape is not None and a.shape != tuple(shape):
            fail(self.op, f"{name} has shape {a.shape}, expected {tuple(shape)}")
        if ndim is not None and a.ndim != ndim:
            fail(self.op, f"{name} must be {ndim}-D, got shape {a.shape}")

    def float_in(self, name: str, a: Any, *, ndim: int | None = None, shape: Sequence[int] | None = None) -> np.ndarray:
        """An input of the backend's float dtype, made C-contiguous (a copy only if it was not)."""
        a = self._array(name, a)
        if a.dtype != self.dtype:
            fail(self.op, f"{name} {a.shape} has dtype {a.dtype}, expected {self.dtype}")
        self._shape(name, a, ndim, shape)
        return np.ascontiguousarray(a)

    def typed_in(self, name: str, a: Any, dtype: Any, shape: Sequence[int] | None = None) -> np.ndarray:
        a = self._array(name, a)
        if a.dtype != np.dtype(dtype):
            fail(self.op, f"{name} {a.shape} has dtype {a.dtype}, expected {np.dtype(dtype)}")
        self._shape(name, a, None, shape)
        return np.ascontiguousarray(a)

    def int_in(self, name: str, a: Any, shape: Sequence[int] | None = None, ndim: int | None = None) -> np.ndarray:
        a = self._array(name, a)
        if a.dtype.kind not in "iu":
            fail(self.op, f"{name} {a.shape} has dtype {a.dtype}, expected an integer dtype")
        self._shape(name, a, ndim, shape)
        return np.ascontiguousarray(a)

    def out_buf(self, name: str, out: Any, shape: Sequence[int], dtype: Any = None) -> np.ndarray:
        """The caller's `out=` buffer, checked, or a fresh one when it is None."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        if out is None:
            return np.empty(shape, dtype=dtype)
        out = self._array(name, out)
        if out.shape != shape or out.dtype != dtype:
            fail(self.op, f"{name} buffer is {out.shape} {out.dtype}, expected {shape} {dtype}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            fail(self.op, f"{name} buffer {out.shape} must be C-contiguous and writeable")
        return out

    def inplace(self, name: str, a: Any, shape: Sequence[int] | None = None) -> np.ndarray:
        a = self._array(name, a)
        if a.dtype != self.dtype:
            fail(self.op, f"{name} {a.shape} has dtype {a.dtype}, expected {self.dtype}")
        if not a.flags.c_contiguous or not a.flags.writeable:
            fail(self.op, f"{name} {a.shape} is updated in place, so it must be C-contiguous and writeable")
        self._shape(name, a, None, shape)
        return a

    def epilogue_act(self, activation: str | None) -> bool:
        """True for a fused relu; None means no activation; anything else is refused."""
        if activation not in (None, "relu"):
            raise ValueError(f"{self.op}: fused activation must be None or 'relu', got {activation!r}")
        return activation == "relu"

    def shape4(self, name: str, shape: Sequence[int]) -> tuple[int, int, int, int]:
        try:
            dims = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            dims = ()
        if len(dims) != 4 or min(dims) < 1:
            fail(self.op, f"{name} must be 4 positive ints, got {shape!r}")
        return dims  # type: ignore[return-value]

    def conv_geometry(
        self, x_shape: Sequence[int], w_shape: Sequence[int], stride: Any, padding: Any
    ) -> tuple[Geometry, tuple[int, int, int, int]]:
        """((kh, kw, sh, sw, ph, pw), y shape) of a convolution, after checking that x and w fit."""
        C, Cw = x_shape[1], w_shape[1]
        check_pair(self.op, "stride", stride, 1)
        ph, pw = check_pair(self.op, "padding", padding, 0)
        if C != Cw:
            fail(self.op, f"x {tuple(x_shape)} and w {tuple(w_shape)} do not fit ({C} != {Cw} input channels)")
        geom, y_shape = conv_dims(x_shape, w_shape, stride, padding)
        if y_shape[2] < 1 or y_shape[3] < 1:
            fail(self.op, f"x {tuple(x_shape)} padded by {(ph, pw)} is smaller than the "
                          f"{w_shape[2]}x{w_shape[3]} kernel of w")
        return geom, y_shape

    def pool_geometry(
        self, x_shape: Sequence[int], kernel: Any, stride: Any, padding: Any
    ) -> tuple[Geometry, tuple[int, int, int, int]]:
        """((kh, kw, sh, sw, ph, pw), y shape); padding at most half the kernel (as PyTorch), so
        every window holds at least one real cell."""
        kh, kw = check_pair(self.op, "kernel", kernel, 1)
        check_pair(self.op, "stride", stride, 1)
        ph, pw = check_pair(self.op, "padding", padding, 0)
        if 2 * ph > kh or 2 * pw > kw:
            fail(self.op, f"padding {(ph, pw)} is more than half the kernel {(kh, kw)}")
        geom, y_shape = pool_dims(x_shape, kernel, stride, padding)
        if y_shape[2] < 1 or y_shape[3] < 1:
            fail(self.op, f"x {tuple(x_shape)} padded by {(ph, pw)} is smaller than the kernel {(kh, kw)}")
        return geom, y_shape

    def param_groups(self, params: list, *others: list) -> list[tuple[np.ndarray, ...]]:
        """Parallel lists -> tuples of flat in-place views, after checking lengths and shapes."""
        names = ("grads", "state", "state")
        for name, lst in zip(names, others, strict=False):
            if len(lst) != len(params):
                fail(self.op, f"{len(params)} params but {len(lst)} {name}")
        groups = []
        for i, group in enumerate(zip(params, *others, strict=True)):
            p = self.inplace(f"params[{i}]", group[0])
            flat = [p.reshape(-1)]
            for j, a in enumerate(group[1:]):
                name = f"{names[min(j, 2)]}[{i}]"
                a = self.float_in(name, a, shape=p.shape) if j == 0 else self.inplace(name, a, p.shape)
                flat.append(a.reshape(-1))
            groups.append(tuple(flat))
        return groups


class TrustedArgs(ArgChecks):
    """ArgChecks for a call whose signature passed every check before: the same results (inputs
    made contiguous, outputs allocated when not given, geometry), no checks."""

    def __init__(self, dtype: np.dtype) -> None:
        super().__init__(dtype, "trusted")

    def done(self) -> None:
        pass

    def float_in(self, name: str, a: Any, *, ndim: int | None = None, shape: Sequence[int] | None = None) -> np.ndarray:
        return np.ascontiguousarray(a)

    def typed_in(self, name: str, a: Any, dtype: Any, shape: Sequence[int] | None = None) -> np.ndarray:
        return np.ascontiguousarray(a)

    def int_in(self, name: str, a: Any, shape: Sequence[int] | None = None, ndim: int | None = None) -> np.ndarray:
        return np.ascontiguousarray(a)

    def out_buf(self, name: str, out: Any, shape: Sequence[int], dtype: Any = None) -> np.ndarray:
        return np.empty(shape, self.dtype if dtype is None else dtype) if out is None else out

    def inplace(self, name: str, a: Any, shape: Sequence[int] | None = None) -> np.ndarray:
        return a

    def epilogue_act(self, activation: str | None) -> bool:
        return activation == "relu"

    def shape4(self, name: str, shape: Sequence[int]) -> tuple[int, int, int, int]:
        return tuple(shape)  # type: ignore[return-value]

    def conv_geometry(self, x_shape: Sequence[int], w_shape: Sequence[int], stride: Any,
                      padding: Any) -> tuple[Geometry, tuple[int, int, int, int]]:
        return conv_dims(x_shape, w_shape, stride, padding)

    def pool_geometry(self, x_shape: Sequence[int], kernel: Any, stride: Any,
                      padding: Any) -> tuple[Geometry, tuple[int, int, int, int]]:
        return pool_dims(x_shape, kernel, stride, padding)

    def param_groups(self, params: list, *others: list) -> list[tuple[np.ndarray, ...]]:
        return [tuple(a.reshape(-1) for a in group) for group in zip(params, *others)]


def conv_dims(x_shape: Sequence[int], w_shape: Sequence[int], stride: Any,
              padding: Any) -> tuple[Geometry, tuple[int, int, int, int]]:
    """((kh, kw, sh, sw, ph, pw), y shape) of a convolution, unchecked."""
    N, R, S, K = x_shape[0], w_shape[2], w_shape[3], w_shape[0]
    sh, sw = int(stride[0]), int(stride[1])
    ph, pw = int(padding[0]), int(padding[1])
    P, Q = conv_out_size(x_shape[2], R, sh, ph), conv_out_size(x_shape[3], S, sw, pw)
    return (int(R), int(S), sh, sw, ph, pw), (int(N), int(K), P, Q)


def pool_dims(x_shape: Sequence[int], kernel: Any, stride: Any,
              padding: Any) -> tuple[Geometry, tuple[int, int, int, int]]:
    """((kh, kw, sh, sw, ph, pw), y shape) of a pooling window, unchecked."""
    kh, kw = int(kernel[0]), int(kernel[1])
    sh, sw = int(stride[0]), int(stride[1])
    ph, pw = int(padding[0]), int(padding[1])
    P, Q = conv_out_size(x_shape[2], kh, sh, ph), conv_out_size(x_shape[3], kw, sw, pw)
    return (kh, kw, sh, sw, ph, pw), (int(x_shape[0]), int(x_shape[1]), P, Q)


class Checks:
    """The checker table, mixed into CpuBackend (it reads `self.dtype`)."""

    dtype: np.dtype

    def checks(self, op: str, *args: Any) -> ArgChecks:
        """The checker for a call of `op` with `args` (its arrays and static arguments: those
        the checks look at): TrustedArgs when that signature passed before, else ArgChecks."""
        known = self.__dict__.get("_signatures")
        if known is None:
            known = self._signatures = {}
            self._trusted = TrustedArgs(self.dtype)
        key = (op, *map(signature, args))
        try:
            if key in known:
                return self._trusted
        except TypeError:  # an unhashable argument: check it, remember nothing
            return ArgChecks(self.dtype, op)
        return ArgChecks(self.dtype, op, key, known)

    def labels_in_range(self, op: str, labels: np.ndarray, classes: int) -> None:
        """Every label in [0, classes): a value check, so it runs on every call (one pass)."""
        row = first_outside(labels, classes)
        if row >= 0:
            fail(op, f"label {labels[row]} (row {row}) is outside [0, {classes}), the logits' class range")


def first_outside(values: np.ndarray, limit: int) -> int:
    """The index of the first value outside [0, limit), or -1 (numba, one pass)."""
    return int(first_outside_range(values.reshape(-1), limit)) if values.size else -1
