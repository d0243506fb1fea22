"""augment_images of the CUDA backend (mixed into CudaBackend): one launch of
kernels/augment.cu's augment_affine. The contract is gpuml/backend/augment.py."""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuml.backend.base import Array
from gpuml.backend.cuda import launch as plan


class AugmentOps:
    def augment_images(
        self: Any,
        x: Array,
        *,
        seed: int,
        offset: int,
        offset_counter: Array | None = None,
        max_shift: float,
        max_rotate: float,
        max_scale: float,
        hflip: bool,
        fill: float,
        out: Array | None = None,
    ) -> Array:
        op = "augment_images"
        x = self._dev_in(op, "x", x, ndim=4)
        out = self._dev_out(op, "out", out, x.shape, x=x)  # refused when it overlaps x
        n, c, h, w = x.shape
        host_offset, offset_at = self._offset_args(op, "offset", offset, offset_counter, 5 * n)
        if x.size:
            self._launch("augment", "augment_affine", plan.grid_1d(n * h * w), (plan.THREADS, 1, 1), (
                x, out, np.int32(n), np.int32(c), np.int32(h), np.int32(w),
                np.uint64(seed & 0xFFFFFFFFFFFFFFFF), host_offset, offset_at,
                np.float64(max_shift), np.float64(max_rotate / 180.0), np.float64(max_scale),
                np.int32(bool(hflip)), np.float32(fill)))  # fmt: skip
        return out
