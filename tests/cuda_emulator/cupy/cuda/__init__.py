"""cupy.cuda of the emulator: one device, named so that no output passes for a GPU's.

Streams and graph capture (CuPy's API): `with Stream(non_blocking=True) as s:` makes `s` current;
`s.begin_capture()` starts recording: kernel launches and copies from pinned host memory on the
current stream become nodes of the graph `s.end_capture()` returns, and `graph.launch(stream)`
runs them again. As on a GPU, nothing recorded runs at capture time, and a capture fails (the
call raises CUDARuntimeError and end_capture reports the capture invalidated) when something
allocates device memory, synchronises, or copies from pageable host memory inside it.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from .._emu import CompileException, CUDADriverError

DEVICE_NAME = b"CPU emulator (not a GPU)"


class Device:
    def __init__(self, device: int = 0) -> None:
        self.id = device
        # The architecture the kernels would be built for; the emulator builds for the host.
        self.compute_capability = "90"

    def synchronize(self) -> None:
        fail_if_capturing("Device.synchronize")


class CUDARuntimeError(RuntimeError):
    pass


class Stream:
    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
        self.non_blocking = non_blocking
        self._nodes: list[Any] | None = None  # the capture in progress
        self._invalidated: str | None = None

    def __enter__(self) -> Stream:
        _stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _stack.pop()

    def synchronize(self) -> None:
        fail_if_capturing("Stream.synchronize")

    def is_capturing(self) -> bool:
        return self._nodes is not None

    def begin_capture(self, mode: int | None = None) -> None:
        if capturing_stream() is not None:
            raise CUDARuntimeError("cudaErrorIllegalState: a capture is already in progress")
        if self is _NULL:
            raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported: the legacy stream cannot be captured")
        self._nodes, self._invalidated = [], None

    def end_capture(self) -> Graph:
        if self._nodes is None:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is not capturing")
        nodes, invalidated, self._nodes, self._invalidated = self._nodes, self._invalidated, None, None
        if invalidated:
            raise CUDARuntimeError(f"cudaErrorStreamCaptureInvalidated: {invalidated}")
        return Graph(nodes)

    def _record(self, node: Any) -> None:
        assert self._nodes is not None
        self._nodes.append(node)


class Graph:
    def __init__(self, nodes: list[Any]) -> None:
        self.nodes = nodes

    def launch(self, stream: Stream | None = None) -> None:
        for node in self.nodes:
            node.run()

    def upload(self, stream: Stream | None = None) -> None:
        pass


class CopyNode:
    """A captured host-to-device copy from pinned memory: reads the host buffer at each replay."""

    def __init__(self, dst: Any, src: np.ndarray) -> None:
        import weakref

        from .. import _allocation

        self.dst_ptr, self.src, self.nbytes = dst.data.ptr, src, dst.nbytes
        self.buffer = weakref.ref(_allocation(dst))
        if src.nbytes != dst.nbytes:
            raise ValueError(f"copy of {src.nbytes} bytes into {dst.nbytes}")

    def run(self) -> None:
        if self.buffer() is None:
            raise CUDADriverError("a captured copy's destination was freed after the graph was captured")
        ctypes.memmove(self.dst_ptr, self.src.ctypes.data, self.nbytes)


class Event:
    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False) -> None:
        pass

    def record(self, stream: Stream | None = None) -> None:
        pass

    def synchronize(self) -> None:
        fail_if_capturing("Event.synchronize")

    @property
    def done(self) -> bool:
        return True


_NULL = Stream(null=True)
_stack: list[Stream] = []


def get_current_stream() -> Stream:
    return _stack[-1] if _stack else _NULL


def capturing_stream() -> Stream | None:
    """The stream capturing now, if any (the emulator has one thread: a capture is global)."""
    return next((s for s in _stack if s._nodes is not None), None)


def fail_if_capturing(what: str) -> None:
    stream = capturing_stream()
    if stream is not None:
        stream._invalidated = stream._invalidated or f"{what} during stream capture"
        raise CUDARuntimeError(f"cudaErrorStreamCaptureUnsupported: {what} is not permitted when stream is capturing")


# Pinned host allocations (cupy.cuda.alloc_pinned_memory): (address, size, buffer), kept for the
# process's life (a test tool).
_pinned: list[tuple[int, int, bytearray]] = []


def alloc_pinned_memory(nbytes: int) -> bytearray:
    buf = bytearray(max(1, int(nbytes)))
    _pinned.append((np.frombuffer(buf, dtype=np.uint8).ctypes.data, len(buf), buf))
    return buf


def is_pinned(a: np.ndarray) -> bool:
    p = a.ctypes.data
    return any(start <= p and p + a.nbytes <= start + size for start, size, _ in _pinned)


class runtime:  # noqa: N801 - CuPy's module name
    @staticmethod
    def getDeviceCount() -> int:  # noqa: N802
        return 1

    @staticmethod
    def getDeviceProperties(device: int) -> dict[str, Any]:  # noqa: N802
        return {"name": DEVICE_NAME, "multiProcessorCount": 1, "totalGlobalMem": 0, "major": 9, "minor": 0}

    CUDARuntimeError = CUDARuntimeError
    streamCaptureModeGlobal = 0  # noqa: N815
    streamCaptureModeThreadLocal = 1  # noqa: N815
    streamCaptureModeRelaxed = 2  # noqa: N815

    @staticmethod
    def deviceSynchronize() -> None:  # noqa: N802
        fail_if_capturing("cudaDeviceSynchronize")


class driver:  # noqa: N801
    CUDADriverError = CUDADriverError


class compiler:  # noqa: N801
    CompileException = CompileException
