"""Loads kernels/<family>.cu through CuPy's NVRTC path, once per process.

API (what other backend files use):

    get_function(family, name) -> cupy.RawKernel
        The `extern "C"` kernel `name` of kernels/<family>.cu, compiled for the current device.
        Launch it as CuPy does: `kernel(grid, block, args, shared_mem=bytes)`, grid and block
        3-tuples (or ints), args a tuple of cupy arrays (passed as device pointers) and NumPy
        scalars whose dtype matches the C parameter exactly (np.int32 for `int`, np.int64 for
        `long long`, np.uint64 for `unsigned long long`, np.float32 for `float`, np.float64 for
        `double`); a Python int or float would be passed as 64 bits and corrupt the frame.
        Launches go on the current CuPy stream.
    get_module(family) -> cupy.RawModule

Compilation: options are `COMPILE_OPTIONS` plus `-I<kernel dir>`; no fast-math. CuPy itself
appends `-ftz=true`, `-arch=sm_<cc>` (or compute_<cc> when NVRTC is older than the GPU) from
the current device and `--device-as-default-execution-space` (`nvrtc_options` spells out the
full list; tests/test_nvrtc_compile.py compiles every kernel with it, as CI does without a
GPU); `arch_of_current_device()` names the same target for our cache key.
CuPy's disk cache keys a module by its source text and options only, not by the headers it
includes, so the code handed to CuPy starts with a comment holding the SHA-256 of every header
the source includes (recursively): editing kernels/common.cuh changes the text, hence the key.
A `#line 1 "<path>"` directive follows, so compiler messages name the real .cu file and line.

Errors: a failed compile raises `KernelCompileError` (a DeviceError) with one paragraph naming
file:line and the first error; `parse_compile_log` turns an NVRTC log into diagnostics.

Everything above `get_module` is pure Python (no CuPy import) and unit-tested without a GPU.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuml.errors import DeviceError
from gpuml.paths import kernel_dir

#: Options every kernel family is compiled with (the include folder is added per call).
COMPILE_OPTIONS: tuple[str, ...] = ("-std=c++17",)

_INCLUDE_RE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)
# NVRTC / nvcc front-end lines: `path(LINE): error: text`, `path(LINE): error #20-D: text`,
# `path(LINE): catastrophic error: text`, `path(LINE): warning #177-D: text`.
_DIAGNOSTIC_RE = re.compile(
    r"^(?P<file>.+?)\((?P<line>\d+)\): (?P<severity>catastrophic error|error|warning)"
    r"(?: #[\w-]+)?: (?P<message>.*)$"
)


class KernelCompileError(DeviceError):
    """A kernel source failed to compile (a bug in kernels/, not in the user's config)."""


@dataclass(frozen=True)
class CompileDiagnostic:
    file: str
    line: int
    severity: str  # "error", "catastrophic error" or "warning"
    message: str


# ----------------------------------------------------------------------------- pure helpers
def kernel_source_path(family: str, directory: Path | None = None) -> Path:
    """kernels/<family>.cu; a family name is a plain identifier."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", family):
        raise ValueError(f"kernel family must be an identifier, got {family!r}")
    return (directory or kernel_dir()) / f"{family}.cu"


def resolve_includes(source: Path, include_dirs: Sequence[Path] = ()) -> list[Path]:
    """Every header reached from `source` through `#include "..."`, depth first, each once.

    A quoted include is looked up next to the including file, then in `include_dirs` (as the
    compiler does); `#include <...>` names toolkit headers and is not followed. A quoted
    include found nowhere is left for the compiler to report.
    """
    found: list[Path] = []
    seen: set[Path] = {source.resolve()}

    def visit(path: Path) -> None:
        text = path.read_text(encoding="utf-8")
        for name in _INCLUDE_RE.findall(_strip_comments(text)):
            for folder in (path.parent, *include_dirs):
                candidate = (folder / name).resolve()
                if candidate.is_file():
                    if candidate not in seen:
                        seen.add(candidate)
                        found.append(candidate)
                        visit(candidate)
                    break

    visit(source)
    return found


def _strip_comments(text: str) -> str:
    """C/C++ source without comments (a commented-out #include is not an include)."""
    text = re.sub(r"/\*.*?\*/", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.DOTALL)
    return re.sub(r"//[^\n]*", "", text)


def headers_digest(headers: Iterable[Path]) -> str:
    """SHA-256 over the names and texts of `headers`, in order."""
    h = hashlib.sha256()
    for path in headers:
        h.update(path.name.encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def arch_from_compute_capability(cc: str | int | tuple[int, int]) -> str:
    """(9, 0), 90 or "90" -> "sm_90"."""
    if isinstance(cc, tuple):
        major, minor = cc
        return f"sm_{major}{minor}"
    digits = str(cc).strip()
    if not digits.isdigit():
        raise ValueError(f"compute capability must be digits like '90', got {cc!r}")
    return f"sm_{digits}"


def compile_options(directory: Path, extra: Sequence[str] = ()) -> tuple[str, ...]:
    return (*COMPILE_OPTIONS, f"-I{directory}", *extra)


#: What CuPy (14) adds to a RawModule's options before NVRTC compiles it, after our own:
#: cupy/_core/core.pyx assemble_cupy_compiler_options adds include folders for its own and the
#: toolkit's headers (no kernel includes any, so they cannot change the code), and
#: cupy/cuda/compiler.py adds these in _compile_with_cache_cuda, `-arch=sm_<cc>` in
#: _get_arch_for_options_for_nvrtc (a cubin for any GPU the NVRTC knows) and the last one in
#: _compile_using_nvrtc_no_warning. `nvrtc_options` assembles the whole list.
CUPY_NVRTC_OPTIONS: tuple[str, ...] = ("-ftz=true", "--device-as-default-execution-space")


def nvrtc_options(directory: Path, arch: str) -> tuple[str, ...]:
    """The options NVRTC receives when CuPy compiles kernels/<family>.cu for `arch` ("sm_90"),
    in CuPy's order (its header include folders aside)."""
    ftz, default_space = CUPY_NVRTC_OPTIONS
    return (*compile_options(directory), ftz, f"-arch={arch}", default_space)


def module_cache_key(source_text: str, header_digest: str, options: Sequence[str], arch: str) -> str:
    """Process-level key of a compiled module: source, every included header, options, target."""
    h = hashlib.sha256()
    for part in (source_text, header_digest, "\0".join(options), arch):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def prepare_source(source_path: Path, source_text: str, header_digest: str) -> str:
    """The code handed to CuPy: a header-hash comment (CuPy's disk-cache key sees header
    edits), then `#line 1` so diagnostics carry the real file name and line numbers."""
    path = str(source_path).replace("\\", "/").replace('"', '\\"')
    return f'// gpuml: sha256 of included headers {header_digest}\n#line 1 "{path}"\n{source_text}'


def parse_compile_log(log: str) -> list[CompileDiagnostic]:
    """NVRTC/nvcc front-end log -> diagnostics, in log order (lines that are not diagnostics,
    such as the source excerpt and caret lines, are skipped)."""
    out = []
    for raw in log.splitlines():
        m = _DIAGNOSTIC_RE.match(raw.strip())
        if m:
            out.append(CompileDiagnostic(m["file"], int(m["line"]), m["severity"], m["message"].strip()))
    return out


def format_compile_error(source_path: Path, log: str) -> str:
    """One paragraph: the first error as file:line, and how many more there are."""
    diags = [d for d in parse_compile_log(log) if d.severity != "warning"]
    if not diags:
        tail = " ".join(log.split())[:300] or "no compiler log"
        return f"CUDA kernel {source_path.name} failed to compile: {tail}"
    first = diags[0]
    more = f" (and {len(diags) - 1} more error(s))" if len(diags) > 1 else ""
    return (
        f"CUDA kernel {source_path.name} failed to compile: {first.file}:{first.line}: "
        f"{first.severity}: {first.message}{more}"
    )


# ----------------------------------------------------------------------------- CuPy side
@dataclass
class _LoadedModule:
    module: Any  # cupy.RawModule
    path: Path


_lock = threading.Lock()
_modules: dict[str, _LoadedModule] = {}  # module_cache_key -> module
_functions: dict[tuple[str, str, str, str], Any] = {}  # (dir, family, arch, name) -> RawKernel


def arch_of_current_device() -> str:
    import cupy

    return arch_from_compute_capability(cupy.cuda.Device().compute_capability)


def _load_module(family: str, directory: Path, arch: str) -> _LoadedModule:
    import cupy

    path = kernel_source_path(family, directory)
    if not path.is_file():
        raise DeviceError(f"no kernel source {path} (is $GPUML_KERNELS or the install complete?)")
    text = path.read_text(encoding="utf-8")
    digest = headers_digest(resolve_includes(path, [directory]))
    options = compile_options(directory)
    key = module_cache_key(text, digest, options, arch)
    with _lock:
        loaded = _modules.get(key)
        if loaded is None:
            module = cupy.RawModule(code=prepare_source(path, text, digest), options=options)
            loaded = _modules[key] = _LoadedModule(module, path)
    return loaded


def get_module(family: str) -> Any:
    """The RawModule of kernels/<family>.cu for the current device's architecture, cached for
    the process under a key made of the source, every header it includes, options and arch
    (CuPy builds it on the first get_function)."""
    return _load_module(family, kernel_dir(), arch_of_current_device()).module


def get_function(family: str, name: str) -> Any:
    """The kernel `name` of kernels/<family>.cu as a cupy.RawKernel (see the module doc for
    the launch convention). Compile errors become KernelCompileError naming file:line.
    Memoised per (kernel folder, family, arch, name): call it freely on the launch path."""
    directory = kernel_dir()
    arch = arch_of_current_device()
    slot = (str(directory), family, arch, name)
    fn = _functions.get(slot)
    if fn is not None:
        return fn
    loaded = _load_module(family, directory, arch)
    try:
        fn = loaded.module.get_function(name)
    except Exception as exc:  # CuPy's CompileException / CUDADriverError, by name: no import
        if type(exc).__name__ == "CompileException":
            raise KernelCompileError(format_compile_error(loaded.path, str(exc))) from None
        if "NOT_FOUND" in str(exc):
            raise KernelCompileError(f"{loaded.path.name} has no kernel named {name!r}") from None
        raise DeviceError(f"loading kernel {name!r} of {loaded.path.name} failed: {exc}") from None
    with _lock:
        _functions[slot] = fn
    return fn


def clear_cache() -> None:
    """Forget compiled modules (tests; kernel development in a long-lived process)."""
    with _lock:
        _modules.clear()
        _functions.clear()
