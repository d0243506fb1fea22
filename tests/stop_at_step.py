"""Run the `gpuml` command with the trainer interrupted at a chosen step, for deterministic
crash and signal tests (a test-only wrapper: the hook lives here, not in runtime code).

    python -m tests.stop_at_step STEP ACTION gpuml-args...

ACTION is `signal:N` (the process sends itself signal N while step STEP runs, so SIGKILL dies
with STEP-1 steps applied and SIGINT/SIGTERM stop after step STEP through the real handlers),
or `pause:PATH` (after step STEP: create PATH.reached, wait until PATH exists, go on).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from gpuml.cli import main
from gpuml.train.trainer import Trainer


def install(step: int, action: str) -> None:
    original = Trainer._step
    kind, _, arg = action.partition(":")

    def _step(self: Trainer, *args) -> None:
        original(self, *args)
        if self.global_step + 1 != step:  # the loop counts the step after _step returns
            return
        if kind == "signal":
            os.kill(os.getpid(), int(arg))
        elif kind == "pause":
            Path(arg + ".reached").write_text(str(os.getpid()))
            while not Path(arg).exists():
                time.sleep(0.01)
        else:
            raise SystemExit(f"unknown action {action!r}")

    Trainer._step = _step


if __name__ == "__main__":
    install(int(sys.argv[1]), sys.argv[2])
    sys.exit(main(sys.argv[3:]))
