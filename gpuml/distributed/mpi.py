"""The multi-rank World over mpi4py (imported only here, only when several ranks run).

No hang when a rank fails:
- a rank that raises runs `exit_code`: it waits a few seconds on a barrier of its own
  communicator (every rank failing alike, e.g. the same config error, exits cleanly and rank 0
  prints the message once); if the others do not arrive (they are training, blocked in a
  collective this rank will never join), it prints its error naming itself and calls
  MPI_Abort, which ends every rank.
- an uncaught exception (a bug) does the same through sys.excepthook.
- a rank killed outright (kill -9) is seen by the launcher, which ends the others (checked with
  MPICH 5.0.2's hydra and Open MPI 5.0.11's prterun from PyPI: within about a second).
- a rank that hangs without dying: a watchdog thread aborts every rank when a collective has
  waited longer than $GPUML_MPI_TIMEOUT seconds (default 300).
- a rank that died before MPI_Init: the others give up waiting there after INIT_TIMEOUT_S.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import mpi4py
import numpy as np

from gpuml.distributed.world import World
from gpuml.errors import ConfigError, DeviceError

# No automatic MPI_Finalize at exit: it waits for every rank, so a rank leaving on its own would
# hang in it while the others wait in a collective. MpiWorld._at_exit finalizes after a barrier
# (under the watchdog) that every rank leaving normally reaches; a rank that aborts never does.
mpi4py.rc.finalize = False
# MPI_Init waits (holding the GIL, so no Python thread can watch it) for every rank to start; a
# rank that failed before it would leave the others there for ever. faulthandler's C watchdog
# prints where it waited and exits, which makes the launcher end the job.
INIT_TIMEOUT_S = 60
faulthandler.dump_traceback_later(INIT_TIMEOUT_S, exit=True)
from mpi4py import MPI  # noqa: E402  (MPI_Init)

faulthandler.cancel_dump_traceback_later()

if TYPE_CHECKING:
    from gpuml.backend.base import Array, Backend
    from gpuml.data.loader import BatchIterator

T = TypeVar("T")

#: seconds a failing rank waits for the others to fail alike before aborting them
EXIT_WAIT_S = 5.0
_OPS = {"sum": MPI.SUM, "max": MPI.MAX}


def collective_timeout() -> float:
    value = os.environ.get("GPUML_MPI_TIMEOUT", "300")
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ConfigError(f"GPUML_MPI_TIMEOUT={value!r}: expected a positive number of seconds")
    return seconds


class MpiWorld(World):
    def __init__(self, comm: Any = None) -> None:
        self.comm = comm or MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        self.local_rank, self.local_size = self.local.Get_rank(), self.local.Get_size()
        self.cores: list[int] | None = None  # this rank's share of the machine's cores (CPU)
        self._exit_comm = self.comm.Dup()  # the exit barrier never meets a training collective
        self.timeout = collective_timeout()
        self._waiting: tuple[str, float] | None = None
        self._aborting = False
        threading.Thread(target=self._watchdog, name="gpuml-mpi-watchdog", daemon=True).start()
        self._previous_hook = sys.excepthook
        sys.excepthook = self._excepthook
        atexit.register(self._at_exit)
        # Who is who: the launcher names a killed rank by its pid.
        with self.waiting("start-up"):
            self.members = self.comm.allgather((os.getpid(), socket.gethostname()))

    def describe(self) -> str:
        who = ", ".join(f"rank {r} pid {pid} on {host}" for r, (pid, host) in enumerate(self.members))
        lib = " ".join(MPI.Get_library_version().split()[:3]).rstrip(",")  # "MPICH Version: 5.0.2"
        cores = f", {len(self.cores)} core{'s' if len(self.cores) != 1 else ''} each" if self.cores else ""
        return f"; {self.size} ranks{cores} ({who}; {lib})"

    # -------------------------------------------------------------- primitives
    @contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Mark a blocking collective for the watchdog."""
        self._waiting = (what, time.monotonic())
        try:
            yield
        finally:
            self._waiting = None

    def allreduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        with self.waiting(f"all-reduce ({op})"):
            self.comm.Allreduce(MPI.IN_PLACE, values, op=_OPS[op])
        return values

    def bcast(self, obj: T) -> T:
        with self.waiting("broadcast"):
            return self.comm.bcast(obj, root=0)

    def barrier(self, watched: bool = True) -> None:
        if not watched:
            self.comm.Barrier()
            return
        with self.waiting("barrier"):
            self.comm.Barrier()

    def device(self, device: str) -> str:
        """One GPU per rank: local rank r trains on GPU r of its machine (NCCL cannot put two
        ranks of one communicator on the same GPU). Every rank must pick the same kind."""
        from gpuml.backend import cuda_status

        if device.startswith("cuda:"):
            raise DeviceError(f"device {device!r} puts every one of the {self.size} ranks on one GPU; "
                              "use device: cuda (local rank r trains on GPU r)")
        chosen = device
        if device in ("cuda", "auto"):
            ok, why = cuda_status()
            if ok:
                import cupy

                gpus = cupy.cuda.runtime.getDeviceCount()
                if gpus < self.local_size:
                    raise DeviceError(f"{self.local_size} ranks on {socket.gethostname()} but {gpus} GPU"
                                      f"{'s' if gpus != 1 else ''}: one GPU per rank; start at most {gpus} "
                                      f"rank{'s' if gpus != 1 else ''} per machine, or use device: cpu")
                chosen = f"cuda:{self.local_rank % gpus}"
            elif device == "cuda":
                raise DeviceError(f"device 'cuda' requested but no GPU is usable: {why}")
            else:
                chosen = "cpu"
        if chosen == "cpu":
            self.share_cores()
        with self.waiting("start-up"):
            kinds = self.comm.allgather(chosen.split(":")[0])
        if len(set(kinds)) > 1:
            raise DeviceError("device: auto chose " + ", ".join(f"{k} on rank {r}" for r, k in enumerate(kinds))
                              + "; every rank must use the same kind: set device: cpu or cuda")
        return chosen

    def share_cores(self) -> None:
        """Give each rank on this machine its own cores (cores // local ranks): the CPU backend
        sizes its thread pool and OpenBLAS's threads by the affinity mask, so ranks that all see
        every core would oversubscribe it. A launcher that already bound the ranks apart (the
        masks differ) is left alone. Call it before the CPU backend is first imported."""
        if not hasattr(os, "sched_getaffinity"):
            return
        mask = sorted(os.sched_getaffinity(0))
        with self.waiting("start-up"):
            masks = self.local.allgather(mask)
        if any(m != mask for m in masks) or len(mask) < self.local_size:
            return
        per = len(mask) // self.local_size
        self.cores = mask[self.local_rank * per:(self.local_rank + 1) * per]
        os.sched_setaffinity(0, self.cores)
        from gpuml.backend.cpu import loops

        blas = loops.blas_thread_functions()
        if blas is not None:
            blas[1](len(self.cores))

    def gradient_hook(self, backend: Backend, grads: list[Array],
                      batches: BatchIterator) -> Callable[[], None] | None:
        from gpuml.distributed.gradients import GradientAllreduce, PackedGradients

        packed = PackedGradients(backend, grads)
        if backend.name == "cuda":
            from gpuml.distributed.nccl import NcclAllreduce

            reduce = NcclAllreduce(self, packed.buffer)
        else:
            def reduce(buf: Any) -> None:
                self.allreduce(buf, "sum")
        return GradientAllreduce(packed, reduce, batches)

    # -------------------------------------------------------------- failure
    def exit_code(self, code: int, message: str | None) -> int:
        """Every rank failing alike leaves together (rank 0 prints each distinct message once);
        a rank failing alone prints its message and ends every rank with MPI_Abort."""
        req = self._exit_comm.Ibarrier()
        deadline = time.monotonic() + min(EXIT_WAIT_S, self.timeout / 2)  # before a peer's watchdog fires
        while not req.Test():
            if time.monotonic() > deadline:
                self.abort(code, message, f"rank {self.rank} of {self.size} failed; stopping every rank")
            time.sleep(0.01)
        messages = self._exit_comm.gather(message, root=0)
        if self.is_root:
            distinct = set(m for m in messages if m is not None)
            for r, text in enumerate(messages):
                if text is not None and text in distinct:  # each once; by rank when they differ
                    print(text if len(distinct) == 1 else self._tag(text, r), file=sys.stderr, flush=True)
                    distinct.discard(text)
        return code

    def _tag(self, message: str, rank: int) -> str:
        """`message` ("gpuml: error: ...") naming the rank it comes from."""
        head = "gpuml: error: "
        tag = f"rank {rank} of {self.size}: "
        return head + tag + message[len(head):] if message.startswith(head) else tag + message

    def abort(self, code: int, message: str | None, why: str) -> None:
        self._aborting = True
        lines = [self._tag(m, self.rank) if m is message else m for m in (message, f"gpuml: error: {why}") if m]
        print("\n".join(lines), file=sys.stderr, flush=True)
        # MPI_Abort has the launcher kill every rank at once, and the line just written can be
        # lost on the way out (its stderr is forwarded by the launcher's proxy): one CI run of
        # the hung-rank test saw the job end without it. A moment first lets it through.
        time.sleep(0.5)
        self.comm.Abort(code or 1)

    def _excepthook(self, kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        self._previous_hook(kind, exc, tb)  # the traceback first
        if not self._aborting:
            self.exit_code(1, f"gpuml: error: {kind.__name__} (a bug; traceback above)")

    def _at_exit(self) -> None:
        """Leave together: the launcher ends the job when the first rank exits, which must not
        cut rank 0 short while it writes the run's last files."""
        if not self._aborting:
            with self.waiting("the final barrier"):
                self._exit_comm.Barrier()
            MPI.Finalize()  # every rank is here: it cannot hang (Open MPI calls an exit without it abnormal)

    def _watchdog(self) -> None:
        while True:
            time.sleep(1.0)
            waiting = self._waiting
            if waiting is not None and time.monotonic() - waiting[1] > self.timeout:
                self.abort(1, None, f"rank {self.rank} of {self.size} waited {self.timeout:g} s in {waiting[0]}: "
                           "another rank hung or died; stopping every rank ($GPUML_MPI_TIMEOUT)")
