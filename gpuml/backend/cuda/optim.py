"""Multi-tensor ops of the CUDA backend: the optimizer updates and global_norm, each ONE launch
for a whole list of tensors (kernels/optim.cu, kernels/elementwise.cu sum_squares_partial).

A list of tensors becomes a device "tensor table" (slot-major float pointers + int64 prefix
offsets, see kernels/optim.cu), built on the first call for that list of buffers and cached:
later steps on the same buffers upload nothing but the 36-byte hyperparameter vector, which an
async copy from a pinned staging ring refreshes before the launch (the kernel reads lr, bias
corrections... from device memory). Inside a training step run by graph.GraphRunner the vector
comes instead from a device table of every step's hyperparameters (`_hyper_source`), so a
captured CUDA graph stays valid as they change. A table a live graph points to is pinned: the
LRU never drops it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from gpuml.backend.base import Array
from gpuml.backend.cuda.launch import THREADS, grid_1d, partials_grid
from gpuml.errors import ShapeError

# kernels/optim.cu hyper layout
HYPER_SIZE = 9
HYPER_LR, HYPER_WEIGHT_DECAY, HYPER_BETA1, HYPER_BETA2, HYPER_EPS = 0, 1, 2, 3, 4
HYPER_MOMENTUM = HYPER_ALPHA = HYPER_BETA1
HYPER_BIAS_CORRECTION1, HYPER_BIAS_CORRECTION2 = 5, 6
#: 1 - beta1 (or 1 - alpha) and 1 - beta2, formed in float64 here: the kernel cannot recover
#: them from the float32 betas (1 - 0.999f is 1.3e-5 relatively off 1e-3)
HYPER_ONE_MINUS_BETA1 = HYPER_ONE_MINUS_ALPHA = 7
HYPER_ONE_MINUS_BETA2 = 8
#: tensor tables kept per backend (oldest unpinned dropped first)
MAX_TABLES = 64
#: pinned staging slots per table: set_hyper waits only for the copy made this many calls ago
STAGING_SLOTS = 4


def hyper_vector(**values: float) -> np.ndarray:
    """The float32 hyper buffer contents: hyper_vector(lr=0.1, weight_decay=0.0, ...)."""
    index = {
        "lr": HYPER_LR, "weight_decay": HYPER_WEIGHT_DECAY, "beta1": HYPER_BETA1,
        "momentum": HYPER_MOMENTUM, "alpha": HYPER_ALPHA, "beta2": HYPER_BETA2, "eps": HYPER_EPS,
        "bias_correction1": HYPER_BIAS_CORRECTION1, "bias_correction2": HYPER_BIAS_CORRECTION2,
        "one_minus_beta1": HYPER_ONE_MINUS_BETA1, "one_minus_alpha": HYPER_ONE_MINUS_ALPHA,
        "one_minus_beta2": HYPER_ONE_MINUS_BETA2,
    }  # fmt: skip
    h = np.zeros(HYPER_SIZE, dtype=np.float32)
    for name, value in values.items():
        h[index[name]] = value
    return h


class TensorTable:
    """Device-side view of parallel tensor lists: `table` (num_slots * T pointers, slot-major),
    `offsets` (T + 1 int64), and the hyper buffer of the optimizer using it."""

    def __init__(self, xp: Any, slots: list[list[Array]]) -> None:
        count = len(slots[0])
        ptrs = np.array([a.data.ptr for slot in slots for a in slot], dtype=np.uint64)
        sizes = np.array([a.size for a in slots[0]], dtype=np.int64)
        offsets = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        self.num_tensors = np.int32(count)
        self.total = int(offsets[-1])
        self.table = xp.asarray(ptrs)
        self.offsets = xp.asarray(offsets)
        self.hyper = xp.zeros(HYPER_SIZE, dtype=np.float32)
        self._xp = xp
        #: live CUDA graphs using this table (graph.py): the LRU keeps it while > 0
        self.pins = 0
        self._staging: list[tuple[np.ndarray, Any]] = []
        self._next_slot = 0

    def set_hyper(self, values: np.ndarray) -> None:
        """Queue the copy of `values` into the hyper buffer on the current stream. The source is
        a slot of a pinned ring (a copy from pageable memory may synchronise); each slot's event
        says when its last copy has read it, so the host waits only when it runs STAGING_SLOTS
        steps ahead of the device."""
        xp = self._xp
        if len(self._staging) < STAGING_SLOTS:
            mem = xp.cuda.alloc_pinned_memory(HYPER_SIZE * 4)
            slot = (np.frombuffer(mem, np.float32, HYPER_SIZE), xp.cuda.Event(disable_timing=True))
            self._staging.append(slot)
            self._pinned_memory = [*getattr(self, "_pinned_memory", []), mem]  # the array's owner
        else:
            slot = self._staging[self._next_slot]
            slot[1].synchronize()
        self._next_slot = (self._next_slot + 1) % STAGING_SLOTS
        host, copied = slot
        host[...] = values
        stream = xp.cuda.get_current_stream()
        self.hyper.set(host, stream=stream)
        copied.record(stream)


class MultiTensorOps:
    """sgd/momentum/adam/rmsprop steps and global_norm for CudaBackend (which provides
    `_dev_in`, `_launch`, `_scratch` and `xp`)."""

    xp: Any

    def _tensor_table(self, op: str, slots: list[list[Array]]) -> TensorTable:
        # The step calls this every iteration with the same arrays: a table found under the
        # same pointers, sizes and dtypes was checked when it was built, so the per-tensor checks
        # run only then (they cost more than the launch at small batch sizes).
        key = (op, tuple(len(slot) for slot in slots),
               tuple((getattr(a.data, "ptr", None), a.size, a.dtype.char) for slot in slots for a in slot))
        tables: OrderedDict = self.__dict__.setdefault("_tensor_tables", OrderedDict())
        table = tables.get(key)
        if table is not None:
            tables.move_to_end(key)
            return table
        names = ("params", "grads", "state", "state")
        params = slots[0]
        if not params:
            raise ShapeError(f"{op}: the parameter list is empty")
        for j, lst in enumerate(slots[1:], start=1):
            if len(lst) != len(params):
                raise ShapeError(f"{op}: {len(params)} params but {len(lst)} {names[min(j, 3)]}")
        for i, group in enumerate(zip(*slots, strict=True)):
            p = self._dev_in(op, f"params[{i}]", group[0])
            for j, a in enumerate(group[1:], start=1):
                self._dev_in(op, f"{names[min(j, 3)]}[{i}]", a, shape=p.shape)
        table = tables[key] = TensorTable(self.xp, slots)
        if len(tables) > MAX_TABLES:
            oldest = next((k for k, t in tables.items() if not t.pins), None)
            if oldest is not None:
                del tables[oldest]
        return table

    def _grad_scale(self, grad_scale: Array | None) -> Array:
        """The kernels' gradient multiplier: the caller's 0-d factor, or a device 1.0 (made once)."""
        if grad_scale is not None:
            return self._dev_in("grad_scale", "grad_scale", grad_scale, shape=())
        one = self.__dict__.get("_unit_grad_scale")
        if one is None:
            one = self._unit_grad_scale = self.xp.zeros((), dtype=np.float32)
            one.fill(1.0)
        return one

    def _optimizer_launch(self, name: str, table: TensorTable, hyper: np.ndarray, *extra: Any,
                          grad_scale: Array | None = None) -> None:
        if table.total == 0:
            return
        scale = self._grad_scale(grad_scale)
        source = self.__dict__.get("_hyper_source")  # set by graph.GraphRunner around a step
        if source is not None:
            if not source(table, hyper):
                return  # tabulating the schedule: nothing runs
        else:
            table.set_hyper(hyper)
        self._launch(
            "optim", name, grid_1d(table.total), (THREADS, 1, 1),
            (table.table, table.offsets, table.num_tensors, table.hyper, scale, *extra),
        )  # fmt: skip

    def sgd_step(self, params: list[Array], grads: list[Array], *, lr: float, weight_decay: float = 0.0,
                 grad_scale: Array | None = None) -> None:
        table = self._tensor_table("sgd_step", [params, grads])
        self._optimizer_launch("sgd_step", table, hyper_vector(lr=lr, weight_decay=weight_decay),
                               grad_scale=grad_scale)

    def momentum_step(
        self,
        params: list[Array],
        grads: list[Array],
        velocities: list[Array],
        *,
        lr: float,
        momentum: float,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        grad_scale: Array | None = None,
    ) -> None:
        table = self._tensor_table("momentum_step", [params, grads, velocities])
        hyper = hyper_vector(lr=lr, weight_decay=weight_decay, momentum=momentum)
        self._optimizer_launch("momentum_step", table, hyper, np.int32(bool(nesterov)), grad_scale=grad_scale)

    def adam_step(
        self,
        params: list[Array],
        grads: list[Array],
        m: list[Array],
        v: list[Array],
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        step: int,
        weight_decay: float = 0.0,
        decoupled: bool = False,
        grad_scale: Array | None = None,
    ) -> None:
        if step < 1:
            raise ValueError(f"adam_step: step is 1-based, got {step}")
        table = self._tensor_table("adam_step", [params, grads, m, v])
        hyper = hyper_vector(
            lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps,
            bias_correction1=1.0 - beta1**step, bias_correction2=1.0 - beta2**step,
            one_minus_beta1=1.0 - beta1, one_minus_beta2=1.0 - beta2,
        )  # fmt: skip
        self._optimizer_launch("adam_step", table, hyper, np.int32(bool(decoupled)), grad_scale=grad_scale)

    def rmsprop_step(
        self,
        params: list[Array],
        grads: list[Array],
        sq: list[Array],
        *,
        lr: float,
        alpha: float,
        eps: float,
        weight_decay: float = 0.0,
        grad_scale: Array | None = None,
    ) -> None:
        table = self._tensor_table("rmsprop_step", [params, grads, sq])
        hyper = hyper_vector(lr=lr, weight_decay=weight_decay, alpha=alpha, eps=eps, one_minus_alpha=1.0 - alpha)
        self._optimizer_launch("rmsprop_step", table, hyper, grad_scale=grad_scale)

    def global_norm(self, arrays: list[Array]) -> Array:
        """sqrt of the sum of squares of every element, deterministic (fixed partial grid,
        double accumulation). Allocates its 0-d result (the protocol has no out=)."""
        return self._global_norm_into(arrays, self.xp.zeros((), dtype=np.float32))

    def clip_grad_norm_(self, grads: list[Array], max_norm: float) -> Array:
        """As Backend.clip_grad_norm_, in 3 + len(grads) launches and no host round trip; the
        returned norm is a scratch view, valid until the next call."""
        norm = self._scratch("clip_norm", 1).reshape(())
        factor = self._scratch("clip_factor", 1)
        self._global_norm_into(grads, norm)
        self._launch("elementwise", "clip_factor", (1, 1, 1), (1, 1, 1), (norm, factor, np.float32(max_norm)))
        for g in grads:
            if g.size:
                self._launch("elementwise", "scale_inplace_by_device", grid_1d(g.size), (THREADS, 1, 1),
                             (g, factor, np.int64(g.size)))
        return norm

    def grad_clip_factor(self, grads: list[Array], max_norm: float) -> tuple[Array, Array]:
        """As Backend.grad_clip_factor, in ONE launch (optim.cu grad_clip_factor: the norm's
        partials added by the last block, in block order); both results are scratch views,
        valid until the next call."""
        norm = self._scratch("clip_norm", 1).reshape(())
        factor = self._scratch("clip_factor", 1).reshape(())
        table = self._tensor_table("global_norm", [grads])
        if table.total == 0:
            norm.fill(0)
            factor.fill(1)
            return norm, factor
        grid = partials_grid(table.total)
        self._launch("optim", "grad_clip_factor", grid, (THREADS, 1, 1), (
            table.table, table.offsets, table.num_tensors, self._scratch("norm_partials", grid[0], np.float64),
            self._tickets(1), norm, factor, np.float32(max_norm)))  # fmt: skip
        return norm, factor

    def _global_norm_into(self, arrays: list[Array], out: Array) -> Array:
        table = self._tensor_table("global_norm", [arrays])
        if table.total == 0:
            out.fill(0)
            return out
        grid = partials_grid(table.total)
        partials = self._scratch("norm_partials", grid[0], np.float64)
        self._launch(
            "elementwise", "sum_squares_partial", grid, (THREADS, 1, 1),
            (table.table, table.offsets, table.num_tensors, partials),
        )  # fmt: skip
        self._launch(
            "elementwise", "sum_partials_final", (1, 1, 1), (THREADS, 1, 1),
            (partials, np.int32(grid[0]), out, np.float64(1.0), np.int32(1)),
        )  # fmt: skip
        return out
