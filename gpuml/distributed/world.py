"""`World`: the ranks a run is spread over, as the trainer sees them. This base class is the
single process (every collective is the identity); gpuml.distributed.mpi.MpiWorld overrides the
three primitives (`allreduce`, `bcast`, `barrier`) and the device choice."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from gpuml.distributed import shard

if TYPE_CHECKING:
    from gpuml.backend.base import Array, Backend
    from gpuml.data.loader import BatchIterator, Split
    from gpuml.train.stopping import StopFlag

T = TypeVar("T")


class World:
    """One process: rank 0 of 1."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1

    @property
    def is_root(self) -> bool:
        """Rank 0: the one that writes the run folder and speaks in the log."""
        return self.rank == 0

    def describe(self) -> str:
        """Appended to the trainer's first log line ("" for one process)."""
        return ""

    # -------------------------------------------------------------- primitives (overridden)
    def allreduce(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        """Element-wise `op` ("sum" or "max") of a small host array over every rank."""
        return values

    def bcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (pickled)."""
        return obj

    def barrier(self, watched: bool = True) -> None:
        """Wait until every rank is here (`watched`: for at most the collective timeout)."""

    def device(self, device: str) -> str:
        """The device this rank trains on for the config's `device`."""
        return device

    def gradient_hook(self, backend: Backend, grads: list[Array],
                      batches: BatchIterator) -> Callable[[], None] | None:
        """A callable the step runs after backward: it sums the gradients of every rank, each
        weighted by its share of the global batch. None for one process."""
        return None

    def exit_code(self, code: int, message: str | None) -> int:
        """The exit protocol after an error (printed as `message` unless None); one process
        just exits with `code`."""
        if message is not None:
            import sys

            print(message, file=sys.stderr, flush=True)
        return code

    # -------------------------------------------------------------- built on the primitives
    def sum(self, values: Sequence[float] | np.ndarray) -> np.ndarray:
        """float64 sums over every rank (metrics: loss * n, correct, n)."""
        return self.allreduce(np.asarray(values, dtype=np.float64).copy())

    def from_root(self, fn: Callable[[], T]) -> T:
        """`fn()` computed by rank 0 alone (it reads the run folder) and sent to every rank."""
        return self.bcast(fn() if self.is_root else None)  # type: ignore[arg-type]

    def root_first(self, fn: Callable[[], T]) -> T:
        """`fn()` on rank 0, then on the others (a dataset download happens once)."""
        if self.size == 1:
            return fn()
        result = fn() if self.is_root else None
        self.barrier(watched=False)  # a download may take longer than any collective should
        return result if self.is_root else fn()  # type: ignore[return-value]

    def agree(self, stop: StopFlag, flag: bool) -> bool:
        """Make a stop request seen by any rank (Ctrl-C, SIGTERM) every rank's, and return
        `flag` or-ed over the ranks (a checkpoint due by the clock on one rank is due on all):
        every rank then leaves the loop, and checkpoints, at the same step."""
        if self.size == 1:
            return flag
        signum, any_flag = self.allreduce(np.array([stop.signum, int(flag)], dtype=np.float64), "max")
        if signum and not stop:
            stop.signum = int(signum)  # another rank's signal: stop here too, quietly
        return bool(any_flag)

    def resume_point(self, run_dir: Path, log: Callable[[str], None]) -> Any:
        """checkpoint.resume_point read by rank 0 (which alone renames damaged files) and sent
        to every rank, so ranks on other machines need no shared folder to resume."""
        from gpuml.train import checkpoint as ckpt

        return self.from_root(lambda: ckpt.resume_point(run_dir, log))

    def check_batches(self, samples: int, batch_size: int, drop_last: bool, source: str) -> None:
        shard.check_batches(samples, batch_size, drop_last, self.size, source)

    def eval_part(self, split: Split, name: str) -> Split:
        return shard.eval_part(split, name, self.rank, self.size)
