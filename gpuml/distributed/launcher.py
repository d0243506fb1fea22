"""Which world this process is in, from the MPI launcher's environment (no mpi4py import for
one process), and the one `world()` of the process."""

from __future__ import annotations

import os

from gpuml.distributed.world import World
from gpuml.errors import GpumlError

# What mpiexec/mpirun/srun put in each rank's environment: Open MPI, MPICH and Intel MPI
# (hydra, also srun --mpi=pmi2), MVAPICH. PMIx launchers (srun --mpi=pmix) set PMIX_RANK only:
# then mpi4py is asked for the size, when it is installed.
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")

_world: World | None = None


def launcher_size() -> int | None:
    """The number of ranks the launcher started (None when not under a launcher that says)."""
    for var in _SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def launcher_rank() -> int | None:
    for var in _RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return None


def rank_prefix() -> str:
    """"rank R of N: " for messages of a multi-rank run (from the environment alone, so it
    works before, or without, MPI), else ""."""
    size = launcher_size()
    if size is None or size < 2:
        return ""
    return f"rank {launcher_rank()} of {size}: "


class MpiMissing(GpumlError):
    """Started by an MPI launcher with several ranks, but mpi4py does not import."""

    exit_code = 1


def started() -> World | None:
    """The World `world()` made, or None before it was asked for (or when it failed)."""
    return _world


def world() -> World:
    """This process's World: the single process unless an MPI launcher started several ranks
    (then mpi4py is imported and MPI initialised, once)."""
    global _world
    if _world is not None:
        return _world
    size = launcher_size()
    maybe = size is None and "PMIX_RANK" in os.environ
    if (size is None or size < 2) and not maybe:
        _world = World()
        return _world
    try:
        from gpuml.distributed.mpi import MpiWorld
    except ImportError as exc:
        if maybe:  # a PMIx launcher that did not say the size, and no mpi4py to ask: one process
            _world = World()
            return _world
        raise MpiMissing(f"started by an MPI launcher as one of {size} ranks, but mpi4py does not import "
                         f"({exc}); install the extra: pip install 'gpuml[mpi]'") from None
    w = MpiWorld()
    _world = w if w.size > 1 else World()
    return _world
