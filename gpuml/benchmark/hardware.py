"""What machine a benchmark ran on, and the hardware limits its rates are drawn against.

Limits: the FP32 peak (for GEMM and convolution) and the copy bandwidth (for the bandwidth-bound
ops). On a GPU the datasheet peak is SMs x FP32 lanes per SM x 2 x clock, from the device
attributes; the copy bandwidth is measured in the run (a device-to-device memcpy far larger than
the L2). On a CPU an estimate, cores x clock x FLOP/cycle for two FMA pipes of the widest vector
unit the flags show, is only recorded: turbo clocks put measured GEMMs above it (473-484 against
332 GFLOP/s on one machine here) and AVX-512 on 256-bit units (AMD Zen 4) below it, so `gpuml bench
kernels` draws its floors from the best GEMM rate it measures. The copy bandwidth is a parallel
copy measured in the run. The machine is named by its model, vendor/family/model numbers, vector
extensions (from /proc/cpuinfo flags) and numpy's BLAS kernel.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np


def core_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _size_bytes(text: str) -> int:
    text = text.strip().upper()
    for suffix, mult in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if text.endswith(suffix):
            return int(text[:-1]) * mult
    return int(text)


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of the largest cache level of CPU 0 (sysfs), or `default` when unknown."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            sizes.append(_size_bytes((index / "size").read_text()))
        except (OSError, ValueError):
            continue
    return max(sizes, default=default)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}
    for mod in ("torch", "cupy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a broken optional install must not stop a benchmark
            continue
    return out


def git_commit() -> str:
    """The commit of the gpuml checkout being measured, with '+dirty' for local changes."""
    root = Path(__file__).resolve().parent.parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


#: /proc/cpuinfo flags that name the vector units (what a GEMM or an exp loop can use)
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def vector_extensions(flags: set[str]) -> list[str]:
    """The vector extensions among the CPU flags: SSE4.2 up to AVX2/FMA, every AVX-512 subset, AMX."""
    return [f for f in VECTOR_FLAGS if f in flags] + sorted(f for f in flags if f.startswith("avx512"))


def blas_description() -> str:
    """numpy's BLAS as it configured itself here: OpenBLAS's version, kernel (core) and threads,
    and OPENBLAS_CORETYPE when the environment forces a kernel ('' for another BLAS); led by MKL
    when the CPU backend loaded it for its GEMMs."""
    from gpuml.backend.cpu import mkl

    numpy_blas = _numpy_blas()
    if mkl.LOADED is None:
        return numpy_blas
    return f"{mkl.LOADED.version} for gpuml's GEMMs ({mkl.LOADED.threads} threads), numpy's {numpy_blas or 'BLAS'}"


def _numpy_blas() -> str:
    import ctypes

    from gpuml.backend.cpu.loops import blas_thread_functions

    libs = Path(np.__file__).parent.parent / "numpy.libs"
    for path in sorted(libs.glob("*openblas*")) if libs.is_dir() else []:
        lib = ctypes.CDLL(str(path))
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
            config = getattr(lib, f"{prefix}_get_config{suffix}", None)
            core = getattr(lib, f"{prefix}_get_corename{suffix}", None)
            if config is not None and core is not None:
                config.restype = core.restype = ctypes.c_char_p
                fns = blas_thread_functions()
                text = f"{config().decode().split('  ')[0]}, {core().decode()} kernels"
                text += f", {fns[0]()} threads" if fns else ""
                forced = os.environ.get("OPENBLAS_CORETYPE")
                return text + (f" (OPENBLAS_CORETYPE={forced})" if forced else "")
    return ""


#: the most a cache flush writes: a VM may report its host's whole last-level cache (480 MiB on
#: one machine here), of which its few cores hold a small part; writing twice that before every
#: repeat made the flush, not the ops, the bulk of a sweep's time
FLUSH_CAP_BYTES = 64 << 20


def flush_bytes(llc_bytes: int) -> int:
    """Bytes a cache flush writes: twice the last-level cache, at most FLUSH_CAP_BYTES."""
    return min(2 * llc_bytes, FLUSH_CAP_BYTES)


def cpu_info() -> dict[str, Any]:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    mhz = float(info.get("cpu MHz", "0") or 0)
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    flop_per_cycle = 2 * 2 * lanes  # 2 FMA pipes x lanes x (multiply + add)
    cores = core_count()
    peak = cores * mhz * 1e6 * flop_per_cycle
    return {
        "kind": "cpu",
        "name": info.get("model name", platform.processor() or "unknown CPU"),
        "vendor": info.get("vendor_id", ""), "family": info.get("cpu family", ""), "model": info.get("model", ""),
        "vector_extensions": vector_extensions(flags),
        "blas": blas_description(),
        "cores": cores,
        "mhz": mhz,
        "llc_bytes": last_level_cache_bytes(),
        "fp32_peak_flops": peak,
        # recorded only: turbo clocks (and AVX-512 on narrower units) make it wrong either way;
        # `gpuml bench kernels` draws its floors from the best GEMM rate it measures
        "fp32_peak_how": (f"estimated: {cores} cores x {mhz / 1e3:.2f} GHz x {flop_per_cycle} FLOP/cycle "
                          f"(2 FMA pipes x {lanes} FP32 lanes)"),
    }


#: FP32 lanes per SM by compute capability (CUDA C Programming Guide, arithmetic throughput table)
FP32_LANES_PER_SM = {(6, 0): 64, (6, 1): 128, (7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128,
                     (8, 7): 128, (8, 9): 128, (9, 0): 128, (10, 0): 128, (12, 0): 128}


def gpu_info() -> dict[str, Any]:
    """Name, compute capability, L2 size, FP32 peak and DRAM bandwidth of CuPy's current GPU."""
    import cupy

    dev = cupy.cuda.Device()
    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(dev.id)
    cc = (int(props["major"]), int(props["minor"]))

    def attr(code: int) -> int:  # cudaDeviceAttr values, stable across CUDA versions
        try:
            return int(rt.deviceGetAttribute(code, dev.id))
        except Exception:  # an attribute a newer runtime dropped: report 0, i.e. unknown
            return 0

    sms, clock_khz, mem_khz, bus_bits, l2 = attr(16), attr(13), attr(36), attr(37), attr(38)
    lanes = FP32_LANES_PER_SM.get(cc, 128)
    name = props["name"]
    return {
        "kind": "cuda",
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": f"{cc[0]}.{cc[1]}",
        "sms": sms,
        "l2_bytes": l2 or 128 << 20,  # unknown: flush a size larger than any current L2
        # None when the clock is unknown: no peak line rather than a wrong one
        "fp32_peak_flops": sms * lanes * 2 * clock_khz * 1e3 or None,
        "fp32_peak_how": f"{sms} SMs x {lanes} FP32 lanes x 2 x {clock_khz / 1e6:.2f} GHz boost clock",
        "dram_bytes_per_s": 2 * mem_khz * 1e3 * bus_bits / 8 or None,
        "cuda_runtime": rt.runtimeGetVersion(),
        "cuda_driver": rt.driverGetVersion(),
    }


def cpu_idle_fraction(seconds: float = 1.0) -> float | None:
    """Fraction of all cores' time spent idle over the next `seconds` (Linux /proc/stat), or None.
    Unlike the load average, it does not remember this process's own earlier work."""

    def snapshot() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = snapshot()
        time.sleep(seconds)
        idle1, total1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / max(1, total1 - total0)


def busy_warning(log: Callable[[str], None], device: str) -> float | None:
    """Measure how idle the CPU is before a host benchmark and warn when other processes are
    using it (host timings are then slower and noisier). Returns the idle fraction."""
    if device != "cpu":
        return None
    idle = cpu_idle_fraction()
    if idle is not None and idle < 0.9:
        log(f"warning: the CPU was only {100 * idle:.0f}% idle just before this run: other processes "
            "are using it, so the CPU timings will be slower and noisier than on an idle machine")
    return idle


# ------------------------------------------------------------------------------------- copies
@numba.njit(parallel=True, cache=True)
def _parallel_copy(dst: np.ndarray, src: np.ndarray) -> None:  # pragma: no cover - numba
    for i in numba.prange(src.size):
        dst[i] = src[i]


def host_copier(nbytes: int) -> Any:
    """A callable copying `nbytes` between two host buffers with every core (numba prange): the
    host's copy bandwidth anchor, moving nbytes in and nbytes out."""
    n = max(nbytes // 4, 1)
    rng = np.random.default_rng(1)
    src = rng.standard_normal(n, dtype=np.float32)
    dst = np.empty_like(src)
    _parallel_copy(dst, src)  # compile (or load from cache) outside any timing
    return lambda: _parallel_copy(dst, src)


def cuda_copier(nbytes: int) -> Any:
    """A callable launching a device-to-device memcpy of `nbytes` on the current stream."""
    import cupy

    src = cupy.random.standard_normal(max(nbytes // 4, 1), dtype=cupy.float32)
    dst = cupy.empty_like(src)
    return lambda: dst.data.copy_from_device_async(src.data, src.nbytes)


def measure_host_copy_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Bytes/s (read + write) of the best of `repeats` parallel copies of `nbytes`."""
    copy = host_copier(nbytes)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        copy()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best
