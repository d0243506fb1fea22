"""gpuml: a small-model GPU training framework with hand-written CUDA kernels and a NumPy
reference backend."""

import os as _os

# OpenBLAS's worker threads keep spinning for a while after each GEMM; on a small machine they
# then hold the cores the CPU backend's next loop needs (an Adam step right after a GEMM measured
# 4.2 ms instead of 2.2 ms on 2 cores; bench/RESULTS.md). A short timeout parks them promptly
# and costs the GEMMs nothing measurable. Only effective when gpuml is imported before numpy
# loads OpenBLAS (always so for the `gpuml` command); a user's own setting wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"
