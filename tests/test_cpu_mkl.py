"""The CPU backend's MKL path for dense products (gpuml/backend/cpu/mkl.py): the choice between
MKL and OpenBLAS (GPUML_CPU_BLAS), MKL's products against a float64 reference on random,
non-tile-multiple shapes with NaN-poisoned outputs, and the reproducibility promise (the same bits
on 1 or 2 threads and at any alignment). The MKL tests skip where the `mkl` wheel is not
installed; CI installs it and sets GPUML_REQUIRE_MKL=1, which turns that skip into a failure."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gpuml.backend.cpu import mkl as cpu_mkl
from gpuml.backend.cpu.backend import CpuBackend
from gpuml.errors import DeviceError


def _fresh_load(monkeypatch: pytest.MonkeyPatch, choice: str | None) -> cpu_mkl.Mkl | None:
    if choice is None:
        monkeypatch.delenv("GPUML_CPU_BLAS", raising=False)
    else:
        monkeypatch.setenv("GPUML_CPU_BLAS", choice)
    return cpu_mkl.load.__wrapped__(2)


@pytest.fixture(scope="module")
def mkl() -> cpu_mkl.Mkl:
    found = cpu_mkl.load.__wrapped__(2) if os.environ.get("GPUML_CPU_BLAS", "auto") != "openblas" else None
    if found is None:
        if os.environ.get("GPUML_REQUIRE_MKL"):
            pytest.fail("GPUML_REQUIRE_MKL is set but MKL did not load (pip install 'gpuml[mkl]')")
        pytest.skip("MKL not installed (pip install 'gpuml[mkl]')")
    yield found
    found.set_threads(2)


def test_bad_choice_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DeviceError, match=r"GPUML_CPU_BLAS must be auto, mkl or openblas, got 'fast'"):
        _fresh_load(monkeypatch, "fast")


def test_mkl_required_but_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_mkl, "_candidates", lambda name: [])
    with pytest.raises(DeviceError, match=r"GPUML_CPU_BLAS=mkl but no libmkl_rt was found.*gpuml\[mkl\]"):
        _fresh_load(monkeypatch, "mkl")
    assert _fresh_load(monkeypatch, None) is None  # auto: OpenBLAS, silently


def test_openblas_choice_keeps_numpy_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _fresh_load(monkeypatch, "openblas") is None
    monkeypatch.setattr(cpu_mkl, "load", lambda threads: None)
    assert "MKL" not in CpuBackend().describe()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_mkl_products_match_float64_reference(mkl: cpu_mkl.Mkl, dtype: type, trans_a: bool, trans_b: bool) -> None:
    rng = np.random.default_rng(3)
    for m, k, n in [(37, 91, 53), (1, 130, 7), (129, 3, 1025), (32, 784, 1024)]:
        a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(dtype)
        b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
        opa, opb = (a.T if trans_a else a), (b.T if trans_b else b)
        out = np.full((m, n), np.nan, dtype)
        assert mkl.matmul(opa, opb, out)
        ref = opa.astype(np.float64) @ opb.astype(np.float64)
        bound = np.abs(opa).astype(np.float64) @ np.abs(opb).astype(np.float64)
        eps = np.finfo(dtype).eps
        assert np.all(np.abs(out - ref) <= 2 * k * eps * bound + 1e-30), (m, k, n)
        assert mkl._rt.MKL_Get_Max_Threads() == mkl.threads  # a small product's one thread is undone


def test_mkl_declines_what_it_cannot_take(mkl: cpu_mkl.Mkl) -> None:
    a = np.ones((8, 6), np.float32)
    b = np.ones((6, 5), np.float32)
    out = np.full((8, 5), np.nan, np.float32)
    assert not mkl.matmul(a[:, ::2], b[:3], out)  # neither C- nor F-contiguous
    assert not mkl.matmul(a.astype(np.float64), b, out)  # mixed dtypes
    assert not mkl.matmul(a, b, np.full((5, 8), np.nan, np.float32).T)  # out not C-contiguous
    assert np.isnan(out).all()  # nothing written


def test_backend_matmul_on_mkl_and_openblas_agree(mkl: cpu_mkl.Mkl, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((45, 67)).astype(np.float32)
    w = rng.standard_normal((67, 39)).astype(np.float32)
    bias = rng.standard_normal(39).astype(np.float32)
    calls = []
    real = mkl.matmul
    monkeypatch.setattr(mkl, "matmul", lambda a, b, out: calls.append(a.shape) or real(a, b, out))
    monkeypatch.setattr(cpu_mkl, "load", lambda threads: mkl)
    on_mkl = CpuBackend()
    assert on_mkl._mkl is mkl and "MKL" in on_mkl.describe()
    monkeypatch.setattr(cpu_mkl, "load", lambda threads: None)
    on_openblas = CpuBackend()
    for be in (on_mkl, on_openblas):
        y = be.matmul(x, w, bias=bias, activation="relu")
        acc = np.full((67, 39), 0.5, np.float32)
        be.matmul(x, y, trans_a=True, accumulate=True, out=acc)
        be.results = (y, acc)
    assert len(calls) == 2  # the forward and the accumulated product went to MKL
    for got, want in zip(on_mkl.results, on_openblas.results):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-4)


def test_mkl_bits_do_not_depend_on_threads_or_alignment(mkl: cpu_mkl.Mkl) -> None:
    """MKL runs in its strict reproducible mode: without it the 32x784 @ 784x1024 product differed
    between 1 and 2 threads (checked on the 2-vCPU machine of bench/RESULTS.md)."""
    rng = np.random.default_rng(5)

    def at_offset(src: np.ndarray, offset: int) -> np.ndarray:  # a copy starting `offset` elements into a buffer
        buf = np.empty(src.size + 16, src.dtype)
        view = buf[offset:offset + src.size].reshape(src.shape)
        view[...] = src
        return view

    for m, k, n, ta in [(32, 784, 1024, False), (32, 1024, 1024, False), (784, 32, 1024, True)]:
        a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        results = []
        for threads, offset in [(1, 0), (2, 0), (2, 1), (2, 3), (1, 5)]:
            mkl.set_threads(threads)
            aa, bb = at_offset(a, offset), at_offset(b, (offset * 7) % 16)
            out = at_offset(np.full((m, n), np.nan, np.float32), offset)
            assert mkl.matmul(aa.T if ta else aa, bb, out)
            results.append(out.copy())
        mkl.set_threads(2)
        for r in results[1:]:
            assert np.array_equal(r, results[0]), (m, k, n)


def test_convolutions_run_their_chunk_gemms_on_one_mkl_thread(mkl: cpu_mkl.Mkl,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The convolution chunks' GEMMs go to MKL one thread each (run_tasks spreads the chunks), the
    results agree with the OpenBLAS backend's, and each call leaves the thread's MKL thread
    count as it found it (else the dense products after it would run on one thread)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((6, 9, 11, 10)).astype(np.float32)  # 9 channels: the channels-last path
    w = rng.standard_normal((13, 9, 3, 3)).astype(np.float32)
    b = rng.standard_normal(13).astype(np.float32)
    calls = []
    real = mkl.matmul_here

    def counted(a: np.ndarray, bb: np.ndarray, out: np.ndarray) -> bool:
        calls.append(out.shape)
        done = real(a, bb, out)
        assert mkl._rt.MKL_Get_Max_Threads() == mkl.threads
        return done

    monkeypatch.setattr(mkl, "matmul_here", counted)
    monkeypatch.setattr(cpu_mkl, "load", lambda threads: mkl)
    on_mkl = CpuBackend()
    monkeypatch.setattr(cpu_mkl, "load", lambda threads: None)
    on_openblas = CpuBackend()
    results = []
    for be in (on_mkl, on_openblas):
        y = be.conv2d_fwd(x, w, b, (1, 2), (1, 0), activation="relu")
        dy = rng.standard_normal(y.shape).astype(np.float32) if not results else results[0][3]
        dx = be.conv2d_bwd_data(dy, w, x.shape, (1, 2), (1, 0), relu_mask=y)
        dw = be.conv2d_bwd_weight(x, dy, w.shape, (1, 2), (1, 0), relu_mask=y)
        results.append((y, dx, dw, dy))
    assert len(calls) >= 3  # forward, data and weight gradients
    for got, want in zip(results[0][:3], results[1][:3]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


_SHARED_POOL_SCRIPT = r"""
import sys, numpy as np, numba
from gpuml.backend.cpu import CpuBackend, loops, optim
be = CpuBackend()
assert be._ws.mkl is not None and be._ws.mkl.numba_shares_pool, "numba does not share MKL's pool"
rng = np.random.default_rng(7)
shapes = [(37, 29), (29,), (301, 11), (11,), (5,)]
def state():
    return ([rng.standard_normal(s).astype(np.float32) for s in shapes],
            [rng.standard_normal(s).astype(np.float32) * 1e-3 for s in shapes])
p, g = state()
m = [np.full(s, 1e-3, np.float32) for s in shapes]
v = [np.full(s, 1e-6, np.float32) for s in shapes]
copies = [[a.copy() for a in lst] for lst in (p, g, m, v)]
calls = []
real = optim.adam_pieces
optim.adam_pieces = lambda *a: calls.append(len(a)) or real(*a)
loops.MIN_PART = 100  # several parts, each over pieces of several tensors
for step in (1, 2, 3):
    be.adam_step(p, g, m, v, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=step, weight_decay=0.01)
assert len(calls) == 3 and numba.threading_layer() == "omp"
helpers = CpuBackend()
helpers._ws.mkl = None  # the same update on gpuml's helper threads
hp, hg, hm, hv = copies
for step in (1, 2, 3):
    helpers.adam_step(hp, hg, hm, hv, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=step, weight_decay=0.01)
for a, b in zip(p + m + v, hp + hm + hv):
    assert np.array_equal(a, b)
# the elementwise passes after a dense product split over the same threads: same bits as serial
y = rng.standard_normal((130, 301)).astype(np.float32)
dy = rng.standard_normal((130, 301)).astype(np.float32)
dy[y <= 0] = np.nan  # a closed mask gives 0 even for NaN
want = np.empty_like(dy)
loops.relu_bwd(y.reshape(-1), dy.reshape(-1), want.reshape(-1))
split = []
real_split = loops.relu_bwd_split
loops.relu_bwd_split = lambda *a: split.append(a[-1]) or real_split(*a)
assert np.array_equal(be.activation_bwd("relu", y, dy), want) and split == [loops.worker_count()]
x = rng.standard_normal((130, 77)).astype(np.float32)
w = rng.standard_normal((77, 301)).astype(np.float32)
bias = rng.standard_normal(301).astype(np.float32)
want = be.matmul(x, w)
loops.bias_act_rows(want, bias, True, True)
epilogues = []
real_rows = loops.bias_act_rows_split
loops.bias_act_rows_split = lambda *a: epilogues.append(a[-1]) or real_rows(*a)
assert np.array_equal(be.matmul(x, w, bias=bias, activation="relu"), want) and epilogues == [loops.worker_count()]
print("same bits")
"""


def test_adam_on_mkls_openmp_threads_matches_the_helper_threads(mkl: cpu_mkl.Mkl) -> None:
    """In a fresh interpreter (PyTorch, which this test process may have imported first, would
    put its own OpenMP there) numba's parallel Adam runs on the OpenMP runtime MKL loaded, and
    gives the same bits as the update on gpuml's helper threads, with parts spanning tensors."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _SHARED_POOL_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "same bits" in out.stdout, out.stderr[-3000:]


def test_benchmark_machine_line_names_the_blas_that_ran(mkl: cpu_mkl.Mkl, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuml.benchmark import hardware

    monkeypatch.setattr(cpu_mkl, "LOADED", None)
    without = hardware.blas_description()
    assert "MKL" not in without
    monkeypatch.setattr(cpu_mkl, "LOADED", mkl)
    assert hardware.blas_description() == f"{mkl.version} for gpuml's GEMMs ({mkl.threads} threads), numpy's {without}"


def test_small_products_after_a_pause_run_on_the_calling_thread(mkl: cpu_mkl.Mkl,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A product under SMALL_MACS runs on MKL's threads only while they still spin from a larger
    one (TEAM_WARM_S); after a pause, or inside a convolution chunk (matmul_here), it runs on the
    calling thread: MKL's thread-local count is set to 1 around exactly those calls."""
    set_local = []
    rt = mkl._rt

    class Spy:
        def __getattr__(self, name: str):
            real = getattr(rt, name)
            if name != "MKL_Set_Num_Threads_Local":
                return real
            return lambda n: set_local.append(n) or real(n)

    monkeypatch.setattr(mkl, "_rt", Spy())
    rng = np.random.default_rng(8)
    big = [rng.standard_normal(s).astype(np.float32) for s in ((128, 1024), (1024, 1024))]
    small = [rng.standard_normal(s).astype(np.float32) for s in ((128, 1024), (1024, 10))]
    out_big, out_small = np.empty((128, 1024), np.float32), np.empty((128, 10), np.float32)
    clock = [100.0]
    monkeypatch.setattr(cpu_mkl.time, "perf_counter", lambda: clock[0])
    mkl.matmul(*big, out_big)
    assert set_local == []  # large: the team
    clock[0] += cpu_mkl.TEAM_WARM_S / 2
    mkl.matmul(*small, out_small)
    assert set_local == []  # small, the team still spinning
    clock[0] += cpu_mkl.TEAM_WARM_S * 3
    mkl.matmul(*small, out_small)
    assert set_local[0] == 1 and len(set_local) == 2  # small after a pause: alone, then restored
    mkl.matmul_here(*big, out_big)
    assert set_local[2] == 1 and len(set_local) == 4  # a convolution chunk's: alone, however large
    np.testing.assert_allclose(out_small, small[0] @ small[1], rtol=1e-4, atol=1e-3)
