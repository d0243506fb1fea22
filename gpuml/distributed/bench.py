"""`gpuml bench train --ranks N`: the benchmark started again under mpiexec, and what it
reports about the gradient all-reduce."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpuml.errors import GpumlError


def without_ranks(argv: list[str]) -> list[str]:
    """`argv` less its --ranks N / --ranks=N (the ranks then come from the launcher)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--ranks":
            skip = True
        elif not a.startswith("--ranks="):
            out.append(a)
    return out


def relaunch(ranks: int, argv: list[str]) -> int:
    """Run `gpuml ARGV` (less --ranks) as `ranks` ranks under the mpiexec next to this Python
    (the mpi extra's MPICH) or on PATH; its exit status."""
    where = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    mpiexec = shutil.which("mpiexec", path=where)
    if mpiexec is None:
        raise GpumlError(f"--ranks {ranks} starts mpiexec, which is not installed: pip install 'gpuml[mpi]'")
    cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "gpuml.cli", *without_ranks(argv)]
    print(f"gpuml bench: {' '.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def allreduce_stats(trainer: Any) -> dict[str, Any]:
    """Ranks, the packed gradient buffer's size, and the host time of its all-reduce per step
    over the steps `trainer` ran (None on one process, and on CUDA, where the call only queues
    the NCCL kernel, and a replayed graph makes no call at all)."""
    from gpuml.distributed.gradients import GradientAllreduce

    hook = next((h for h in trainer.grad_hooks if isinstance(h, GradientAllreduce)), None)
    if hook is None:
        return {"ranks": trainer.dist.size, "allreduce_bytes": None, "allreduce_us_per_step": None}
    timed = hook.calls and trainer.backend.name == "cpu"
    return {"ranks": trainer.dist.size, "allreduce_bytes": hook.packed.nbytes,
            "allreduce_us_per_step": hook.seconds / hook.calls * 1e6 if timed else None}
