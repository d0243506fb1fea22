"""Data-parallel training over MPI ranks: `mpiexec -n N gpuml train CONFIG`.

Semantics (the same for the CLI and the Python API's fit):
- `trainer.batch_size` is the GLOBAL batch. Every rank draws the same permutation of the epoch
  (same seed) and takes its contiguous share of each global batch: with b samples in the batch
  and N ranks, rank r gets b // N samples, plus one when r < b % N (`shard_bounds`).
- Each rank's gradients are those of its local mean loss; they are packed into one buffer,
  scaled by (local samples / b) and summed with ONE all-reduce per step (MPI on CPU, NCCL on
  CUDA), so every rank holds the gradient of the global mean loss, as one process would.
  The optimizer then runs identically on every rank: the weights never diverge.
- Dropout masks and augmentation draws are keyed by (seed, global step, sample index in the
  GLOBAL batch), so a shard draws exactly what one process draws for those samples.
- Training and evaluation metrics are sums (loss * n, correct, n) reduced across ranks.
- Rank 0 alone writes the run folder, holds its lock, logs and shows the progress bar.

One process (no launcher, or `mpiexec -n 1`) never imports mpi4py: `world()` reads the
launcher's environment first and is the plain single-process `World` then.
"""

from __future__ import annotations

from gpuml.distributed.launcher import launcher_rank, launcher_size, rank_prefix, world
from gpuml.distributed.shard import check_resume_ranks, offset_dropout, shard_bounds
from gpuml.distributed.world import World

__all__ = ["World", "check_resume_ranks", "launcher_rank", "launcher_size", "offset_dropout", "rank_prefix",
           "shard_bounds", "world"]
