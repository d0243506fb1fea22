"""The CPU backend: NumPy + numba, exact in float64 and the reference every CUDA kernel is tested
against (backend.py the Backend, checks, conv, pool, optim and their numba loops)."""

from gpuml.backend.cpu.backend import CpuBackend

__all__ = ["CpuBackend"]
