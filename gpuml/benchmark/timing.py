"""Timers: medians of repeated calls after warm-up, with the cache flushed between repeats.

Discipline (after llm.c's dev/cuda/common.h): warm up first (JIT compilation, allocator growth,
cuDNN/oneDNN algorithm selection all happen there), flush the last-level cache before every timed
repeat by writing a buffer twice its size (so small inputs are not served from a warm cache that
a real step would not give them), and report the median, which one slow repeat (a context switch,
a clock change) cannot move.

On the host, each repeat is timed with `time.perf_counter` around the call. On a GPU, each repeat
is bracketed by two CUDA events recorded on the current stream, with the flush launched on the
same stream before the start event, and all events are read after one final synchronisation:
nothing in the loop waits for the GPU, so the timings hold kernel time, not Python overhead.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Stats:
    """Summary of one implementation's repeats, in seconds."""

    median_s: float
    min_s: float
    q1_s: float
    q3_s: float
    repeats: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def median(values: list[float]) -> float:
    """The middle value; the mean of the two middle values for an even count."""
    if not values:
        raise ValueError("median of no values")
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default method), q in [0, 1]."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(times: list[float]) -> Stats:
    return Stats(median(times), min(times), quantile(times, 0.25), quantile(times, 0.75), len(times))


def repeat_count(first_s: float, budget_s: float, min_repeats: int, max_repeats: int) -> int:
    """How many timed repeats fit `budget_s` given one call takes `first_s`, within the bounds."""
    if first_s <= 0:
        return max_repeats
    fits = int(budget_s / first_s + 1e-9)  # + 1e-9: 1.0 / 0.1 is 9.999... in binary
    return min(max_repeats, max(min_repeats, fits))


@dataclass(frozen=True)
class TimingPlan:
    """How hard to measure: warm-up calls, repeat bounds, and the time budget per implementation."""

    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 100
    budget_s: float = 0.5


# ------------------------------------------------------------------------------------- host
class HostCacheFlusher:
    """Writes a buffer of `nbytes` (twice the last-level cache) so that cached inputs are evicted."""

    def __init__(self, nbytes: int) -> None:
        self.buffer = np.empty(max(nbytes // 4, 1), dtype=np.float32)
        self._value = 0.0

    def __call__(self) -> None:
        self._value += 1.0  # a new value each time: every line is really written
        self.buffer.fill(self._value)


def time_host(fn: Callable[[], Any], plan: TimingPlan, *, flush: Callable[[], None] | None = None,
              clock: Callable[[], float] = time.perf_counter) -> Stats:
    """Median-of-repeats wall time of `fn()` on the host (CPU backend, NumPy, PyTorch CPU)."""
    return time_host_interleaved({"fn": fn}, plan, flush=flush, clock=clock)["fn"]


#: calls shorter than this get one untimed call before each block of repeats (see below)
SETTLE_BELOW_S = 0.05
BLOCKS = 3


def time_host_interleaved(fns: dict[str, Callable[[], Any]], plan: TimingPlan, *,
                          flush: Callable[[], None] | None = None,
                          clock: Callable[[], float] = time.perf_counter) -> dict[str, Stats]:
    """Time several implementations of one op, alternating between them in blocks of repeats.

    Alternating spreads a disturbance from another process (a shared machine) over all of them,
    so their ratios stay meaningful. Blocks rather than single calls, each opened by one untimed
    call for short ops: on a machine with few cores, the first call after another thread pool ran
    (OpenBLAS after PyTorch's OpenMP, or the reverse) waits for that pool's spinning threads to
    yield the cores, a cost a training step never pays, which the untimed call absorbs.
    The slowest implementation's first repeat sets the repeat count."""
    for fn in fns.values():
        for _ in range(plan.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}

    def timed(name: str) -> None:
        if flush:
            flush()
        t0 = clock()
        fns[name]()
        times[name].append(clock() - t0)

    for name in fns:
        timed(name)
    n = repeat_count(max(t[0] for t in times.values()), plan.budget_s, plan.min_repeats, plan.max_repeats)
    blocks = min(BLOCKS, n - 1)
    per_block = -(-(n - 1) // blocks) if blocks else 0
    for _ in range(blocks):
        for name, fn in fns.items():
            if len(times[name]) >= n:
                continue
            if times[name][0] < SETTLE_BELOW_S:
                fn()
            for _ in range(min(per_block, n - len(times[name]))):
                timed(name)
    return {name: summarize(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------- CUDA
class CudaEvents:
    """CUDA events of one library ("cupy" or "torch"); both record on that library's current
    stream, which is the legacy default stream unless the caller changed it."""

    def __init__(self, lib: str) -> None:
        self.lib = lib
        if lib == "cupy":
            import cupy

            self._cupy = cupy
        elif lib == "torch":
            import torch

            self._torch = torch
        else:
            raise ValueError(f"unknown CUDA library {lib!r}")

    def event(self) -> Any:
        if self.lib == "cupy":
            return self._cupy.cuda.Event()
        return self._torch.cuda.Event(enable_timing=True)

    def elapsed_s(self, start: Any, end: Any) -> float:
        if self.lib == "cupy":
            return self._cupy.cuda.get_elapsed_time(start, end) / 1e3
        return start.elapsed_time(end) / 1e3

    def synchronize(self) -> None:
        if self.lib == "cupy":
            self._cupy.cuda.Device().synchronize()
        else:
            self._torch.cuda.synchronize()


class CudaCacheFlusher:
    """Writes (memsets) a device buffer of `nbytes` (twice the L2) on the current stream."""

    def __init__(self, lib: str, nbytes: int) -> None:
        self.lib, self.nbytes = lib, nbytes
        if lib == "cupy":
            import cupy

            self.buffer = cupy.empty(nbytes, dtype=cupy.uint8)
        else:
            import torch

            self.buffer = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        self._value = 0

    def __call__(self) -> None:
        self._value = (self._value + 1) % 256
        if self.lib == "cupy":
            self.buffer.data.memset_async(self._value, self.nbytes)
        else:
            self.buffer.fill_(self._value)


def time_cuda(fn: Callable[[], Any], plan: TimingPlan, events: CudaEvents, *,
              flush: Callable[[], None] | None = None) -> Stats:
    """Median-of-repeats GPU time of `fn()` (which only launches work) from CUDA events."""
    for _ in range(plan.warmup):
        fn()
    if flush:
        flush()
    start, end = events.event(), events.event()
    start.record()
    fn()
    end.record()
    events.synchronize()
    first = events.elapsed_s(start, end)
    n = repeat_count(first, plan.budget_s, plan.min_repeats, plan.max_repeats)
    pairs = [(events.event(), events.event()) for _ in range(n - 1)]
    for a, b in pairs:
        if flush:
            flush()
        a.record()
        fn()
        b.record()
    events.synchronize()
    return summarize([first] + [events.elapsed_s(a, b) for a, b in pairs])
