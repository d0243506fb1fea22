"""gpuml: a small-model GPU training framework with hand-written CUDA kernels and a NumPy
reference backend."""

__version__ = "0.1.0"
