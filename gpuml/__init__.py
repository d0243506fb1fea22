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

__all__ = ["History", "Sequential", "datasets", "layers", "load_model", "nn"]


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 lazy attributes keep `import gpuml` light
    """`gpuml.nn`, `gpuml.layers` (the layer classes), `gpuml.datasets`, and the Keras-like API
    (`gpuml.Sequential`, `gpuml.load_model`, `gpuml.History`), imported on first use."""
    import importlib

    if name in ("nn", "datasets"):
        return importlib.import_module(f"gpuml.{name}")
    if name == "layers":
        return importlib.import_module("gpuml.nn.layers")
    if name in ("Sequential", "load_model", "History"):
        return getattr(importlib.import_module("gpuml.api"), name)
    raise AttributeError(f"module 'gpuml' has no attribute {name!r}")
