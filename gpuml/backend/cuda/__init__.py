"""The CUDA backend: CuPy launchers for the hand-written kernels in kernels/*.cu (backend.py the
Backend, kernels.py the loader, launch.py the launch plans, conv, optim, augment). Importing this
package never imports CuPy; only constructing CudaBackend does."""

from gpuml.backend.cuda.backend import CudaBackend

__all__ = ["CudaBackend"]
