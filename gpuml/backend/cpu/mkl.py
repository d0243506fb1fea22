"""Intel MKL's SGEMM/DGEMM for the CPU backend's dense products (`matmul`), when the optional
`mkl` wheel is installed (`pip install 'gpuml[mkl]'`); numpy's OpenBLAS otherwise.

Why: the Dense layers' GEMMs are most of a CPU MLP step, and at the seed shapes (batch 32 or 128
rows against 784x1024 and 1024x1024 weights) numpy's OpenBLAS runs them 1.3-1.8x slower than
MKL on two cores (bench/RESULTS.md), which is what PyTorch CPU calls: the seed MLP's step took
3.7-3.9 ms with OpenBLAS and 2.6-3.0 ms with MKL at batch 32 (PyTorch eager: 3.0 ms). MKL is
loaded through its one dynamic library (libmkl_rt) with ctypes: nothing is compiled. The
convolution chunks' GEMMs, which run_tasks spreads over the cores one per thread, run on MKL
too, one thread each (`matmul_here`): 20-30% faster than single-threaded OpenBLAS at the seed
CNN's second layer (64x288 @ 288x1936: 447 vs 628 us).

Threads: MKL runs on Intel's OpenMP runtime (libiomp5, from the intel-openmp wheel mkl depends
on) with as many threads as the CPU backend's helper pool. Its workers spin for KMP_BLOCKTIME
after a GEMM before they sleep, which makes back-to-back GEMMs cheap (a sleeping thread takes
50-60 us to wake on a virtual machine); the default (200 ms) would keep the second core busy
through the numba loops between GEMMs, so gpuml sets a short one unless the environment sets it.

One thread pool: a numba loop compiled parallel=True runs on numba's OpenMP threading layer,
whose library asks for libgomp's entry points (GOMP_parallel, ...); with libiomp5 loaded first
into the global symbol scope (as here) they resolve to libiomp5, which implements them, so
numba's parallel loops run on the same Intel OpenMP threads as MKL's GEMMs, still spinning from
the last GEMM, instead of waking a second pool (`numba_shares_pool`). The optimizer's Adam update
uses it (optim.py): 600 us instead of 780 with gpuml's sleeping helper threads, for the seed
MLP's 1.86 M parameters after a GEMM on 2 cores. Without MKL, numba's loops stay serial: an
OpenMP pool of numba's own next to OpenBLAS's threads made whole steps 5-10x slower (loops.py).

In one process with PyTorch: PyTorch imported after gpuml's CPU backend has loaded MKL resolves
its OpenMP calls, and some of its MKL calls, into the libraries loaded here (its MKL then reports
this MKL's version), so it runs on Intel's OpenMP and this MKL; imported before, it keeps its own
libgomp and numba's parallel Adam falls back to gpuml's helper threads (checked, not assumed).
`gpuml bench train` keeps PyTorch in child processes of its own (benchmark/torch_child.py).

Results: MKL runs in its strict reproducibility mode (CNR AUTO,STRICT, set before its first
call), so a product's bits depend neither on the thread count nor on the arrays' alignment (both
checked in tests/test_cpu_mkl.py); they differ from OpenBLAS's (another summation order), so a
run's bits depend on which BLAS it used, and `describe()` names it. GPUML_CPU_BLAS=openblas keeps
numpy's BLAS with MKL installed; =mkl makes a missing MKL an error.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time
from pathlib import Path

import numpy as np

from gpuml.errors import DeviceError

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
#: MKL_CBWR_AUTO | MKL_CBWR_STRICT (mkl_cbwr.h): the code path for this CPU, reproducible
#: regardless of thread count and alignment
_CBWR_AUTO_STRICT = 2 | 0x10000
#: how long (KMP_BLOCKTIME) MKL's threads spin after a GEMM; 1 ms covers the gaps between the
#: GEMMs of one layer's backward and ends before the optimizer's helper threads need the cores
BLOCKTIME = "1"
#: multiply-adds below which a product runs on the calling thread alone, unless MKL's threads ran
#: one less than TEAM_WARM_S ago and still spin: waking them costs more than the second core saves
#: (the seed CNN's dense head, 32x1600 @ 1600x64 after the convolutions, took 129-169 us in a
#: step on two threads, about 60 on one), while next to the MLP's big GEMMs two spinning threads
#: win (batch 128: its three 1024x10 products took 92, 86, 49 us on one thread, 63, 52, 35 on two)
SMALL_MACS = 4 << 20
TEAM_WARM_S = 0.5e-3


def _candidates(name: str) -> list[Path]:
    """Where pip puts the mkl / intel-openmp wheels' libraries: <prefix>/lib (a venv's or the
    interpreter's), and the user base."""
    prefixes = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix)}
    try:
        import site

        prefixes.add(Path(site.getuserbase()))
    except (ImportError, AttributeError):
        pass
    found: list[Path] = []
    for prefix in sorted(prefixes):
        found += sorted((prefix / "lib").glob(name))
    return found


def _layout(x: np.ndarray) -> tuple[int, int] | None:
    """(transpose flag, leading dimension) of a 2-D array for a row-major cblas call: a
    C-contiguous array as it is, an F-contiguous one (a transposed view) transposed; None for
    any other strides."""
    if x.flags.c_contiguous:
        return _NO_TRANS, max(x.shape[1], 1)
    if x.flags.f_contiguous:
        return _TRANS, max(x.shape[0], 1)
    return None


def _maps_range(line: str) -> tuple[int, int]:
    """The address range of a /proc/self/maps line."""
    lo, hi = line.split()[0].split("-")
    return int(lo, 16), int(hi, 16)


class Mkl:
    """cblas_sgemm / cblas_dgemm of a loaded libmkl_rt."""

    def __init__(self, rt: ctypes.CDLL, threads: int) -> None:
        self._rt = rt
        rt.MKL_CBWR_Set.argtypes = [ctypes.c_int]
        rt.MKL_CBWR_Set.restype = ctypes.c_int
        status = rt.MKL_CBWR_Set(_CBWR_AUTO_STRICT)  # before any other MKL call, or it is refused
        if status != 0:
            raise OSError(f"MKL refused its reproducible mode (mkl_cbwr_set returned {status})")
        ints = [ctypes.c_int] * 6
        for fn, real in ((rt.cblas_sgemm, ctypes.c_float), (rt.cblas_dgemm, ctypes.c_double)):
            fn.argtypes = [*ints, real, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, real,
                           ctypes.c_void_p, ctypes.c_int]
            fn.restype = None
        self._gemm = {np.dtype(np.float32): rt.cblas_sgemm, np.dtype(np.float64): rt.cblas_dgemm}
        rt.MKL_Set_Num_Threads_Local.argtypes = [ctypes.c_int]
        rt.MKL_Set_Num_Threads_Local.restype = ctypes.c_int
        self.set_threads(threads)
        self._team_used = -1.0  # perf_counter when a product last ran on all threads
        buf = ctypes.create_string_buffer(256)
        rt.MKL_Get_Version_String(buf, ctypes.c_int(len(buf)))
        words = buf.value.decode(errors="replace").split()
        # "Intel(R) oneAPI Math Kernel Library Version 2026.2-Product Build ..." -> "MKL 2026.2"
        self.version = "MKL " + next((w.split("-")[0] for w in words if w[:1].isdigit()), "?")

    @functools.cached_property
    def numba_shares_pool(self) -> bool:
        """Whether numba's parallel loops can run on MKL's OpenMP threads: numba's threading layer
        not yet started (or started as omp), not set to another layer by the user, and libgomp's
        entry point resolving into the libiomp5 loaded here. Sets numba's layer to omp."""
        import numba
        import numba.np.ufunc.parallel as numba_parallel

        wanted = os.environ.get("NUMBA_THREADING_LAYER", "").strip().lower()
        if wanted not in ("", "default", "omp"):
            return False
        started = getattr(numba_parallel, "_is_initialized", False)
        if started and numba.threading_layer() != "omp":
            return False
        try:
            entry = ctypes.cast(ctypes.CDLL(None).GOMP_parallel, ctypes.c_void_p).value or 0
            with open("/proc/self/maps") as maps:
                owner = next((line for line in maps if _maps_range(line)[0] <= entry < _maps_range(line)[1]), "")
        except (AttributeError, OSError, ValueError):
            return False
        if "libiomp5" not in owner:  # e.g. PyTorch, imported first, put its libgomp there
            return False
        if not started:
            numba.config.THREADING_LAYER = "omp"
        return True

    def matmul_here(self, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> bool:
        """matmul on the calling thread alone, for the convolution chunks that run_tasks spreads
        over the cores itself."""
        return self._matmul(a, b, out, alone=True)

    def set_threads(self, threads: int) -> None:
        self._rt.MKL_Set_Num_Threads(ctypes.c_int(threads))
        self.threads = threads

    def matmul(self, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> bool:
        """out = a @ b for 2-D arrays of one float dtype, a and b C- or F-contiguous (a transposed
        view is F) and `out` C-contiguous, on MKL's threads (a small product after a pause on the
        calling thread alone: SMALL_MACS); returns False, having done nothing, for anything else
        (numpy's matmul then does it)."""
        return self._matmul(a, b, out, alone=False)

    def _matmul(self, a: np.ndarray, b: np.ndarray, out: np.ndarray, alone: bool) -> bool:
        fn = self._gemm.get(out.dtype)
        if (fn is None or a.ndim != 2 or b.ndim != 2 or a.dtype != out.dtype or b.dtype != out.dtype
                or not out.flags.c_contiguous or out.size == 0 or a.shape[1] == 0):
            return False
        la, lb = _layout(a), _layout(b)
        if la is None or lb is None:
            return False
        m, k = a.shape
        n = b.shape[1]
        team = self.threads > 1 and not alone and (
            m * n * k >= SMALL_MACS or time.perf_counter() - self._team_used <= TEAM_WARM_S)
        before = self._rt.MKL_Set_Num_Threads_Local(1) if not team else 0  # MKL's thread-local count
        try:
            fn(_ROW_MAJOR, la[0], lb[0], m, n, k, 1.0, a.ctypes.data, la[1], b.ctypes.data, lb[1], 0.0,
               out.ctypes.data, n)
        finally:
            if team:
                self._team_used = time.perf_counter()
            else:
                self._rt.MKL_Set_Num_Threads_Local(before)
        return True


#: the MKL this process loaded (for reports such as the benchmark's machine line), or None
LOADED: Mkl | None = None


@functools.cache
def load(threads: int) -> Mkl | None:
    """The MKL to use, or None for numpy's BLAS (GPUML_CPU_BLAS: auto (default), mkl, openblas)."""
    choice = os.environ.get("GPUML_CPU_BLAS", "auto").strip().lower()
    if choice not in ("auto", "mkl", "openblas"):
        raise DeviceError(f"GPUML_CPU_BLAS must be auto, mkl or openblas, got {choice!r}")
    if choice == "openblas":
        return None
    rts = _candidates("libmkl_rt.so*")
    if not rts:
        if choice == "mkl":
            raise DeviceError("GPUML_CPU_BLAS=mkl but no libmkl_rt was found; "
                              "install it with: pip install 'gpuml[mkl]'")
        return None
    # read by MKL and libiomp5 when they load: Intel's OpenMP (the layer the wheels ship), a short
    # spin, no banner about other OpenMP runtimes in the process (PyTorch's libgomp, say)
    os.environ.setdefault("MKL_THREADING_LAYER", "INTEL")
    os.environ.setdefault("KMP_BLOCKTIME", BLOCKTIME)
    os.environ.setdefault("KMP_WARNINGS", "0")
    try:
        for omp in _candidates("libiomp5.so"):
            ctypes.CDLL(str(omp), mode=ctypes.RTLD_GLOBAL)
            break
        global LOADED
        LOADED = Mkl(ctypes.CDLL(str(rts[0]), mode=ctypes.RTLD_LOCAL), threads)
        return LOADED
    except (OSError, AttributeError) as exc:
        if choice == "mkl":
            raise DeviceError(f"GPUML_CPU_BLAS=mkl but {rts[0]} did not load: {exc}") from None
        return None
