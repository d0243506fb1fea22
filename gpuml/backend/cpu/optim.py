"""Numba loops of the CPU backend's optimizer updates: one fused, in-place pass per tensor.

All arrays are flat (1-D views of C-contiguous tensors) of one float dtype, and the scalar
hyper-parameters arrive already cast to that dtype, so a float32 update rounds like a float32
device kernel and a float64 one is exact to the formula.

Loops that divide are compiled with error_model="numpy": x / 0 gives inf or NaN as on a device
instead of a ZeroDivisionError check on every element, which kept the loop from vectorising (Adam
ran at a sixth of the speed, bound by scalar sqrt and division).

Every value an update writes (parameter and state) is flushed to zero below the dtype's smallest
normal (loops.flush_subnormal): with zero gradients, as dead ReLU units have, m *= beta1,
velocity *= momentum and square_avg *= alpha decay geometrically into the subnormal range and
stay there, where x86 arithmetic is about 100 times slower (issue 15: 59% of Adam's m for the
seed MLP's hidden layer after 5 epochs, each epoch slower than the last). Against PyTorch,
which keeps subnormals, this changes only values below 1.2e-38 (float32; 2.2e-308 in float64):
such a value in m moves a parameter by at most lr * 1.2e-38 / eps, so the trajectories agree
unless a parameter is itself that small; a v or square_avg below it adds less than eps's
rounding to its square root.

An update is memory-bound and one core cannot draw the machine's bandwidth, so a large tensor is
updated in parts on several threads (loops.run_parts); each element is updated on its own, so
the split cannot change the result.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import numpy as np
from numba import njit, prange

from gpuml.backend.cpu.checks import Checks
from gpuml.backend.cpu.loops import flush_subnormal, part_cuts, run_calls, smallest_normal


@njit(cache=True, nogil=True)
def sgd_update(p, g, lr, wd, tiny):
    """p -= lr * (g + wd p)"""
    for i in range(p.size):
        p[i] = flush_subnormal(p[i] - lr * (g[i] + wd * p[i]), tiny)


@njit(cache=True, nogil=True)
def momentum_update(p, g, vel, lr, mu, wd, nesterov, tiny):
    """g' = g + wd p; v = mu v + g'; p -= lr * (g' + mu v if nesterov else v)"""
    for i in range(p.size):
        gi = g[i] + wd * p[i]
        vi = flush_subnormal(mu * vel[i] + gi, tiny)
        vel[i] = vi
        if nesterov:
            p[i] = flush_subnormal(p[i] - lr * (gi + mu * vi), tiny)
        else:
            p[i] = flush_subnormal(p[i] - lr * vi, tiny)


@njit(cache=True, nogil=True, error_model="numpy")
def adam_update(p, g, m, v, lr_t, beta1, one_m_beta1, beta2, one_m_beta2, inv_sqrt_bc2, eps, wd, decay, sq_min, m_min,
                tiny):
    """Adam/AdamW in PyTorch's arrangement: g' = g + wd p (wd = 0 for AdamW); p *= decay
    (1 - lr wd for AdamW, else 1); m, v moments; p -= lr_t m / (sqrt(v) inv_sqrt_bc2 + eps) with
    lr_t = lr / (1 - beta1^t) and inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t), which is
    lr m_hat / (sqrt(v_hat) + eps). g' enters v's square as zero below sq_min (square_min), and m
    the step as zero below m_min = tiny / lr_t, where lr_t m would be subnormal: that step is
    below tiny / eps (1.2e-30 in float32) and changes only a parameter below 2^24 times it."""
    for i in range(p.size):
        gi = g[i] + wd * p[i]
        mi = flush_subnormal(beta1 * m[i] + one_m_beta1 * gi, tiny)
        gs = flush_subnormal(gi, sq_min)
        vi = flush_subnormal(beta2 * v[i] + one_m_beta2 * gs * gs, tiny)
        m[i] = mi
        v[i] = vi
        mu = flush_subnormal(mi, m_min)
        p[i] = flush_subnormal(p[i] * decay - lr_t * mu / (math.sqrt(vi) * inv_sqrt_bc2 + eps), tiny)


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def adam_pieces(ps, gs, ms, vs, piece_t, piece_lo, piece_hi, part_start, lr_t, beta1, one_m_beta1, beta2,
                one_m_beta2, inv_sqrt_bc2, eps, wd, decay, sq_min, m_min, tiny):
    """adam_update over pieces of the tensors ps[t], gs[t], ... (tuples of flat arrays): part k
    (one per thread of numba's OpenMP pool, optim._Pieces) updates pieces part_start[k] to
    part_start[k+1] - 1, piece j being elements piece_lo[j]:piece_hi[j] of tensor piece_t[j]."""
    for k in prange(part_start.size - 1):
        for j in range(part_start[k], part_start[k + 1]):
            t, lo, hi = piece_t[j], piece_lo[j], piece_hi[j]
            adam_update(ps[t][lo:hi], gs[t][lo:hi], ms[t][lo:hi], vs[t][lo:hi], lr_t, beta1, one_m_beta1, beta2,
                        one_m_beta2, inv_sqrt_bc2, eps, wd, decay, sq_min, m_min, tiny)


@njit(cache=True, nogil=True, error_model="numpy")
def rmsprop_update(p, g, sq, lr, alpha, one_m_alpha, eps, wd, sq_min, tiny):
    """g' = g + wd p; s = alpha s + (1 - alpha) g'^2; p -= lr g' / (sqrt(s) + eps); g' enters the
    square as zero below sq_min (square_min)."""
    for i in range(p.size):
        gi = g[i] + wd * p[i]
        gs = flush_subnormal(gi, sq_min)
        si = flush_subnormal(alpha * sq[i] + one_m_alpha * gs * gs, tiny)
        sq[i] = si
        p[i] = flush_subnormal(p[i] - lr * gi / (math.sqrt(si) + eps), tiny)


def square_min(dtype: np.dtype, one_minus_decay: float) -> np.floating:
    """The smallest |g| whose (1 - decay) g^2 is a normal number of `dtype`. Flushing the output
    does not stop a subnormal *intermediate*: for float32 gradients with 4e-23 < |g| < 1e-19 the
    product g * g is subnormal and each one costs a microcode assist (issue 15: as the seed MLP
    grows confident more gradients land there, and Adam's step took 1.59x longer by epoch 8,
    the whole epoch-time growth; a 20% share of such gradients makes the update 8x slower). A
    smaller g' enters the square as zero: its term is below the smallest normal, so it changes a
    v or square_avg only where that is itself below 2^24 times it (2e-31 in float32), by at
    most that smallest normal, which sqrt(v) + eps cannot see."""
    tiny = float(smallest_normal(dtype))
    return np.dtype(dtype).type(math.sqrt(tiny / one_minus_decay)) if one_minus_decay > 0 else np.dtype(dtype).type(0)


@njit(cache=True)
def sum_squares(a):
    """sum(a^2) as float64, with four running accumulators (a serial float64 sum cannot be
    vectorised; four independent chains run four times faster)."""
    n = a.size
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    i = 0
    while i + 4 <= n:
        v0 = float(a[i])
        v1 = float(a[i + 1])
        v2 = float(a[i + 2])
        v3 = float(a[i + 3])
        a0 += v0 * v0
        a1 += v1 * v1
        a2 += v2 * v2
        a3 += v3 * v3
        i += 4
    while i < n:
        v0 = float(a[i])
        a0 += v0 * v0
        i += 1
    return (a0 + a1) + (a2 + a3)


class _Pieces:
    """The groups' (p, g, state...) elements as one range cut into near-equal parts of at least
    MIN_PART, one per thread, each part a run of (tensor, lo, hi) pieces in tensor order: the
    split of every optimizer update, on gpuml's helper threads (_update) or, for Adam with MKL,
    on numba's OpenMP threads (adam_pieces)."""

    def __init__(self, groups: list[tuple[np.ndarray, ...]]) -> None:
        sizes = [flats[0].size for flats in groups]
        cuts = part_cuts(sum(sizes), sum(sizes))
        pieces: list[tuple[int, int, int]] = []
        starts = [0]
        for k in range(len(cuts) - 1):
            start = 0
            for t, size in enumerate(sizes):
                a, b = max(cuts[k] - start, 0), min(cuts[k + 1] - start, size)
                if a < b:
                    pieces.append((t, a, b))
                start += size
            starts.append(len(pieces))
        self.groups = groups
        self.pieces = pieces
        self.tensors = tuple(tuple(flats[i] for flats in groups) for i in range(len(groups[0])))
        self.t, self.lo, self.hi = (np.array(col, np.int64) for col in zip(*pieces))
        self.starts = np.array(starts, np.int64)

    @property
    def parts(self) -> int:
        return len(self.starts) - 1


def _update(loop: Callable[..., None], pieces: _Pieces, *scalars: object) -> None:
    """loop(*flats, *scalars, tiny) over every group of flat tensors (p, g, state...), tiny being
    the flush threshold of their dtype, the parts of `pieces` on several threads at once (one
    hand-off per step, not one per tensor); each part updates its slices of the tensors in order."""
    groups = pieces.groups
    tiny = smallest_normal(groups[0][0].dtype)

    def part(k: int) -> None:
        for t, a, b in pieces.pieces[pieces.starts[k]:pieces.starts[k + 1]]:
            loop(*(f[a:b] for f in groups[t]), *scalars, tiny)

    run_calls([(part, (k,)) for k in range(pieces.parts)])


class OptimizerSteps(Checks):
    """The Backend's optimizer methods on the loops above, mixed into CpuBackend (it provides
    _on_mkl_pool)."""

    def _scaled(self, grads: list[np.ndarray], grad_scale: np.ndarray | None) -> list[np.ndarray]:
        """grads * grad_scale in scratch buffers (each product rounded once, as scale_ stores
        it), or grads themselves."""
        if grad_scale is None:
            return grads
        factor = np.asarray(grad_scale, dtype=self.dtype)
        return [np.multiply(g, factor, out=self._ws.scratch(f"scaled_grad{i}", g.shape, self.dtype))
                for i, g in enumerate(grads)]

    def _groups(self, op: str, params: list, *others: list) -> _Pieces | None:
        """The split (_Pieces) of the (p, g, state...) flat views per parameter, checked once per
        signature of the lists; None for no parameters. A step that hands in the same arrays as
        the last one (a training loop always does) gets the last step's split back: comparing 24
        ids costs 2 us, signing and viewing 24 arrays 35 us (of a 0.8 ms Adam step of the seed
        MLP). The entry keeps the arrays alive, so their ids cannot be reused while it stands."""
        arrays = (*params, *(a for lst in others for a in lst))
        cache = self.__dict__.setdefault("_group_cache", {})
        hit = cache.get(op)
        if hit is not None and len(hit[0]) == len(arrays) and all(map(operator.is_, hit[0], arrays)):
            return hit[1]
        c = self.checks(op, params, *others)
        groups = c.param_groups(params, *others)
        c.done()
        pieces = _Pieces(groups) if groups else None
        cache[op] = (arrays, pieces)
        return pieces

    def sgd_step(
        self, params: list[np.ndarray], grads: list[np.ndarray], *, lr: float, weight_decay: float = 0.0,
        grad_scale: np.ndarray | None = None,
    ) -> None:
        t = self.dtype.type
        grads = self._scaled(grads, grad_scale)
        pieces = self._groups("sgd_step", params, grads)
        if pieces:
            _update(sgd_update, pieces, t(lr), t(weight_decay))

    def momentum_step(
        self,
        params: list[np.ndarray],
        grads: list[np.ndarray],
        velocities: list[np.ndarray],
        *,
        lr: float,
        momentum: float,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        grad_scale: np.ndarray | None = None,
    ) -> None:
        t = self.dtype.type
        grads = self._scaled(grads, grad_scale)
        pieces = self._groups("momentum_step", params, grads, velocities)
        if pieces:
            _update(momentum_update, pieces, t(lr), t(momentum), t(weight_decay), bool(nesterov))

    def adam_step(
        self,
        params: list[np.ndarray],
        grads: list[np.ndarray],
        m: list[np.ndarray],
        v: list[np.ndarray],
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        step: int,
        weight_decay: float = 0.0,
        decoupled: bool = False,
        grad_scale: np.ndarray | None = None,
    ) -> None:
        if step < 1:
            raise ValueError(f"adam_step: step is 1-based, got {step}")
        t = self.dtype.type
        grads = self._scaled(grads, grad_scale)
        lr_t = t(lr / (1.0 - beta1**step))
        inv_sqrt_bc2 = t(1.0 / np.sqrt(1.0 - beta2**step))
        l2 = t(0.0 if decoupled else weight_decay)
        decay = t(1.0 - lr * weight_decay if decoupled else 1.0)
        pieces = self._groups("adam_step", params, grads, m, v)
        if not pieces:
            return
        tiny = smallest_normal(self.dtype)
        scalars = (lr_t, t(beta1), t(1.0 - beta1), t(beta2), t(1.0 - beta2), inv_sqrt_bc2, t(eps), l2, decay,
                   square_min(self.dtype, 1.0 - beta2), t(float(tiny) / abs(float(lr_t))) if lr_t != 0 else t(np.inf))
        if pieces.parts > 1 and self._on_mkl_pool():  # on MKL's spinning OpenMP threads (mkl.py)
            adam_pieces(*pieces.tensors, pieces.t, pieces.lo, pieces.hi, pieces.starts, *scalars, tiny)
        else:
            _update(adam_update, pieces, *scalars)

    def rmsprop_step(
        self,
        params: list[np.ndarray],
        grads: list[np.ndarray],
        sq: list[np.ndarray],
        *,
        lr: float,
        alpha: float,
        eps: float,
        weight_decay: float = 0.0,
        grad_scale: np.ndarray | None = None,
    ) -> None:
        t = self.dtype.type
        grads = self._scaled(grads, grad_scale)
        pieces = self._groups("rmsprop_step", params, grads, sq)
        if pieces:
            _update(rmsprop_update, pieces, t(lr), t(alpha), t(1.0 - alpha), t(eps), t(weight_decay),
                    square_min(self.dtype, 1.0 - alpha))

    def global_norm(self, arrays: list[np.ndarray]) -> np.ndarray:
        total = 0.0
        for i, a in enumerate(arrays):
            c = self.checks("global_norm", a)
            total += sum_squares(c.float_in(f"arrays[{i}]", a).reshape(-1))
            c.done()
        return np.array(np.sqrt(total), dtype=self.dtype)
