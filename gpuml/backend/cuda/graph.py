"""The training step as a CUDA graph (trainer.cuda_graph): GraphRunner runs each step function
eagerly for its first WARMUP calls per key (a batch shape: the first run allocates the step's
buffers, builds launch plans and tensor tables, loads kernels), then captures it once on its
non-blocking stream and replays the graph for every later call with that key. A new batch size
is a new key: the last partial batch and evaluation get graphs of their own.

Nothing inside a captured step may allocate, synchronise, copy from pageable memory or take a
per-step value as a kernel scalar: the step reads its counters (RNG offset, batch cursor,
schedule row) from device memory and the optimizer its hyperparameters from a device table of
every step of the epoch (`set_hyper_rows`), copied into the optimizer's hyper buffer by a
launch inside the step. A graph holds raw pointers, so each keeps a reference to every array it
launched with and pins its optimizer tensor table (the LRU in optim.py skips pinned tables).

A capture that fails (an op that allocates, for instance) is reported naming the op: with
`auto` one warning line and the run goes on eagerly, with `on` a DeviceError.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gpuml.backend.base import StepRunner
from gpuml.backend.cuda.optim import HYPER_SIZE, TensorTable
from gpuml.errors import DeviceError

#: eager runs of a step key before it is captured
WARMUP = 1
_PACKAGE = Path(__file__).resolve().parents[2]


class _Graph:
    """A captured step and everything it points to (kept alive as long as the graph)."""

    def __init__(self, graph: Any, arrays: list[Any], tables: list[TensorTable]) -> None:
        self.graph, self.arrays, self.tables = graph, arrays, tables
        for table in tables:
            table.pins += 1

    def release(self) -> None:
        for table in self.tables:
            table.pins -= 1
        self.tables, self.arrays, self.graph = [], [], None


class GraphRunner(StepRunner):
    def __init__(self, backend: Any, mode: str, warn: Callable[[str], None] | None = None) -> None:
        self.backend = backend
        self.mode = mode
        self.enabled = mode in ("on", "auto")
        self.warn = warn or (lambda msg: None)
        self.failed: str | None = None  # auto after a failed capture: eager from then on
        self._stream = backend.xp.cuda.Stream(non_blocking=True)
        self._graphs: dict[Any, _Graph] = {}
        self._runs: Counter[Any] = Counter()
        self._rows: Any = None  # (capacity, HYPER_SIZE) float32: the hyperparameters of each step
        self._row_counter: Any = None
        self._tables: list[TensorTable] = []  # the optimizer tables the current step used
        #: captures made so far (tests read it)
        self.captures = 0

    # ------------------------------------------------------------------ per-step hyperparameters
    def set_hyper_rows(self, record: Callable[[int], None], count: int, row_counter: Any = None) -> None:
        if not self.enabled or self.failed or count == 0:
            return
        be = self.backend
        rows: list[np.ndarray] = []

        def tabulate(table: TensorTable, hyper: np.ndarray) -> bool:
            rows.append(np.asarray(hyper, dtype=np.float32))
            return False

        be._hyper_source = tabulate
        try:
            for i in range(count):
                record(i)
        finally:
            del be._hyper_source
        if not rows:  # nothing to update (every layer frozen): nothing to tabulate
            return
        if len(rows) != count:
            raise DeviceError(f"trainer.cuda_graph: the step made {len(rows)} optimizer updates in "
                              f"{count} steps; a captured step supports exactly one per step")
        host = np.stack(rows)
        if self._rows is None or self._rows.shape[0] < count:
            self.drop()  # the graphs point at the old table
            self._rows = be.zeros((count, HYPER_SIZE))
        padded = np.zeros(self._rows.shape, dtype=np.float32)
        padded[:count] = host
        be.upload_(self._rows, padded)
        self._row_counter = row_counter

    def _copy_row(self, table: TensorTable, hyper: np.ndarray) -> bool:
        """The optimizer launch's hyperparameters: this step's row of the device table."""
        if self._rows is None:
            raise DeviceError("trainer.cuda_graph: an optimizer update in a step without a schedule table")
        if table not in self._tables:
            self._tables.append(table)
        self.backend._launch("elementwise", "hyper_row_copy", (1, 1, 1), (32, 1, 1),
                             (self._rows, self._row_counter, table.hyper, np.int32(HYPER_SIZE)))
        return True

    @contextlib.contextmanager
    def _rows_bound(self) -> Iterator[None]:
        if self._rows is None:
            yield
            return
        self.backend._hyper_source = self._copy_row
        try:
            yield
        finally:
            del self.backend._hyper_source

    # ------------------------------------------------------------------ steps
    def stream(self) -> Any:
        return self._on_stream()

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        # Work queued on the legacy stream before (uploads, zeros) is not ordered before a
        # non-blocking stream's: wait for it once; and leave nothing pending behind.
        self.backend.xp.cuda.Device().synchronize()
        with self._stream:
            try:
                yield
            finally:
                self._stream.synchronize()

    def run(self, key: Any, fn: Callable[[], None]) -> None:
        if not self.enabled or self.failed:  # eager: the optimizer uploads its own hyperparameters
            fn()
            return
        graph = self._graphs.get(key)
        if graph is not None:
            graph.graph.launch(self._stream)
            return
        self._runs[key] += 1
        with self._rows_bound():
            if self._runs[key] <= WARMUP:
                fn()
            else:
                self._capture(key, fn)

    def _capture(self, key: Any, fn: Callable[[], None]) -> None:
        be, stream = self.backend, self._stream
        arrays: list[Any] = []
        self._tables = []
        launch = be._launch

        def keeping(family: str, name: str, grid: tuple, block: tuple, args: tuple, shared_mem: int = 0) -> None:
            arrays.extend(a for a in args if isinstance(a, be.xp.ndarray))
            launch(family, name, grid, block, args, shared_mem)

        be._launch = keeping
        runtime = be.xp.cuda.runtime
        try:
            stream.begin_capture(getattr(runtime, "streamCaptureModeGlobal", None))
            try:
                fn()
            finally:
                captured = _end_capture(stream)
            if captured is None:
                raise DeviceError("the capture was invalidated")
        except Exception as exc:  # noqa: BLE001 - reported below, never swallowed silently
            self._capture_failed(key, exc)
            fn()  # this step, eagerly: nothing captured has run
            return
        finally:
            del be._launch
        self._graphs[key] = _Graph(captured, arrays, self._tables)
        self.captures += 1
        captured.launch(stream)

    def _capture_failed(self, key: Any, exc: BaseException) -> None:
        op = _culprit(exc)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        kind = f"{key[0]} " if isinstance(key, tuple) and key and isinstance(key[0], str) else ""
        what = f"the {kind}step could not be captured as a CUDA graph: {op}: {reason}"
        if self.mode == "on":
            raise DeviceError(f"trainer.cuda_graph is on but {what}; set trainer.cuda_graph: "
                              "off (or auto) to run the steps eagerly") from None
        self.failed = what
        self.drop()
        self.warn(f"gpuml: warning: {what}; running every step eagerly (trainer.cuda_graph: auto)")

    def drop(self) -> None:
        for graph in self._graphs.values():
            graph.release()
        self._graphs.clear()
        self._runs.clear()


def _end_capture(stream: Any) -> Any:
    """The captured graph, or None when the capture was invalidated (the error is the op's)."""
    try:
        return stream.end_capture()
    except Exception:  # noqa: BLE001 - the op that invalidated it raised first
        return None


def _culprit(exc: BaseException) -> str:
    """The innermost gpuml function in the traceback (the op that could not be captured), as
    'name (gpuml/file.py:line)'; the launch and capture plumbing is skipped."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        path = Path(frame.filename).resolve()
        if _PACKAGE in path.parents and path.name not in ("graph.py", "common.py"):
            return f"{frame.name} ({path.relative_to(_PACKAGE.parent)}:{frame.lineno})"
    return f"the step ({type(exc).__name__})"
