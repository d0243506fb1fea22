"""cupy.cuda of the emulator: one device, named so that no output passes for a GPU's."""

from __future__ import annotations

from typing import Any

from .._emu import CompileException, CUDADriverError

DEVICE_NAME = b"CPU emulator (not a GPU)"


class Device:
    def __init__(self, device: int = 0) -> None:
        self.id = device
        # The architecture the kernels would be built for; the emulator builds for the host.
        self.compute_capability = "90"

    def synchronize(self) -> None:
        pass


class Stream:
    def synchronize(self) -> None:
        pass


def get_current_stream() -> Stream:
    return Stream()


class runtime:  # noqa: N801 - CuPy's module name
    @staticmethod
    def getDeviceCount() -> int:  # noqa: N802
        return 1

    @staticmethod
    def getDeviceProperties(device: int) -> dict[str, Any]:  # noqa: N802
        return {"name": DEVICE_NAME, "multiProcessorCount": 1, "totalGlobalMem": 0, "major": 9, "minor": 0}

    @staticmethod
    def deviceSynchronize() -> None:  # noqa: N802
        pass


class driver:  # noqa: N801
    CUDADriverError = CUDADriverError


class compiler:  # noqa: N801
    CompileException = CompileException
