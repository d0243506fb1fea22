"""`gpuml bench kernels`: run the kernel cases (kernel_cases.py) on one device, check that ours
agrees with each anchor, time every implementation in the same run, and return rows.

A row is one (case, anchor) pair: ours' median time and rate next to the anchor's, and
`ratio` = anchor time / our time, so > 1 means ours is faster. A case whose only implementation
is ours (no anchor importable) gives one row with the anchor fields None. Each row also holds the
roofline floor of its case on this machine (max of FLOPs / FP32 peak and bytes / copy bandwidth)
and how close ours came to it. Both limits are measured in the run: the copy bandwidth by a copy
far larger than the cache, the FP32 peak as the best GEMM rate of the run (a large GEMM timed
first, and every matmul row, ours or an anchor's). On a GPU the datasheet peak (SMs x lanes x
clock) is used when it is the higher; on a CPU an estimate from clock and vector width is only
recorded, as turbo clocks make it wrong either way.

Every implementation of an op is checked against ours on the same inputs before it is timed:
max |ours - anchor| / max |anchor| within the case's tolerance, or the row says MISMATCH and
`gpuml bench` exits 1. Outputs made of several arrays (a loss and its gradient, Adam's updates
of several tensors) are compared array by array.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gpuml.benchmark import hardware
from gpuml.benchmark.kernel_cases import OURS, Case, Impl, full_sweep, quick_sweep
from gpuml.benchmark.timing import (
    CudaCacheFlusher,
    CudaEvents,
    HostCacheFlusher,
    Stats,
    TimingPlan,
    time_cuda,
    time_host_interleaved,
)
from gpuml.benchmark.torch_models import import_torch

PLANS = {
    ("cpu", True): TimingPlan(warmup=1, min_repeats=3, max_repeats=20, budget_s=0.05),
    ("cpu", False): TimingPlan(warmup=1, min_repeats=3, max_repeats=50, budget_s=1.0),
    ("cuda", True): TimingPlan(warmup=3, min_repeats=10, max_repeats=100, budget_s=0.1),
    ("cuda", False): TimingPlan(warmup=10, min_repeats=20, max_repeats=500, budget_s=0.5),
}


def import_cupy_fp32() -> Any:
    """CuPy with cuBLAS in plain FP32 (no TF32): CUPY_TF32=0 and the float32 compute type set to
    COMPUTE_TYPE_FP32 (value 4 in cupy._core._routines_linalg, checked by its name). CUPY_TF32=0
    alone already means FP32; the explicit setting guards against a caller's earlier choice."""
    os.environ["CUPY_TF32"] = "0"
    import cupy

    try:
        from cupy._core import _routines_linalg as linalg
    except ImportError:  # a CuPy without this private module: CUPY_TF32=0 has to do
        return cupy
    if linalg.compute_type_to_str(4) == "COMPUTE_TYPE_FP32":
        linalg.set_compute_type(np.float32, 4)
    return cupy


class Env:
    """What a case's `build` needs: the backend, the array module, anchors' libraries, and
    random inputs on the device."""

    def __init__(self, device: str, seed: int = 0) -> None:
        from gpuml.backend import get_backend

        self.device = device
        self.cupy = import_cupy_fp32() if device == "cuda" else None
        self.backend = get_backend(device)
        self.xp = self.backend.xp
        self.torch = import_torch(device)
        self.torch_device = "cuda" if device == "cuda" else "cpu"
        self.rng = np.random.default_rng(seed)
        if device == "cuda":
            self.info = hardware.gpu_info()
            self.events = {lib: CudaEvents(lib) for lib in ("cupy", "torch") if lib == "cupy" or self.torch}
            self.flushers: dict[str, Any] = {
                lib: CudaCacheFlusher(lib, 2 * self.info["l2_bytes"]) for lib in self.events}
        else:
            self.info = hardware.cpu_info()
            self.flushers = {"host": HostCacheFlusher(hardware.flush_bytes(self.info["llc_bytes"]))}

    def rand(self, shape: tuple[int, ...]) -> Any:
        """Standard-normal float32 on the device (drawn on the host, so every device gets the
        same values for the same seed)."""
        return self.backend.asarray(self.rng.standard_normal(shape, dtype=np.float32))

    def as_torch(self, arr: Any) -> Any:
        """A torch tensor sharing `arr`'s memory (DLPack), so anchors read our exact inputs."""
        return self.torch.from_dlpack(arr)

    def copy_impl(self, op_bytes: int) -> Impl:
        """A copy moving the same bytes as the op (op_bytes / 2 read, as many written)."""
        if self.device == "cuda":
            return Impl("copy (cudaMemcpy D2D)", hardware.cuda_copier(op_bytes // 2))
        return Impl(f"copy (numba, {hardware.core_count()} threads)", hardware.host_copier(op_bytes // 2))

    def to_host(self, arr: Any) -> np.ndarray:
        if self.torch is not None and isinstance(arr, self.torch.Tensor):
            return arr.detach().cpu().numpy()
        return np.asarray(self.backend.to_numpy(arr))

    def time(self, impl: Impl, plan: TimingPlan) -> Stats:
        return self.time_all([impl], plan)[impl.name]

    def time_all(self, impls: list[Impl], plan: TimingPlan) -> dict[str, Stats]:
        """On a GPU, each implementation in turn (CUDA events); on the host, interleaved."""
        if self.device == "cuda":
            out = {}
            for impl in impls:
                lib = impl.lib if impl.lib in self.events else "cupy"
                out[impl.name] = time_cuda(impl.run, plan, self.events[lib], flush=self.flushers[lib])
            return out
        return time_host_interleaved({i.name: i.run for i in impls}, plan, flush=self.flushers["host"])

    def release(self) -> None:
        """Give cached device memory back between cases (large cases follow small ones)."""
        gc.collect()
        if self.cupy is not None:
            self.cupy.get_default_memory_pool().free_all_blocks()
        if self.torch is not None and self.device == "cuda":
            self.torch.cuda.empty_cache()


def relative_error(ours: Any, ref: Any) -> float:
    """max |ours - ref| / max |ref| (inf on a shape mismatch or non-finite values); for tuples of
    arrays, the largest over their pairs (each against its own scale)."""
    if isinstance(ours, tuple) or isinstance(ref, tuple):
        if not (isinstance(ours, tuple) and isinstance(ref, tuple)) or len(ours) != len(ref):
            return float("inf")
        return max((relative_error(a, b) for a, b in zip(ours, ref)), default=0.0)
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape or not (np.isfinite(ours).all() and np.isfinite(ref).all()):
        return float("inf")
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    return float(np.abs(ours - ref).max()) / (scale or 1.0)


def copy_bandwidth(env: Env, plan: TimingPlan, quick: bool) -> float:
    """Bytes/s (read + write) of a copy far larger than the last-level cache, measured now."""
    nbytes = 1 << 30 if env.device == "cuda" else (64 << 20 if quick else 256 << 20)
    # More repeats than the cases get: this one number sets every bandwidth-bound floor.
    plan = TimingPlan(warmup=plan.warmup, min_repeats=10, max_repeats=max(10, plan.max_repeats),
                      budget_s=2 * plan.budget_s)
    stats = env.time(env.copy_impl(2 * nbytes), plan)
    return 2 * nbytes / stats.median_s


def _host(env: Env, value: Any) -> Any:
    return tuple(_host(env, v) for v in value) if isinstance(value, tuple) else env.to_host(value)


def measured_peak(env: Env, quick: bool) -> float:
    """FLOP/s of the best of a few large square float32 GEMMs through the array module's matmul
    (OpenBLAS on CPU, cuBLAS on CUDA): the FP32 rate this machine demonstrably reaches now."""
    size = 1024 if quick else (8192 if env.device == "cuda" else 2048)
    a, b = env.rand((size, size)), env.rand((size, size))
    out = env.backend.empty((size, size))
    plan = TimingPlan(warmup=1, min_repeats=3, max_repeats=5, budget_s=0.5)
    stats = env.time(Impl("peak gemm", lambda: env.xp.matmul(a, b, out=out)), plan)
    return 2 * size**3 / stats.min_s


def set_floors(rows: list[dict[str, Any]], peak: float, copy_bw: float) -> None:
    """floor_s = max(FLOPs / peak, bytes / copy bandwidth) of each row, and ours' fraction of it."""
    for r in rows:
        if "error" not in r:
            r["floor_s"] = max(r["flops"] / peak if peak else 0.0, r["bytes"] / copy_bw)
            r["ours_fraction_of_floor"] = r["floor_s"] / r["ours_median_s"]


def run_case(env: Env, case: Case, plan: TimingPlan, peak: float | None, copy_bw: float) -> list[dict[str, Any]]:
    impls = case.build(env)
    ours, anchors = impls[0], impls[1:]
    checks: dict[str, float | None] = {}
    ours.run()
    env.backend.synchronize()
    ours_out = _host(env, ours.result()) if ours.result else None
    for a in anchors:
        a.run()
        if a.result is None and not a.name.startswith("copy"):
            raise ValueError(f"{case.op}: anchor {a.name} gives no result to check")
        checks[a.name] = (relative_error(ours_out, _host(env, a.result()))
                          if a.result and ours_out is not None else None)
    stats = env.time_all(impls, plan)
    work = case.flops if case.metric == "flops" else case.bytes
    floor_s = max(case.flops / peak if peak else 0.0, case.bytes / copy_bw)
    base = {
        "family": case.family, "op": case.op, "shape": case.shape, "flops": case.flops,
        "bytes": case.bytes, "metric": case.metric,
        "ours_median_s": stats[OURS].median_s, "ours_min_s": stats[OURS].min_s,
        "ours_repeats": stats[OURS].repeats, "ours_rate": work / stats[OURS].median_s,
        "floor_s": floor_s, "ours_fraction_of_floor": floor_s / stats[OURS].median_s,
    }
    rows = []
    for a in anchors or [None]:
        row = dict(base, anchor=None, anchor_median_s=None, anchor_min_s=None, anchor_rate=None, ratio=None,
                   check="n/a", rel_err=None)
        if a is not None:
            s = stats[a.name]
            err = checks[a.name]
            ok = err is not None and err <= case.tolerance
            row.update(anchor=a.name, anchor_median_s=s.median_s, anchor_min_s=s.min_s, anchor_rate=work / s.median_s,
                       ratio=s.median_s / stats[OURS].median_s, rel_err=err,
                       check="n/a" if err is None else "ok" if ok else "MISMATCH")
        rows.append(row)
    return rows


def run_kernels(device: str, quick: bool, log: Callable[[str], None] = print,
                only: list[str] | None = None, command: str = "") -> dict[str, Any]:
    """Run the sweep; returns {"meta": ..., "rows": [...]}. `only` keeps the listed families."""
    env = Env(device)
    plan = PLANS[(device, quick)]
    cases = (quick_sweep if quick else full_sweep)(device)
    if only:
        cases = [c for c in cases if c.family in only]
    log(f"bench kernels: {env.info['name']} ({device}), {len(cases)} cases, "
        f"{'quick' if quick else 'full'} sweep; anchors: "
        f"{'torch ' + env.torch.__version__ if env.torch else 'no torch'}")
    idle_before = hardware.busy_warning(log, device)
    copy_bw = copy_bandwidth(env, plan, quick)
    probe = measured_peak(env, quick)
    sheet = env.info["fp32_peak_flops"] if device == "cuda" else None  # a CPU estimate is recorded only
    peak = max(probe, sheet or 0.0)
    log(f"copy bandwidth {copy_bw / 1e9:.1f} GB/s; FP32 GEMM probe {probe / 1e9:.1f} GFLOP/s"
        + (f"; datasheet peak {sheet / 1e12:.3f} TFLOP/s" if sheet else ""))
    rows: list[dict[str, Any]] = []
    started, load_before = time.time(), hardware.load_average()
    for case in cases:
        try:
            new = run_case(env, case, plan, peak, copy_bw)
        except Exception as exc:  # one broken case must not lose the rest of a long sweep
            log(f"  {case.op:18s} {case.shape}: ERROR {type(exc).__name__}: {exc}")
            rows.append({"family": case.family, "op": case.op, "shape": case.shape,
                         "error": f"{type(exc).__name__}: {exc}"})
            continue
        finally:
            env.release()
        rows += new
        r = new[0]
        tail = "  ".join(f"{x['anchor']} x{x['ratio']:.2f} [{x['check']}]" for x in new if x["anchor"])
        log(f"  {case.op:18s} {case.shape:48s} {r['ours_median_s'] * 1e6:11.1f} us  {tail}")
    gemm_rates = [r[k] for r in rows if r["family"] == "matmul" and "error" not in r
                  for k in ("ours_rate", "anchor_rate") if r.get(k)]
    peak = max([peak, *gemm_rates])
    set_floors(rows, peak, copy_bw)
    how = ("the best GEMM rate measured in this run (a " + ("1024" if quick else "8192" if device == "cuda" else "2048")
           + "^3 probe and every matmul row)" + (" or the datasheet peak, the higher" if sheet else ""))
    meta = {
        "kind": "kernels", "device": device, "quick": quick, "hardware": env.info,
        "copy_bytes_per_s": copy_bw, "best_gemm_flops_per_s": max(gemm_rates, default=None),
        "gemm_probe_flops_per_s": probe, "peak_flops_per_s": peak, "peak_how": how,
        "versions": hardware.versions(), "commit": hardware.git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "load_average": hardware.load_average(),
        "load_average_before": load_before, "cpu_idle_before": idle_before,
        "seconds": time.time() - started, "command": command,
        "timing": plan.__dict__, "threads": hardware.core_count() if device == "cpu" else None,
    }
    return {"meta": meta, "rows": rows}


def problems(rows: list[dict[str, Any]]) -> list[str]:
    """Errors and check mismatches, one line each (the CLI exits 1 when there are any)."""
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"{r['op']} {r['shape']}: {r['error']}")
        elif r.get("check") == "MISMATCH":
            out.append(f"{r['op']} {r['shape']}: ours and {r['anchor']} differ (rel err {r['rel_err']:.2e})")
    return out
