"""Atomic file creation: the final name only ever holds a complete, flushed file.

A full disk (or quota) is translated into DiskFullError naming the file; the temporary file is
removed, so the previous version of the file and every other file stay as they were."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from gpuml.errors import DiskFullError

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an out-of-space OSError raised inside the block into DiskFullError naming `path`
    (write(2) errors carry no file name of their own)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        # "no space left on device" or "disk quota exceeded"
        raise DiskFullError(f"{path}: {os.strerror(exc.errno).lower()}") from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temporary file next to `path` for binary writing; on a clean exit it is fsynced
    and renamed over `path`, on an exception it is deleted. The temp file lives in the same
    folder so that os.replace is a rename within one file system (atomic on POSIX)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        # os.replace would put a file where a folder's name or a device node (/dev/null, as
        # root) was, or fail late with a temp-file name in the message
        what = "is a folder" if path.is_dir() else "exists and is not a regular file"
        raise OSError(errno.EEXIST, f"{what}; name the file to write", str(path))
    with disk_full_as_error(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o666 & ~current_umask())  # mkstemp makes it 0600
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    _fsync_dir(path.parent)


def current_umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere it can only be read by setting
    it, so it is set back at once (another thread creating a file in between would get 0o022)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files of writes that a killed process left in `folder`; only for a
    folder no other process writes to (a locked run folder). Returns what was removed."""
    stale = [p for p in folder.glob(".*.part") if p.is_file()] if folder.is_dir() else []
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform or file system allows it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
