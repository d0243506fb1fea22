"""Run `gpuml` under mpiexec with a fault in ONE rank at a chosen step, for the data-parallel
failure tests (a test-only wrapper, like tests/stop_at_step.py, whose hook it reuses).

    mpiexec -n N python -m tests.rank_fault RANK STEP ACTION gpuml-args...

ACTION: `signal:N` (that rank sends itself signal N while step STEP runs), `raise` (it raises a
RunError there, as a full disk or an unreadable file on one machine would), or `hang` (it
sleeps forever there, as a wedged driver would). Other ranks run `gpuml` unchanged.
"""

from __future__ import annotations

import sys
import time

from gpuml.cli import main
from gpuml.distributed import launcher_rank
from gpuml.errors import RunError
from gpuml.train.trainer import Trainer
from tests.stop_at_step import install


def install_fault(step: int, action: str) -> None:
    if action.startswith("signal:"):
        install(step, action)
        return
    original = Trainer._step

    def _step(self: Trainer, *args) -> None:
        original(self, *args)
        if self.global_step + 1 != step:
            return
        if action == "raise":
            raise RunError("injected failure on this rank")
        if action == "hang":
            while True:
                time.sleep(1)
        raise SystemExit(f"unknown action {action!r}")

    Trainer._step = _step


if __name__ == "__main__":
    rank, step, action = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if launcher_rank() == rank:
        install_fault(step, action)
    sys.exit(main(sys.argv[4:]))
