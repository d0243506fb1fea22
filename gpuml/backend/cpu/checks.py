"""Argument checks of the CPU backend: every op validates here before any loop runs, so a wrong
shape, dtype or buffer surfaces as one ShapeError line naming the op, never as a numba crash or a
silently broadcast result."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gpuml.backend.base import check_pair, conv_out_size, fail


class Checks:
    """Validation helpers mixed into CpuBackend (they read `self.dtype`)."""

    dtype: np.dtype

    def _array(self, op: str, name: str, a: Any) -> np.ndarray:
        if not isinstance(a, np.ndarray):
            fail(op, f"{name} must be a numpy array, got {type(a).__name__}")
        return a

    def _shape(self, op: str, name: str, a: np.ndarray, ndim: int | None, shape: Sequence[int] | None) -> None:
        if shape is not None and a.shape != tuple(shape):
            fail(op, f"{name} has shape {a.shape}, expected {tuple(shape)}")
        if ndim is not None and a.ndim != ndim:
            fail(op, f"{name} must be {ndim}-D, got shape {a.shape}")

    def float_in(
        self, op: str, name: str, a: Any, *, ndim: int | None = None, shape: Sequence[int] | None = None
    ) -> np.ndarray:
        """An input of the backend's float dtype, made C-contiguous (a copy only if it was not)."""
        a = self._array(op, name, a)
        if a.dtype != self.dtype:
            fail(op, f"{name} {a.shape} has dtype {a.dtype}, expected {self.dtype}")
        self._shape(op, name, a, ndim, shape)
        return np.ascontiguousarray(a)

    def typed_in(self, op: str, name: str, a: Any, dtype: Any, shape: Sequence[int] | None = None) -> np.ndarray:
        a = self._array(op, name, a)
        if a.dtype != np.dtype(dtype):
            fail(op, f"{name} {a.shape} has dtype {a.dtype}, expected {np.dtype(dtype)}")
        self._shape(op, name, a, None, shape)
        return np.ascontiguousarray(a)

    def int_in(self, op: str, name: str, a: Any, shape: Sequence[int] | None = None) -> np.ndarray:
        a = self._array(op, name, a)
        if a.dtype.kind not in "iu":
            fail(op, f"{name} {a.shape} has dtype {a.dtype}, expected an integer dtype")
        self._shape(op, name, a, None, shape)
        return np.ascontiguousarray(a)

    def out_buf(self, op: str, name: str, out: Any, shape: Sequence[int], dtype: Any = None) -> np.ndarray:
        """The caller's `out=` buffer, checked, or a fresh one when it is None."""
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        if out is None:
            return np.empty(shape, dtype=dtype)
        out = self._array(op, name, out)
        if out.shape != shape or out.dtype != dtype:
            fail(op, f"{name} buffer is {out.shape} {out.dtype}, expected {shape} {dtype}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            fail(op, f"{name} buffer {out.shape} must be C-contiguous and writeable")
        return out

    def inplace(self, op: str, name: str, a: Any) -> np.ndarray:
        a = self._array(op, name, a)
        if a.dtype != self.dtype:
            fail(op, f"{name} {a.shape} has dtype {a.dtype}, expected {self.dtype}")
        if not a.flags.c_contiguous or not a.flags.writeable:
            fail(op, f"{name} {a.shape} is updated in place, so it must be C-contiguous and writeable")
        return a

    def epilogue_act(self, op: str, activation: str | None) -> bool:
        """True for a fused relu; None means no activation; anything else is refused."""
        if activation not in (None, "relu"):
            raise ValueError(f"{op}: fused activation must be None or 'relu', got {activation!r}")
        return activation == "relu"

    def shape4(self, op: str, name: str, shape: Sequence[int]) -> tuple[int, int, int, int]:
        try:
            dims = tuple(int(s) for s in shape)
        except (TypeError, ValueError):
            dims = ()
        if len(dims) != 4 or min(dims) < 1:
            fail(op, f"{name} must be 4 positive ints, got {shape!r}")
        return dims  # type: ignore[return-value]

    def conv_geometry(
        self, op: str, x_shape: Sequence[int], w_shape: Sequence[int], stride: Any, padding: Any
    ) -> tuple[tuple[int, int, int, int, int, int], tuple[int, int, int, int]]:
        """((kh, kw, sh, sw, ph, pw), y shape) of a convolution, after checking that x and w fit."""
        N, C, H, W = x_shape
        K, Cw, R, S = w_shape
        sh, sw = check_pair(op, "stride", stride, 1)
        ph, pw = check_pair(op, "padding", padding, 0)
        if C != Cw:
            fail(op, f"x {tuple(x_shape)} and w {tuple(w_shape)} do not fit ({C} != {Cw} input channels)")
        P, Q = conv_out_size(H, R, sh, ph), conv_out_size(W, S, sw, pw)
        if P < 1 or Q < 1:
            fail(op, f"x {tuple(x_shape)} padded by {(ph, pw)} is smaller than the {R}x{S} kernel of w")
        return (R, S, sh, sw, ph, pw), (N, K, P, Q)

    def pool_geometry(
        self, op: str, x_shape: Sequence[int], kernel: Any, stride: Any, padding: Any
    ) -> tuple[tuple[int, int, int, int, int, int], tuple[int, int, int, int]]:
        """((kh, kw, sh, sw, ph, pw), y shape); padding at most half the kernel (as PyTorch), so
        every window holds at least one real cell."""
        N, C, H, W = x_shape
        kh, kw = check_pair(op, "kernel", kernel, 1)
        sh, sw = check_pair(op, "stride", stride, 1)
        ph, pw = check_pair(op, "padding", padding, 0)
        if 2 * ph > kh or 2 * pw > kw:
            fail(op, f"padding {(ph, pw)} is more than half the kernel {(kh, kw)}")
        P, Q = conv_out_size(H, kh, sh, ph), conv_out_size(W, kw, sw, pw)
        if P < 1 or Q < 1:
            fail(op, f"x {tuple(x_shape)} padded by {(ph, pw)} is smaller than the kernel {(kh, kw)}")
        return (kh, kw, sh, sw, ph, pw), (N, C, P, Q)

    def labels_in_range(self, op: str, labels: np.ndarray, classes: int) -> None:
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            row = int(np.flatnonzero((labels < 0) | (labels >= classes))[0])
            fail(op, f"label {labels[row]} (row {row}) is outside [0, {classes}), the logits' class range")

    def param_groups(self, op: str, params: list, *others: list) -> list[tuple[np.ndarray, ...]]:
        """Parallel lists -> tuples of flat in-place views, after checking lengths and shapes."""
        names = ("grads", "state", "state")
        for name, lst in zip(names, others, strict=False):
            if len(lst) != len(params):
                fail(op, f"{len(params)} params but {len(lst)} {name}")
        groups = []
        for i, group in enumerate(zip(params, *others, strict=True)):
            p = self.inplace(op, f"params[{i}]", group[0])
            flat = [p.reshape(-1)]
            for j, a in enumerate(group[1:]):
                name = f"{names[min(j, 2)]}[{i}]"
                if j == 0:
                    a = self.float_in(op, name, a, shape=p.shape)
                else:
                    a = self.inplace(op, name, a)
                    self._shape(op, name, a, None, p.shape)
                flat.append(a.reshape(-1))
            groups.append(tuple(flat))
        return groups
