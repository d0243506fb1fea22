"""Numba loops of the CPU backend for losses, elementwise ops, reductions and batch gathering
(convolution loops live in cpu_conv, pooling loops in cpu_pool).

Every function writes into arrays it is given and is deterministic: every sum runs in a fixed
order. Arrays are C-contiguous (1-D loops take flat views). Reductions over float32 data
accumulate in float64.

Threads. The numba loops of this backend are compiled serial (no parallel=True): OpenBLAS already
runs every GEMM on all cores, and numba's OpenMP pool taking turns with it made whole training
steps 5-10x slower on 2 cores with libgomp's default spin-waiting. Instead `run_parts` cuts a large
memory-bound loop into row ranges and runs them on plain helper threads, which sleep on a queue
between calls and so never compete with BLAS. Loops run that way release the GIL (nogil) and treat
rows independently, so the split cannot change a result.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

#: elements of work below which a part is not worth a thread hand-off (about 60 us)
MIN_PART = 1 << 17
_WORKERS = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
_pool: ThreadPoolExecutor | None = None


def run_parts(loop: Callable[..., object], args: Sequence[object], sliced: Sequence[int], work: int) -> None:
    """loop(*args), with the arrays args[i], i in `sliced`, cut along their first axis (of equal
    length) into up to _WORKERS parts of at least MIN_PART elements of `work`; the calling thread
    runs the first part, helper threads the others."""
    global _pool
    rows = args[sliced[0]].shape[0]  # type: ignore[attr-defined]
    parts = max(1, min(_WORKERS, rows, work // MIN_PART))
    if parts == 1:
        loop(*args)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_WORKERS - 1, thread_name_prefix="gpuml-cpu")
    cuts = [rows * i // parts for i in range(parts + 1)]

    def part(k: int) -> list[object]:
        a = list(args)
        for i in sliced:
            a[i] = args[i][cuts[k] : cuts[k + 1]]  # type: ignore[index]
        return a

    futures = [_pool.submit(loop, *part(k)) for k in range(1, parts)]
    loop(*part(0))
    for future in futures:
        future.result()


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


# --------------------------------------------------------------------------- losses


@njit(cache=True, nogil=True)
def softmax_xent_rows(logits, labels, eps, dlogits):
    """Per row: stable log-softmax (max subtracted), loss against t = (1-eps) onehot + eps/K,
    dlogits = (softmax - t) / B. Returns the batch-mean loss as a float64. `dlogits` may be
    `logits`: a row's statistics are complete before any of its elements is overwritten."""
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
            dlogits[i, k] = (math.exp(float(logits[i, k]) - m - lse) - t) * inv_b
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


@njit(cache=True, nogil=True)
def sigmoid_fwd(x, out):
    """Stable logistic: exp of -|x| only, so nothing overflows; 1/(1+e) for x >= 0, e/(1+e) below.
    Branch-free, as the sign of activations is a coin flip for the branch predictor."""
    one = x.dtype.type(1)
    for i in range(x.size):
        v = x[i]
        e = math.exp(-abs(v))
        r = one / (one + e)
        out[i] = r if v >= 0 else e * r


@njit(cache=True, nogil=True)
def relu_bwd(y, dy, out):
    """out = dy * (y > 0) as a select (a NaN dy where y <= 0 gives 0). out may be dy."""
    for i in range(y.size):
        g = dy[i]
        out[i] = g if y[i] > 0 else 0


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
def gather_rows_lut(images, indices, lut, out):
    """out[b, j] = lut[images[indices[b], j]]: uint8 pixels through a 256-entry table."""
    B, D = out.shape
    for b in range(B):
        src = indices[b]
        for j in range(D):
            out[b, j] = lut[images[src, j]]


@njit(cache=True, nogil=True)
def channel_sums(dy, out):
    """out[c] = sum of dy (N, C, L) over n and l, in float64 with four running accumulators."""
    N, C, L = dy.shape
    for c in range(C):
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        for n in range(N):
            i = 0
            while i + 4 <= L:
                a0 += dy[n, c, i]
                a1 += dy[n, c, i + 1]
                a2 += dy[n, c, i + 2]
                a3 += dy[n, c, i + 3]
                i += 4
            while i < L:
                a0 += dy[n, c, i]
                i += 1
        out[c] = (a0 + a1) + (a2 + a3)
