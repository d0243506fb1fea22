"""Numba loops of the CPU backend for losses, elementwise ops, reductions and batch gathering
(convolution loops live in conv_loops.py, pooling loops in pool.py).

Every function writes into arrays it is given and is deterministic: every sum runs in a fixed
order. Arrays are C-contiguous (1-D loops take flat views). Reductions over float32 data
accumulate in float64.

Threads. The numba loops of this backend are compiled serial (no parallel=True): OpenBLAS already
runs every GEMM on all cores, and numba's OpenMP pool taking turns with it made whole training
steps 5-10x slower on 2 cores with libgomp's default spin-waiting. Instead `run_parts` cuts a large
memory-bound loop into row ranges and runs them on plain helper threads, which sleep on a queue
between calls and so never compete with BLAS. Loops run that way release the GIL (nogil) and treat
rows independently, so the split cannot change a result. The exceptions are Adam's update, the
ReLU backward and the dense bias+ReLU epilogue with MKL loaded (optim.adam_pieces, the *_split
loops here, CpuBackend._on_mkl_pool): MKL's OpenMP runtime then serves numba's parallel loops
too, one pool instead of two (mkl.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import itertools
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from numba import njit, prange

# flat-view offsets as uint64: numba guards signed indices against wraparound, which keeps LLVM
# from vectorising the loop (see conv.py)
_U = np.uint64

#: elements of work below which a part is not worth a thread hand-off. A hand-off costs 50-150 us
#: on a 2-vCPU virtual machine (waking a sleeping thread; with MKL, presumably also a helper
#: waiting for the core an MKL thread still spins on, mkl.py), about what one thread needs for
#: 256 Ki elements of the loops here: at 64 Ki the seed MLP's 128x1024 ReLU masks and column sums
#: ran on two threads and its step at batch 128 took 6.1-6.2 ms, at 256 Ki 5.7-5.8 (3 alternating
#: runs each, with MKL, 2026-12-02)
MIN_PART = 1 << 18
_WORKERS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
#: one inbox per helper thread, made on first need; a job is (fn, args, context, index, done queue)
_inboxes: list[queue.SimpleQueue] = []
_inboxes_lock = threading.Lock()


def part_cuts(count: int, work: int) -> list[int]:
    """Boundaries of up to _WORKERS near-equal ranges of [0, count), each of at least MIN_PART
    elements of `work` (one range when the work is small)."""
    parts = max(1, min(_WORKERS, count, work // MIN_PART))
    return [count * i // parts for i in range(parts + 1)]


def _helper(inbox: queue.SimpleQueue) -> None:
    while True:
        fn, args, context, index, done = inbox.get()
        try:
            context.run(fn, *args)
        except BaseException as exc:  # handed to the caller, which re-raises it
            done.put((index, exc))
        else:
            done.put((index, None))


def _helper_inboxes(count: int) -> list[queue.SimpleQueue]:
    if len(_inboxes) < count:
        with _inboxes_lock:
            while len(_inboxes) < count:
                inbox: queue.SimpleQueue = queue.SimpleQueue()
                threading.Thread(target=_helper, args=(inbox,), name=f"gpuml-cpu-{len(_inboxes)}", daemon=True).start()
                _inboxes.append(inbox)
    return _inboxes[:count]


def run_calls(calls: list[tuple[Callable[..., object], Sequence[object]]]) -> None:
    """Runs calls[0] on the calling thread and the others on helper threads; returns when all are
    done (re-raising the error of the first call that failed), so no helper still writes into a
    buffer afterwards. Helpers are plain threads blocked on their own SimpleQueue: a hand-off is
    one put and one get (a ThreadPoolExecutor's futures cost about 25 Python calls each)."""
    if len(calls) == 1:
        calls[0][0](*calls[0][1])
        return
    done: queue.SimpleQueue = queue.SimpleQueue()
    # Each helper runs in a copy of the caller's context, so the caller's np.errstate (the
    # trainer silences overflow warnings: its NaN check reports) holds there too.
    for i, (inbox, (fn, args)) in enumerate(zip(_helper_inboxes(len(calls) - 1), calls[1:]), 1):
        inbox.put((fn, args, contextvars.copy_context(), i, done))
    try:
        calls[0][0](*calls[0][1])
    finally:
        errors = sorted((done.get() for _ in range(len(calls) - 1)), key=lambda r: r[0])
    for _, exc in errors:
        if exc is not None:
            raise exc


def run_parts(loop: Callable[..., object], args: Sequence[object], sliced: Sequence[int], work: int) -> None:
    """loop(*args), with the arrays args[i], i in `sliced`, cut along their first axis (of equal
    length) into up to _WORKERS parts of at least MIN_PART elements of `work`; the calling thread
    runs the first part, helper threads the others."""
    cuts = part_cuts(args[sliced[0]].shape[0], work)  # type: ignore[attr-defined]

    def part(k: int) -> list[object]:
        a = list(args)
        for i in sliced:
            a[i] = args[i][cuts[k] : cuts[k + 1]]  # type: ignore[index]
        return a

    run_calls([(loop, part(k)) for k in range(len(cuts) - 1)])


def run_ranges(loop: Callable[..., object], args: Sequence[object], count: int, work: int) -> None:
    """loop(*args, lo, hi) for near-equal ranges [lo, hi) covering [0, count), as run_parts does,
    for loops whose parts are not slices along a first axis (columns of a matrix, say)."""
    cuts = part_cuts(count, work)
    run_calls([(loop, (*args, cuts[k], cuts[k + 1])) for k in range(len(cuts) - 1)])


def run_tasks(task: Callable[[int, int], object], count: int) -> None:
    """task(worker, i) for every i in range(count), each thread (the calling one and up to
    _WORKERS - 1 helpers) taking the next i when it is free; `worker` numbers the thread, so a task
    can use that thread's own scratch. Meant for tasks that mix numba loops with GEMMs (the chunks
    of a convolution): BLAS runs single-threaded meanwhile, each thread's GEMMs on its own core, so
    no core waits on another between a GEMM and a loop. A task's result must depend on i alone;
    BLAS is single-threaded even with one worker, so results do not depend on the core count."""
    with _blas_single_threaded() as limited:
        workers = max(1, min(_WORKERS, count)) if limited else 1
        counter = itertools.count()  # next() on it is atomic under the GIL

        def work(worker: int) -> None:
            while (i := next(counter)) < count:
                task(worker, i)

        run_calls([(work, (k,)) for k in range(workers)])


_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved = 0


@contextlib.contextmanager
def _blas_single_threaded() -> Iterator[bool]:
    """OpenBLAS limited to one thread (its thread count is process-wide) while any caller is
    inside; yields False, changing nothing, when numpy's BLAS is not an OpenBLAS we can set."""
    global _blas_users, _blas_saved
    fns = blas_thread_functions()
    if fns is None:
        yield False
        return
    get, set_ = fns
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = int(get())
            set_(1)
        _blas_users += 1
    try:
        yield True
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                set_(_blas_saved)


@functools.cache
def blas_thread_functions() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get, set) of the thread count of the OpenBLAS that numpy loaded (numpy's wheels ship it in
    numpy.libs), or None for another BLAS."""
    libs = Path(np.__file__).parent.parent / "numpy.libs"
    for path in sorted(libs.glob("*openblas*")) if libs.is_dir() else []:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                set_.argtypes = [ctypes.c_int]
                return get, set_
    return None


# --------------------------------------------------------------------------- subnormals


def smallest_normal(dtype: np.dtype | type) -> np.floating:
    """The threshold of flush_subnormal for values stored as `dtype`: its smallest normal number
    (float32 1.1754944e-38, float64 2.2250738585072014e-308), as a scalar of that dtype."""
    return np.finfo(dtype).tiny


@njit(cache=True, nogil=True)
def flush_subnormal(x, tiny):
    """x, or zero where |x| < tiny (a NaN stays NaN). Subnormal floats take a microcode assist in
    x86 arithmetic, about 100 times slower, and a state decaying geometrically (m *= beta1 with a
    dead unit's zero gradient) does not reach zero but sticks in the subnormal range, where
    round-to-nearest maps beta1 * x back to x: issue 15 measured training slowing by 80% over
    three epochs. Flushing where a value is written keeps every stored value zero or normal at
    one compare and select per element; a value this small never changes a normal one it is
    added to. The zero is `tiny - tiny` so the select stays in x's type and the loop vectorises."""
    return tiny - tiny if abs(x) < tiny else x


@njit(cache=True, nogil=True)
def bias_act_rows(y, bias, has_bias, relu):
    """In place on y (B, N): y = act(y + bias); NaN passes through relu as in np.maximum."""
    B, N = y.shape
    for i in range(B):
        for j in range(N):
            v = y[i, j]
            if has_bias:
                v += bias[j]
            if relu and v < 0:
                v = 0
            y[i, j] = v


@njit(cache=True, nogil=True, parallel=True)
def bias_act_rows_split(y, bias, has_bias, relu, parts):
    """bias_act_rows in `parts` near-equal row ranges, as relu_bwd_split."""
    B = y.shape[0]
    for k in prange(parts):
        lo, hi = B * k // parts, B * (k + 1) // parts
        bias_act_rows(y[lo:hi], bias, has_bias, relu)


# --------------------------------------------------------------------------- losses


@njit(cache=True, nogil=True)
def softmax_xent_rows(logits, labels, eps, dlogits, tiny):
    """Per row: stable log-softmax (max subtracted), loss against t = (1-eps) onehot + eps/K,
    dlogits = (softmax - t) / B, flushed to zero below `tiny` (the smallest normal of dlogits'
    dtype: a class trailing the top logit by more than about 87 in float32, 708 in float64, has
    a softmax that underflows, and every backward GEMM would carry the subnormal). Returns the
    batch-mean loss as a float64. `dlogits` may be `logits`: a row's statistics are complete
    before any of its elements is overwritten."""
    B, K = logits.shape
    inv_b = 1.0 / B
    off = eps / K
    total = 0.0
    for i in range(B):
        m = float(logits[i, 0])
        for k in range(1, K):
            m = max(m, float(logits[i, k]))
        sum_exp = 0.0
        sum_z = 0.0
        for k in range(K):
            z = float(logits[i, k]) - m
            sum_exp += math.exp(z)
            sum_z += z
        lse = math.log(sum_exp)
        y = labels[i]
        logp_y = float(logits[i, y]) - m - lse
        total += -((1.0 - eps) * logp_y + off * (sum_z - K * lse))
        for k in range(K):
            t = off + (1.0 - eps if k == y else 0.0)
            dlogits[i, k] = flush_subnormal((math.exp(float(logits[i, k]) - m - lse) - t) * inv_b, tiny)
    return total * inv_b


@njit(cache=True, nogil=True)
def mse_flat(pred, target, dpred):
    """Returns mean((pred - target)^2) as float64; dpred = 2 (pred - target) / n."""
    n = pred.size
    scale = 2.0 / n
    acc = 0.0
    for i in range(n):
        d = float(pred[i]) - float(target[i])
        acc += d * d
        dpred[i] = d * scale
    return acc / n


# --------------------------------------------------------------------------- elementwise


@njit(cache=True, nogil=True, error_model="numpy")  # no per-element ZeroDivisionError check
def sigmoid_fwd(x, out, tiny):
    """Stable logistic: exp of -|x| only, so nothing overflows; 1/(1+e) for x >= 0, e/(1+e) below,
    flushed to zero below `tiny` (a saturated unit, x < -87 in float32, would otherwise store a
    subnormal that its backward multiplies again). Branch-free, as the sign of activations is a
    coin flip for the branch predictor."""
    one = x.dtype.type(1)
    for i in range(x.size):
        v = x[i]
        e = math.exp(-abs(v))
        r = one / (one + e)
        out[i] = flush_subnormal(r if v >= 0 else e * r, tiny)


@njit(cache=True, nogil=True)
def relu_bwd(y, dy, out):
    """out = dy * (y > 0) as a select (a NaN dy where y <= 0 gives 0). out may be dy."""
    for i in range(y.size):
        g = dy[i]
        out[i] = g if y[i] > 0 else 0


@njit(cache=True, nogil=True, parallel=True)
def relu_bwd_split(y, dy, out, parts):
    """relu_bwd in `parts` near-equal ranges on numba's OpenMP threads (only when they are MKL's:
    CpuBackend._on_mkl_pool)."""
    n = y.size
    for k in prange(parts):
        lo, hi = n * k // parts, n * (k + 1) // parts
        relu_bwd(y[lo:hi], dy[lo:hi], out[lo:hi])


@njit(cache=True, nogil=True)
def tanh_bwd(y, dy, out):
    """out = dy * (1 - y^2). out may be dy."""
    one = y.dtype.type(1)
    for i in range(y.size):
        v = y[i]
        out[i] = dy[i] * (one - v * v)


@njit(cache=True, nogil=True)
def sigmoid_bwd(y, dy, out):
    """out = dy * y * (1 - y). out may be dy."""
    one = y.dtype.type(1)
    for i in range(y.size):
        v = y[i]
        out[i] = dy[i] * v * (one - v)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@njit(cache=True, nogil=True)
def dropout_fwd(x, p, seed, offset, scale, out, mask):
    """The splitmix64 keep test of gpuml.backend.rng.uniform, bit for bit (uint64 wrap-around),
    fused with out = x * mask * scale. seed and offset are uint64; p and scale floats."""
    for i in range(x.size):
        z = seed + _GOLDEN * (offset + np.uint64(i) + np.uint64(1))
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z = z ^ (z >> np.uint64(31))
        u = float(z >> np.uint64(40)) / 16777216.0
        keep = u >= p
        mask[i] = 1 if keep else 0
        out[i] = x[i] * (scale if keep else 0)


@njit(cache=True, nogil=True)
def mask_scale(dy, mask, scale, out):
    """out = dy * mask * scale (dropout backward)."""
    for i in range(dy.size):
        g = dy[i]
        out[i] = g * (scale if mask[i] else 0)


@njit(cache=True, nogil=True)
def axpy(dst, src, alpha):
    """dst += alpha * src."""
    for i in range(dst.size):
        dst[i] += alpha * src[i]


# --------------------------------------------------------------------------- data


@njit(cache=True, nogil=True)
def first_outside_range(values, limit):
    """The index of the first of `values` (flat, integer) outside [0, limit), or -1."""
    for i in range(values.size):
        v = values[i]
        if v < 0 or v >= limit:
            return i
    return -1


@njit(cache=True, nogil=True)
def gather_rows_lut(images, indices, lut, out):
    """out[b, j] = lut[images[indices[b], j]]: uint8 pixels through a 256-entry table."""
    B, D = out.shape
    for b in range(B):
        src = indices[b]
        for j in range(D):
            out[b, j] = lut[images[src, j]]


#: float64 lanes of channel_sums' accumulator block (64 KiB: stays in L1/L2 while dy streams by)
SUM_LANES = 8192


@njit(cache=True, nogil=True)
def channel_sums(dy, out, lanes, c_lo, c_hi):
    """out[c] = sum of dy (N, C, L) over n and l, for c in [c_lo, c_hi), in float64: every (c, l)
    has its own accumulator summing over n in order (independent lanes, so the loop vectorises
    without reassociating anything), then out[c] sums its L lanes in order. A channel's result
    does not depend on the range it is computed in, nor on `lanes` (SUM_LANES: channels are
    summed in blocks of about that many accumulators)."""
    N, C, L = dy.shape
    block = max(1, min(c_hi - c_lo, lanes // max(L, 1)))
    acc = np.empty(block * L, np.float64)
    df = dy.reshape(-1)
    for b0 in range(c_lo, c_hi, block):
        b1 = min(c_hi, b0 + block)
        span = _U((b1 - b0) * L)
        acc[:] = 0
        for n in range(N):
            src = _U((n * C + b0) * L)
            for i in range(span):
                acc[i] += df[src + i]
        for c in range(b0, b1):
            total = 0.0
            base = (c - b0) * L
            for i in range(L):
                total += acc[base + i]
            out[c] = total


def worker_count() -> int:
    """How many threads a pass is split over (the usable cores, at most 8)."""
    return _WORKERS
