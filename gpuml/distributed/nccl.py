"""The CUDA backend's gradient all-reduce: NCCL through CuPy's bindings (cupy.cuda.nccl), one
communicator per run whose unique id rank 0 makes and MPI broadcasts (ChainerMN's
PureNcclCommunicator, reduced to the one collective a data-parallel step needs).

The all-reduce is enqueued on CuPy's current stream, so inside the step graph's stream capture
it becomes a node of the graph (NCCL >= 2.9 supports capture); outside, it runs in order with
the step's kernels. cupy is imported on first use only: this module imports anywhere.

NOT RUN: no machine with two GPUs was available when this was written; only the packing it
relies on (gpuml.distributed.gradients) is tested, on the CPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpuml.distributed.world import World

_NCCL_TYPES = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "float16": "NCCL_FLOAT16"}


class NcclAllreduce:
    """In-place sum of a CuPy buffer over every rank of `world` (one GPU per rank)."""

    def __init__(self, world: World, buffer: Any) -> None:
        from cupy.cuda import nccl

        self._nccl = nccl
        uid = world.bcast(nccl.get_unique_id() if world.is_root else None)
        self.comm = nccl.NcclCommunicator(world.size, uid, world.rank)
        self.dtype = getattr(nccl, _NCCL_TYPES[str(buffer.dtype)])

    def __call__(self, buf: Any) -> None:
        import cupy

        ptr = buf.data.ptr
        self.comm.allReduce(ptr, ptr, buf.size, self.dtype, self._nccl.NCCL_SUM,
                            cupy.cuda.get_current_stream().ptr)
