"""RawModule and RawKernel of the emulator: the CUDA source is compiled with g++ against
cuda_emu.h into a shared library (cached on disk) and launched through ctypes.

Compilation runs in two steps. `g++ -E` expands the source and its headers (no emulator header
yet, so the text is what NVRTC would see after preprocessing); from that text come the entry
points (`extern "C" __global__`), their `__launch_bounds__`, and `extern __shared__` arrays are
rewritten to the launch's dynamic shared memory. The expanded text, the emulator header and a
registration line per entry point are then compiled with `-include cuda_emu.h`.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
import weakref
from pathlib import Path

import numpy as np

HEADER = Path(__file__).resolve().parent.parent / "cuda_emu.h"
#: every header of the emulator (cuda_emu.h includes the others): all of them key the build cache
HEADERS = sorted(HEADER.parent.glob("*.h"))
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpuml-emu"
# GPUML_EMU_ASAN=1 builds the kernels with AddressSanitizer: an out-of-bounds access becomes a
# report and an abort. The Python process must then start with libasan preloaded (README.md).
ASAN = bool(os.environ.get("GPUML_EMU_ASAN"))
# Hidden visibility: each module keeps its own registry and scheduler (g++ would otherwise merge
# the header's inline variables across every module loaded). No strict aliasing: CUDA code
# type-puns freely (float* as float4*) and nvcc tolerates it.
CXXFLAGS = ["-O1", "-g", "-fPIC", "-shared", "-fvisibility=hidden", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]
CXXFLAGS += ["-fsanitize=address", "-fno-omit-frame-pointer"] if ASAN else []
MAX_DYNAMIC_SHARED = 48 * 1024  # without cudaFuncSetAttribute opt-in, as gpuml launches

#: launches per entry-point name in this process (read by the pytest plugin)
launch_counts: collections.Counter[str] = collections.Counter()

# The launch bound is kept as C++ text (it may name a constexpr) and evaluated at registration.
_ENTRY_RE = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\(([^(),]*(?:\([^()]*\)[^(),]*)*)[^()]*\)\s*)?'
    r"(\w+)\s*\("
)
_NAMESPACE_RE = re.compile(r"\bnamespace\s+(\w+)\s*\{")
# A __shared__ declaration in a function body (indented: g++ -E keeps the indentation); the
# extern ones are rewritten before this applies.
_SHARED_DECL_RE = re.compile(r"^([ \t]+[^\n;{}]*?\b__shared__\b[^;{}=]*?\b(\w+)\s*(?:\[[^\]]*\]\s*)*;)", re.M)
_EXTERN_SHARED_RE = re.compile(r"extern\s+__shared__\s+((?:\w+\s*\(\s*\d+\s*\)\s*)?[\w\s]+?)\s*(\w+)\s*\[\s*\]\s*;")


class CompileException(Exception):
    pass


class CUDADriverError(Exception):
    pass


def preprocess(code: str, options: tuple[str, ...] = ()) -> str:
    # The macros NVRTC predefines, for the architecture cupy.cuda.Device reports.
    # GPUML_CUDA_EMULATOR: kernels/mma.cuh leaves its instructions to the model in mma_emu.h.
    passed = ["-D__CUDACC__", "-D__CUDACC_RTC__", "-D__CUDA_ARCH__=900", "-DGPUML_CUDA_EMULATOR"]
    passed += [o for o in options if o.startswith(("-I", "-D", "-U", "-std="))]
    r = subprocess.run(["g++", "-E", "-x", "c++", *passed, "-"], input=code, capture_output=True, text=True)
    if r.returncode:
        raise CompileException(r.stderr)
    return r.stdout


def entry_points(expanded: str) -> dict[str, str]:
    """Entry-point name -> its __launch_bounds__ max threads as C++ text (1024 when none)."""
    return {name: bound.strip() or "1024" for bound, name in _ENTRY_RE.findall(expanded)}


def _rewrite_extern_shared(m: re.Match) -> str:
    ctype = re.sub(r"__align__\s*\(\s*\d+\s*\)", "", m[1]).strip()
    return f"{ctype}* const {m[2]} = reinterpret_cast<{ctype}*>(emu::dynamic_shared);"


def _build(code: str, options: tuple[str, ...]) -> ctypes.CDLL:
    expanded = preprocess(code, options)
    bounds = entry_points(expanded)
    using = "".join(f"using namespace {ns};\n" for ns in dict.fromkeys(_NAMESPACE_RE.findall(expanded)))
    register = "".join(f'static int emu_registered_{n} = emu::register_kernel("{n}", &{n}, {b});\n'
                       for n, b in bounds.items())
    source = _EXTERN_SHARED_RE.sub(_rewrite_extern_shared, expanded)
    source = _SHARED_DECL_RE.sub(r"\1 emu::shared_declared(&\2, sizeof(\2));", source) + "\n" + using + register
    std = [o for o in options if o.startswith("-std=")][-1:] or ["-std=c++17"]
    flags = [*std, *CXXFLAGS, "-include", str(HEADER)]
    compiler = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    headers = [h.read_text() for h in HEADERS]
    key = hashlib.sha256("\0".join([source, *headers, " ".join(flags), compiler]).encode()).hexdigest()
    lib_path = CACHE / f"{key[:32]}.so"
    if not lib_path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="build-", dir=CACHE) as tmp:
            src, out = Path(tmp) / "kernels.cpp", Path(tmp) / "kernels.so"
            src.write_text(source)
            r = subprocess.run(["g++", *flags, "-o", str(out), str(src)], capture_output=True, text=True)
            if r.returncode:
                raise CompileException(r.stderr)
            os.replace(out, lib_path)  # atomic: a concurrent build of the same key is harmless
    lib = ctypes.CDLL(str(lib_path))
    lib.emu_params.argtypes = [ctypes.c_char_p]
    lib.emu_params.restype = ctypes.c_char_p
    lib.emu_max_threads.argtypes = [ctypes.c_char_p]
    lib.emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [ctypes.c_size_t, ctypes.c_void_p,
                                                                          ctypes.c_char_p, ctypes.c_size_t]
    return lib


class RawModule:
    """cupy.RawModule(code=..., options=...): compiled on the first get_function, as CuPy does."""

    def __init__(self, code: str, options: tuple[str, ...] = (), **_: object) -> None:
        self.code, self.options = code, tuple(options)
        self._lib: ctypes.CDLL | None = None

    def get_function(self, name: str) -> RawKernel:
        if self._lib is None:
            self._lib = _build(self.code, self.options)
        if self._lib.emu_params(name.encode()) is None:
            raise CUDADriverError("CUDA_ERROR_NOT_FOUND: named symbol not found")
        return RawKernel(self._lib, name)


def _dims(d: int | tuple[int, ...]) -> tuple[int, int, int]:
    d = (d,) if isinstance(d, int) else tuple(int(v) for v in d)
    return (d + (1, 1, 1))[:3]


def _pack(kernel: str, i: int, desc: str, a: object, ndarray: type) -> ctypes._CData:
    """Argument i as the bytes the kernel parameter `desc` expects; TypeError when it is not."""
    where = f"{kernel}: argument {i}"
    if desc.startswith("*"):
        if not isinstance(a, ndarray):
            raise TypeError(f"{where} is a pointer; got {type(a).__name__}, not a device array")
        target = desc[1:]
        if target == "p8":
            ok = a.dtype in (np.uint64, np.int64)
        else:
            ok = target == "v" or (
                (a.dtype.kind == "f") == (target[0] == "f") and a.dtype.itemsize == int(target[1:]))
        if not ok:
            raise TypeError(f"{where} points to {target}, got an array of {a.dtype}")
        return ctypes.c_void_p(a.data.ptr)
    if not isinstance(a, np.generic) or isinstance(a, np.bool_):
        raise TypeError(f"{where}: pass a NumPy scalar of the C parameter's type ({desc}), not {type(a).__name__}")
    if (a.dtype.kind == "f") != (desc[0] == "f") or a.dtype.itemsize != int(desc[1:]):
        raise TypeError(f"{where} is {desc}, got {a.dtype}")
    return ctypes.create_string_buffer(a.tobytes(), a.dtype.itemsize)


class RawKernel:
    def __init__(self, lib: ctypes.CDLL, name: str) -> None:
        self.lib, self.name = lib, name
        self.max_threads = lib.emu_max_threads(name.encode())
        self.params = lib.emu_params(name.encode()).decode().split()

    def __call__(self, grid: object, block: object, args: tuple, shared_mem: int = 0, **_: object) -> None:
        from . import _allocation, ndarray
        from .cuda import get_current_stream

        grid, block = _dims(grid), _dims(block)
        threads = block[0] * block[1] * block[2]
        if not (1 <= grid[0] < 2**31 and 1 <= grid[1] <= 65535 and 1 <= grid[2] <= 65535):
            raise CUDADriverError(f"{self.name}: invalid grid {grid}")
        if not (1 <= threads <= self.max_threads and block[0] <= 1024 and block[1] <= 1024 and block[2] <= 64):
            raise CUDADriverError(f"{self.name}: block {block} (limit {self.max_threads} threads)")
        if not 0 <= shared_mem <= MAX_DYNAMIC_SHARED:
            raise CUDADriverError(f"{self.name}: {shared_mem} bytes of dynamic shared memory")
        if len(args) != len(self.params):
            raise TypeError(f"{self.name}: {len(args)} arguments, the kernel takes {len(self.params)}")
        packed = [_pack(self.name, i, d, a, ndarray) for i, (d, a) in enumerate(zip(self.params, args))]
        # A graph node holds the argument bytes (pointers), not the arrays, as on a GPU: the
        # allocations are watched through weak references, so a replay after one was freed fails.
        buffers = {i: weakref.ref(_allocation(a)) for i, a in enumerate(args) if isinstance(a, ndarray)}
        node = KernelNode(self, grid, block, shared_mem, packed, buffers)
        stream = get_current_stream()
        if stream.is_capturing():
            stream._record(node)
        else:
            node.run()


class KernelNode:
    """One launch with its arguments packed: run now, or recorded by a capture and run per replay."""

    def __init__(self, kernel: RawKernel, grid: tuple, block: tuple, shared_mem: int, packed: list,
                 buffers: dict[int, weakref.ref]) -> None:
        self.kernel, self.grid, self.block, self.shared_mem = kernel, grid, block, shared_mem
        self.packed, self.buffers = packed, buffers

    def run(self) -> None:
        from . import buffer_guards_intact

        k, grid, block = self.kernel, self.grid, self.block
        alive = {i: ref() for i, ref in self.buffers.items()}
        for i, buf in alive.items():
            if buf is None:
                raise CUDADriverError(f"{k.name} grid {grid} block {block}: argument {i}'s buffer was freed "
                                      "after the graph was captured (the graph does not keep it alive)")
        argv = (ctypes.c_void_p * max(1, len(self.packed)))(*[ctypes.addressof(v) for v in self.packed])
        error = ctypes.create_string_buffer(1024)
        launch_counts[k.name] += 1
        if k.lib.emu_launch(k.name.encode(), *grid, *block, self.shared_mem, argv, error, len(error)):
            raise CUDADriverError(f"{k.name} grid {grid} block {block}: {error.value.decode()}")
        for i, buf in alive.items():
            if not buffer_guards_intact(buf):
                raise CUDADriverError(f"{k.name} grid {grid} block {block}: wrote outside argument {i}'s buffer")
