"""The gradient all-reduce of a data-parallel step, the ChainerMN pure-NCCL design: every
gradient is packed into ONE contiguous buffer, the buffer is scaled by this rank's share of the
global batch, summed over the ranks in one all-reduce, and unpacked into the gradients.

Packing uses only backend ops with `out=` views of a buffer allocated once (copy_, scale_), so on
CUDA the whole hook (pack, NCCL all-reduce on the current stream, unpack) allocates nothing,
never synchronises, and is captured into the step's CUDA graph like any other launch. The scale
is a kernel argument: it only changes with the batch's shape (the short last batch), which is a
different graph anyway.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gpuml.distributed.shard import shard_bounds

if TYPE_CHECKING:
    from gpuml.backend.base import Array, Backend
    from gpuml.data.loader import BatchIterator


class PackedGradients:
    """A flat buffer with a view per gradient, in the gradients' order."""

    def __init__(self, backend: Backend, grads: list[Array]) -> None:
        self.backend = backend
        self.grads = list(grads)
        self.size = sum(int(math.prod(g.shape)) for g in self.grads)
        self.buffer = backend.zeros((self.size,))
        self.views: list[Array] = []
        offset = 0
        for g in self.grads:
            n = int(math.prod(g.shape))
            self.views.append(self.buffer[offset:offset + n].reshape(g.shape))
            offset += n

    @property
    def nbytes(self) -> int:
        return self.size * self.buffer.dtype.itemsize

    def pack(self, scale: float) -> Array:
        be = self.backend
        for view, g in zip(self.views, self.grads):
            be.copy_(view, g)
        if scale != 1.0:
            be.scale_(self.buffer, scale)
        return self.buffer

    def unpack(self) -> None:
        for view, g in zip(self.views, self.grads):
            self.backend.copy_(g, view)


class GradientAllreduce:
    """The step hook: pack (scaled by local rows / global rows), all-reduce, unpack. Keeps the
    host time spent in the all-reduce call (on CPU, the collective itself; on CUDA, only the
    enqueue) for `gpuml bench train --ranks`."""

    def __init__(self, packed: PackedGradients, reduce: Callable[[Any], None], batches: BatchIterator) -> None:
        self.packed, self.reduce, self.batches = packed, reduce, batches
        self.seconds = 0.0
        self.calls = 0

    def share(self) -> float:
        """This rank's rows / the global batch's rows, for the batch last handed out."""
        rows = self.batches.batch_rows
        lo, hi = shard_bounds(rows, self.batches.shard[0], self.batches.shard[1])
        return (hi - lo) / rows

    def __call__(self) -> None:
        buf = self.packed.pack(self.share())
        t0 = time.perf_counter()
        self.reduce(buf)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.packed.unpack()
