"""User-facing errors: each one prints as a single line naming the culprit, never a traceback."""

from __future__ import annotations


class GpumlError(Exception):
    """An error the user can fix (bad config, missing data, no GPU). The CLI prints it as one
    line and exits with `exit_code`."""

    exit_code = 1


class ConfigError(GpumlError):
    """The config (file, --set override or layer list) is invalid."""

    exit_code = 2


class DataError(GpumlError):
    """A dataset file is missing, truncated or corrupt."""

    exit_code = 3


class DeviceError(GpumlError):
    """The requested device is not available (no CuPy, no GPU) or ran out of memory."""

    exit_code = 4


class ShapeError(GpumlError):
    """A layer or op received an input of the wrong shape."""

    exit_code = 2


class TrainingDiverged(GpumlError):
    """The loss became NaN or Inf."""

    exit_code = 5
