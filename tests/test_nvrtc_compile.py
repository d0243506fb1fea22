"""Every kernels/*.cu compiles through NVRTC exactly as CuPy compiles it at run time (the text
gpuml/backend/cuda/kernels.py hands over, CuPy's options included: kernels.nvrtc_options) for sm_80
and sm_90, with no register spills or local memory.

nvcc alone is not enough (tests/test_kernels_compile.py): NVRTC 13.0.88 with CuPy's flags
spilled in six tile128 GEMM kernels where nvcc 13.0 did not. NVRTC needs no GPU: the library
comes from the `nvidia-cuda-nvrtc` wheels (CI installs 13.0.88 and the CUDA 12 one, 12.9.86,
in .ci/run; every one installed is checked) or $GPUML_NVRTC_LIB, and is called through ctypes
(no CuPy). Without it these tests skip, unless
GPUML_REQUIRE_NVRTC=1 (set by CI), where they fail. The ptxas report reaches the program log
through `--ptxas-options`, which only adds reporting and leaves the generated code alone.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import pytest

from gpuml.backend.cuda.kernels import headers_digest, nvrtc_options, prepare_source, resolve_includes
from gpuml.paths import kernel_dir
from tests.test_kernels_compile import TENSOR_CORE_PTX, missing_ptx, ptxas_report

KERNEL_DIR = kernel_dir()
SOURCES = sorted(KERNEL_DIR.glob("*.cu"))
ARCHS = ("sm_80", "sm_90")
PTXAS_REPORT = ("--ptxas-options=-v", "--ptxas-options=-warn-spills", "--ptxas-options=-warn-lmem-usage")


def find_libnvrtcs() -> list[Path]:
    """The NVRTC libraries to check: $GPUML_NVRTC_LIB (paths joined by os.pathsep), else the
    libnvrtc.so.* of every installed NVIDIA wheel (nvidia/cu13/lib from nvidia-cuda-nvrtc for
    CUDA 13, nvidia/cuda_nvrtc/lib from nvidia-cuda-nvrtc-cu12 for CUDA 12)."""
    if env := os.environ.get("GPUML_NVRTC_LIB"):
        return [Path(p) for p in env.split(os.pathsep) if p]
    try:
        import nvidia  # namespace package of NVIDIA's wheels
    except ImportError:
        return []
    return [lib for base in map(Path, nvidia.__path__) for lib in sorted(base.glob("*/lib/libnvrtc.so.*"))
            if ".alt." not in lib.name]


class Nvrtc:
    """The five NVRTC calls a compile check needs."""

    def __init__(self, path: Path) -> None:
        # libnvrtc dlopens its builtins library by soname; the wheel has no rpath for it.
        for builtins in sorted(path.parent.glob("libnvrtc-builtins.so.*")):
            if ".alt." not in builtins.name:
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(str(path))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        self.version = f"NVRTC {major.value}.{minor.value} ({path})"

    def _check(self, status: int) -> None:
        if status:
            raise RuntimeError(self.lib.nvrtcGetErrorString(status).decode())

    def compile(self, source: str, name: str, options: tuple[str, ...]) -> tuple[bool, str]:
        """(compiled, program log)."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None))
        try:
            argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            status = self.lib.nvrtcCompileProgram(prog, len(options), argv)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)))
            log = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, log))
            return status == 0, log.value.decode(errors="replace")
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))

    def ptx(self, source: str, name: str, options: tuple[str, ...]) -> str:
        """The PTX of `source` (options must name a virtual arch, -arch=compute_XY)."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None))
        try:
            argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            self._check(self.lib.nvrtcCompileProgram(prog, len(options), argv))
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size)))
            buf = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetPTX(prog, buf))
            return buf.value.decode()
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


LIBS = find_libnvrtcs()


@functools.cache
def _load(path: Path) -> Nvrtc:
    return Nvrtc(path)


@pytest.fixture(scope="module", params=LIBS or [None], ids=lambda p: (p.parent.parent.name or p.name) if p else "none")
def nvrtc(request: pytest.FixtureRequest) -> Nvrtc:
    if request.param is None:
        message = "libnvrtc not found (pip install nvidia-cuda-nvrtc, or set GPUML_NVRTC_LIB)"
        if os.environ.get("GPUML_REQUIRE_NVRTC") == "1":
            pytest.fail(f"GPUML_REQUIRE_NVRTC=1: {message}")
        pytest.skip(message)
    return _load(request.param)


def test_nvrtc_options_are_cupys() -> None:
    assert nvrtc_options(Path("/k"), "sm_90") == (
        "-std=c++17", "-I/k", "-ftz=true", "-arch=sm_90", "--device-as-default-execution-space")


@pytest.mark.slow  # about 1 s per file and target; every installed NVRTC
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_kernel_compiles_with_nvrtc_without_spills(nvrtc: Nvrtc, source: Path, arch: str) -> None:
    code = prepare_source(source, source.read_text(encoding="utf-8"),
                          headers_digest(resolve_includes(source, [KERNEL_DIR])))
    ok, log = nvrtc.compile(code, source.name, (*nvrtc_options(KERNEL_DIR, arch), *PTXAS_REPORT))
    assert ok, f"{nvrtc.version} failed on {source.name} for {arch}:\n{log}"
    registers, problems = ptxas_report(log)
    assert registers, f"{nvrtc.version} reported no kernels for {source.name}:\n{log}"
    assert not problems, f"{source.name} ({arch}, {nvrtc.version}) spills or uses local memory:\n" + "\n".join(problems)


@pytest.mark.parametrize("source", sorted(TENSOR_CORE_PTX))
def test_tensor_core_kernels_emit_mma_sync_with_nvrtc(nvrtc: Nvrtc, source: str) -> None:
    """The text CuPy compiles, for sm_80's virtual arch: the PTX holds mma.sync (tf32 and bf16)."""
    path = KERNEL_DIR / source
    code = prepare_source(path, path.read_text(encoding="utf-8"), headers_digest(resolve_includes(path, [KERNEL_DIR])))
    options = tuple("-arch=compute_80" if o.startswith("-arch=") else o for o in nvrtc_options(KERNEL_DIR, "sm_80"))
    ptx = nvrtc.ptx(code, source, options)
    assert not missing_ptx(source, ptx), f"{nvrtc.version}: {source} has no {missing_ptx(source, ptx)} in its PTX"
