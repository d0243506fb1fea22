"""User-facing errors: each one prints as a single line naming the culprit, never a traceback."""

from __future__ import annotations


class GpumlError(Exception):
    """An error the user can fix (bad config, missing data, no GPU). The CLI prints it as one
    line and exits with `exit_code`. Every subclass has its own documented code; 1 is left for
    errors with no better class (and is what Python itself exits with on a bug)."""

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


class DiskFullError(GpumlError):
    """A write failed for lack of space (or quota); the file's previous version is intact."""

    exit_code = 6


class RunLockedError(GpumlError):
    """Another process holds the run folder (it is training in it now)."""

    exit_code = 7


class RunError(GpumlError):
    """A run folder, checkpoint or weights file that was asked for is missing or damaged, or a
    run folder is not what the command needs (--out naming a folder that already holds a run)."""

    exit_code = 8


class Interrupted(GpumlError):
    """Training stopped on a signal after saving a checkpoint: 130 for Ctrl-C (SIGINT), 143 for
    SIGTERM, the shell's 128 + signal number convention."""

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
