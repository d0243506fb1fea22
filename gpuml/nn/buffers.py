"""Arrays reused across training steps: one per (key, shape, dtype), allocated the first time it
is asked for, so a step allocates nothing after its first run for a batch size."""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuml.backend.base import Array, Backend


class Buffers:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._arrays: dict[tuple[str, tuple[int, ...], np.dtype], Array] = {}

    def get(self, key: str, shape: tuple[int, ...], dtype: Any = None) -> Array:
        dt = self.backend.dtype if dtype is None else np.dtype(dtype)
        k = (key, tuple(shape), dt)
        buf = self._arrays.get(k)
        if buf is None:
            buf = self._arrays[k] = self.backend.empty(shape, dt)
        return buf
