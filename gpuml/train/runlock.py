"""One process per run folder: an exclusive flock on RUN/.lock, held while training.

The kernel drops a flock when its holder exits in any way (kill -9 included), so a lock is never
stale and there is nothing to clean up by hand. The holder writes its pid, host and start time
into the file for the error another process prints. Within one process the lock is re-entrant
(the CLI takes it before writing config.yaml, Trainer.fit takes it again).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from gpuml.distributed import world
from gpuml.errors import RunError, RunLockedError

try:
    import fcntl
except ImportError:  # not POSIX: no locking rather than no training
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
_held: dict[str, tuple[int, int]] = {}  # resolved run folder -> (fd, depth) in this process


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']} (since {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"  # it has the lock but has not written its details yet


def _acquire(run_dir: Path) -> int:
    path = run_dir / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(f"{run_dir} is in use by {_holder(path)}: one process per run "
                                 f"folder (wait for it, or stop it and --resume)") from None
        # A holder that removed the file on release may have done so between our open and our
        # flock: then we locked a deleted inode, and must lock the file that is there now.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return fd


@contextlib.contextmanager
def hold_run_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN/.lock (creating RUN if needed) for the block; RunLockedError names the holder.
    A run folder this call created and that is still empty but for the lock is removed again,
    so a run that fails before writing anything leaves no trace."""
    run_dir = Path(run_dir)
    if fcntl is None or not world().is_root:  # of data-parallel ranks, rank 0 holds the folder
        yield
        return
    created = not run_dir.exists()
    key = str(run_dir.resolve())
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
    else:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = _acquire(run_dir)
        except (FileExistsError, NotADirectoryError, PermissionError) as exc:
            raise RunError(f"{run_dir}: cannot use as a run folder ({exc.strerror}: "
                           f"{exc.filename})") from None
        _held[key] = (fd, 1)
    try:
        yield
    finally:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
        else:
            del _held[key]
            if created and [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
                with contextlib.suppress(OSError):
                    (run_dir / LOCK_NAME).unlink()
                    run_dir.rmdir()
            os.close(fd)  # releases the flock
