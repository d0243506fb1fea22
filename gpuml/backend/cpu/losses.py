"""Losses of the CPU backend: fused softmax + cross-entropy, MSE, and the correct-count metric.

Softmax cross-entropy takes one of two paths, chosen by the number of classes K alone:
- K < WIDE_CLASSES (classifier heads such as the seed models' 10): one numba pass per row,
  everything in float64 (loops.softmax_xent_rows).
- K >= WIDE_CLASSES (a vocabulary): blocks of rows that stay in cache, exp by NumPy's
  vectorised loop in the logits' dtype (numba's math.exp is a scalar libm call, six times
  slower than NumPy over 4096 x 32000), row sums in float64 by a fixed-order numba loop, and the
  blocks spread over the helper threads. The block bounds depend on the shapes alone and each
  row is computed on its own, so results do not depend on the core count.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from gpuml.backend.cpu import loops
from gpuml.backend.cpu.checks import Checks
from gpuml.backend.cpu.loops import flush_subnormal

#: from this many classes on, softmax_xent takes the blocked, NumPy-exp path
WIDE_CLASSES = 256
#: elements of one block of rows on the wide path (about 1 MiB of float32: stays in L2)
WIDE_BLOCK = 1 << 18


@njit(cache=True, nogil=True)
def row_sums(e, out):
    """out[i] = sum of e[i, :] in float64, four running sums in a fixed order (one float64 chain
    is latency-bound; four independent ones run about four times faster)."""
    B, K = e.shape
    for i in range(B):
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        k = 0
        while k + 4 <= K:
            a0 += float(e[i, k])
            a1 += float(e[i, k + 1])
            a2 += float(e[i, k + 2])
            a3 += float(e[i, k + 3])
            k += 4
        while k < K:
            a0 += float(e[i, k])
            k += 1
        out[i] = (a0 + a1) + (a2 + a3)


@njit(cache=True, nogil=True)
def xent_finish(e, scale, labels, t_label, t_all, dlogits, tiny):
    """dlogits[i, k] = e[i, k] * scale[i] - t_all - (t_label where k == labels[i]), flushed to
    zero below `tiny`: (softmax - target) / B with e = exp(z - max) and scale = 1 / (B sum e)."""
    B, K = e.shape
    for i in range(B):
        sc = scale[i]
        for k in range(K):
            dlogits[i, k] = flush_subnormal(e[i, k] * sc - t_all, tiny)
        y = labels[i]
        dlogits[i, y] = flush_subnormal(e[i, y] * sc - t_all - t_label, tiny)


@njit(cache=True)
def ordered_sum(a):
    """sum(a) in index order (float64)."""
    total = 0.0
    for i in range(a.size):
        total += a[i]
    return total


def _wide_rows(logits: np.ndarray, labels: np.ndarray, eps: float, dlogits: np.ndarray, row_loss: np.ndarray,
               scratch: np.ndarray, lo: int, hi: int, tiny: np.floating) -> None:
    """Rows [lo, hi) of the wide path, in blocks of about WIDE_BLOCK elements; row_loss gets each
    row's loss (float64). dlogits may be logits: a block is read before it is written."""
    B, K = logits.shape
    dt = logits.dtype.type
    t_label, t_all, off = dt((1.0 - eps) / B), dt(eps / K / B), eps / K
    step = max(1, WIDE_BLOCK // K)
    sums = np.empty(step, np.float64)
    for r0 in range(lo, hi, step):
        r1 = min(hi, r0 + step)
        n = r1 - r0
        x, y = logits[r0:r1], labels[r0:r1]
        e = scratch[: n * K].reshape(n, K)
        m = x.max(axis=1)
        z_y = x[np.arange(n), y].astype(np.float64) - m
        np.subtract(x, m[:, None], out=e)
        sum_z = 0.0
        if eps:
            row_sums(e, sums[:n])
            sum_z = sums[:n].copy()
        np.exp(e, out=e)
        row_sums(e, sums[:n])
        lse = np.log(sums[:n])
        row_loss[r0:r1] = -((1.0 - eps) * (z_y - lse) + off * (sum_z - K * lse))
        xent_finish(e, (1.0 / (B * sums[:n])).astype(logits.dtype), y, t_label, t_all, dlogits[r0:r1], tiny)


class LossOps(Checks):
    """The Backend's loss methods, mixed into CpuBackend (it provides _ws, add_)."""

    def _softmax_xent_wide(self, logits: np.ndarray, labels: np.ndarray, eps: float, dlogits: np.ndarray) -> float:
        B, K = logits.shape
        row_loss = self._ws.scratch("xent_row_loss", (B,), np.dtype(np.float64))
        tiny = loops.smallest_normal(self.dtype)
        cuts = loops.part_cuts(B, B * K)
        block = min(B, max(1, WIDE_BLOCK // K)) * K
        scratch = [self._ws.scratch(f"xent{k}", (block,), self.dtype) for k in range(len(cuts) - 1)]
        loops.run_calls([(_wide_rows, (logits, labels, eps, dlogits, row_loss, scratch[k], cuts[k], cuts[k + 1], tiny))
                          for k in range(len(cuts) - 1)])
        return ordered_sum(row_loss) / B

    def softmax_xent(
        self,
        logits: np.ndarray,
        labels: np.ndarray,
        *,
        label_smoothing: float = 0.0,
        loss: np.ndarray | None = None,
        dlogits: np.ndarray | None = None,
        accumulate: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        op = "softmax_xent"
        c = self.checks(op, logits, labels, label_smoothing, loss, dlogits, accumulate)
        logits = c.float_in("logits", logits, ndim=2)
        B, K = logits.shape
        labels = c.typed_in("labels", labels, np.int32, (B,))
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"softmax_xent: label_smoothing must be in [0, 1), got {label_smoothing}")
        loss = c.out_buf("loss", loss, ())
        dlogits = c.out_buf("dlogits", dlogits, (B, K))
        if accumulate is not None:
            accumulate = c.out_buf("accumulate", accumulate, (2,))
        c.done()
        self.labels_in_range(op, labels, K)
        if accumulate is not None:  # counted first: dlogits may overwrite the logits
            correct = self.count_correct(logits, labels, out=self._ws.scratch("xent_correct", (), self.dtype))
        if K >= WIDE_CLASSES:
            loss[()] = self._softmax_xent_wide(logits, labels, float(label_smoothing), dlogits)
        else:
            tiny = float(loops.smallest_normal(self.dtype))
            loss[()] = loops.softmax_xent_rows(logits, labels, float(label_smoothing), dlogits, tiny)
        if accumulate is not None:
            self.add_(accumulate[0:1], loss.reshape(1), alpha=float(B))  # a NaN loss stays NaN
            self.add_(accumulate[1:2], correct.reshape(1))
        return loss, dlogits

    def mse(
        self,
        pred: np.ndarray,
        target: np.ndarray,
        *,
        loss: np.ndarray | None = None,
        dpred: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        c = self.checks("mse", pred, target, loss, dpred)
        pred = c.float_in("pred", pred)
        target = c.float_in("target", target, shape=pred.shape)
        loss = c.out_buf("loss", loss, ())
        dpred = c.out_buf("dpred", dpred, pred.shape)
        c.done()
        loss[()] = loops.mse_flat(pred.reshape(-1), target.reshape(-1), dpred.reshape(-1))
        return loss, dpred

    def count_correct(self, logits: np.ndarray, labels: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        c = self.checks("count_correct", logits, labels, out)
        logits = c.float_in("logits", logits, ndim=2)
        labels = c.int_in("labels", labels, (logits.shape[0],))
        out = c.out_buf("out", out, ())
        c.done()
        out[()] = np.count_nonzero(np.argmax(logits, axis=1) == labels)
        return out

