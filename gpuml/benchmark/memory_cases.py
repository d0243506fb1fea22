"""The bandwidth-bound kernel benchmark cases: pooling, softmax cross-entropy and Adam, each with
ours first, then NumPy (on CPU) and PyTorch anchors writing into buffers allocated once, then a
copy of the same minimum bytes. The GEMM and convolution cases, the sweeps and the conventions
(Impl, Case, fair anchors, checks) are in kernel_cases.py, which imports this module lazily."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gpuml.benchmark import formulas as fm
from gpuml.benchmark.kernel_cases import OURS, Case, Impl


# ------------------------------------------------------------------------------------- pooling
def pool_cases(n: int, c: int, h: int, size: int) -> list[Case]:
    p = fm.conv_out(h, size, size, 0)
    label = f"{n}x{c}x{h}x{h} {size}x{size}"
    geo = ((size, size), (size, size), (0, 0))
    tgeo = ([size, size], [size, size], [0, 0])

    def maxpool(env: Any, backward: bool) -> list[Impl]:
        be = env.backend
        x, dy = env.rand((n, c, h, h)), env.rand((n, c, p, p))
        y, am, dx = be.empty((n, c, p, p)), be.empty((n, c, p, p), dtype=np.int32), be.empty(x.shape)
        be.maxpool2d_fwd(x, *geo, out=y, argmax=am)
        if backward:
            impls = [Impl(OURS, lambda: be.maxpool2d_bwd(dy, am, x.shape, *geo, out=dx), lambda: dx)]
        else:
            impls = [Impl(OURS, lambda: be.maxpool2d_fwd(x, *geo, out=y, argmax=am), lambda: y)]
        if env.torch is not None:
            torch = env.torch
            aten, tx, tdy = torch.ops.aten, env.as_torch(x), env.as_torch(dy)
            ty, tdx = env.as_torch(be.empty(y.shape)), env.as_torch(be.empty(x.shape))
            idx = torch.empty(y.shape, dtype=torch.int64)  # PyTorch's indices are int64
            aten.max_pool2d_with_indices.out(tx, *tgeo, [1, 1], False, out=ty, indices=idx)
            if backward:
                impls.append(Impl("torch", lambda: aten.max_pool2d_with_indices_backward.grad_input(
                    tdy, tx, *tgeo, [1, 1], False, idx, grad_input=tdx), lambda: tdx, "torch"))
            else:
                impls.append(Impl("torch", lambda: aten.max_pool2d_with_indices.out(
                    tx, *tgeo, [1, 1], False, out=ty, indices=idx), lambda: ty, "torch"))
        return impls

    def avgpool(env: Any, backward: bool) -> list[Impl]:
        be = env.backend
        x, dy = env.rand((n, c, h, h)), env.rand((n, c, p, p))
        y, dx = be.empty((n, c, p, p)), be.empty(x.shape)
        if backward:
            impls = [Impl(OURS, lambda: be.avgpool2d_bwd(dy, x.shape, *geo, out=dx), lambda: dx)]
            if env.device == "cpu" and h % size == 0:  # dy / size^2 broadcast over each window
                ref6 = np.empty(x.shape, dtype=np.float32).reshape(n, c, p, size, p, size)
                impls.append(Impl("numpy", lambda: np.multiply(dy[:, :, :, None, :, None], 1.0 / (size * size),
                                                               out=ref6), lambda: ref6.reshape(x.shape)))
        else:
            impls = [Impl(OURS, lambda: be.avgpool2d_fwd(x, *geo, out=y), lambda: y)]
            if env.device == "cpu" and h % size == 0:
                ref = np.empty((n, c, p, p), dtype=np.float32)
                impls.append(Impl("numpy", lambda: np.mean(
                    x.reshape(n, c, p, size, p, size), axis=(3, 5), out=ref), lambda: ref))
        if env.torch is not None:
            aten, tx, tdy = env.torch.ops.aten, env.as_torch(x), env.as_torch(dy)
            ty, tdx = env.as_torch(be.empty(y.shape)), env.as_torch(be.empty(x.shape))
            if backward:
                impls.append(Impl("torch", lambda: aten.avg_pool2d_backward.grad_input(
                    tdy, tx, *tgeo, False, True, None, grad_input=tdx), lambda: tdx, "torch"))
            else:
                impls.append(Impl("torch", lambda: aten.avg_pool2d.out(tx, *tgeo, False, True, None, out=ty),
                                  lambda: ty, "torch"))
        return impls

    def case(family: str, bwd: bool, fn: Callable[[Any, bool], list[Impl]]) -> Case:
        op = f"{family}_{'bwd' if bwd else 'fwd'}"
        nbytes = fm.pool_bytes(op, n, c, h, h, size, size)
        return Case(family, op, label, 0, nbytes, lambda env: fn(env, bwd) + [env.copy_impl(nbytes)], 1e-6)

    return [case("maxpool2d", False, maxpool), case("maxpool2d", True, maxpool),
            case("avgpool2d", False, avgpool), case("avgpool2d", True, avgpool)]


# ------------------------------------------------------------------------------------- losses
def softmax_xent_case(batch: int, classes: int) -> Case:
    nbytes = fm.softmax_xent_bytes(batch, classes)

    def build(env: Any) -> list[Impl]:
        be = env.backend
        logits = env.rand((batch, classes)) * 3
        labels = be.asarray(env.rng.integers(0, classes, batch).astype(np.int32), dtype=np.int32)
        loss, dlogits = be.empty(()), be.empty((batch, classes))
        impls = [Impl(OURS, lambda: be.softmax_xent(logits, labels, loss=loss, dlogits=dlogits),
                      lambda: (loss, dlogits))]
        if env.device == "cpu":
            impls.append(_numpy_xent(logits, labels))
        if env.torch is not None:
            impls.append(_torch_xent(env, logits, labels))
        return impls + [env.copy_impl(nbytes)]

    return Case("softmax_xent", "softmax_xent", f"{batch}x{classes}", 0, nbytes, build, 1e-5)


def _numpy_xent(logits: np.ndarray, labels: np.ndarray) -> Impl:
    batch = logits.shape[0]
    rows = np.arange(batch)
    d = np.empty_like(logits)
    loss = np.empty((), np.float64)

    def run() -> None:
        m = logits.max(axis=1, keepdims=True)
        np.subtract(logits, m, out=d)
        np.exp(d, out=d)
        s = d.sum(axis=1, keepdims=True)
        loss[()] = np.mean(np.log(s[:, 0]) + m[:, 0] - logits[rows, labels])
        np.divide(d, s, out=d)
        d[rows, labels] -= 1
        np.multiply(d, 1.0 / batch, out=d)

    return Impl("numpy", run, lambda: (loss, d))


def _torch_xent(env: Any, logits: Any, labels: Any) -> Impl:
    """PyTorch's loss and gradient without autograd: log_softmax into a buffer, the mean NLL, and
    dlogits = (exp(log_softmax) - onehot) / B in place, as a hand-written backward would."""
    torch = env.torch
    aten = torch.ops.aten
    tl, ty = env.as_torch(logits), env.as_torch(labels).long()
    batch = tl.shape[0]
    rows = torch.arange(batch)
    d = env.as_torch(env.backend.empty(tuple(tl.shape)))
    loss, total_weight = torch.empty(()), torch.empty(())

    def run() -> None:
        with torch.no_grad():
            aten._log_softmax.out(tl, 1, False, out=d)
            aten.nll_loss_forward.output(d, ty, None, 1, -100, output=loss, total_weight=total_weight)
            torch.exp(d, out=d)
            d[rows, ty] -= 1
            d.mul_(1.0 / batch)

    return Impl("torch", run, lambda: (loss, d), "torch")


# ------------------------------------------------------------------------------------- Adam
#: the seed MLP's parameters (784-1024-1024-10: 1,863,690) and a 25M-parameter list of tensors
MLP_PARAM_SHAPES = [(784, 1024), (1024,), (1024, 1024), (1024,), (1024, 10), (10,)]
LARGE_PARAM_SHAPES = [(1024, 1024)] * 24


def adam_case(shapes: list[tuple[int, ...]], label: str) -> Case:
    count = fm.num_elements(shapes)
    nbytes = fm.adam_bytes(count)
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}

    def build(env: Any) -> list[Impl]:
        # Every implementation starts from the same p, m, v at step 10 (its own copies) and is
        # checked on its first update, p - p0 (the run's first call; later calls go on updating).
        be = env.backend
        p0 = [env.rand(s) for s in shapes]
        g = [env.rand(s) for s in shapes]
        m0 = [env.rand(s) * 0.1 for s in shapes]
        v0 = [be.asarray(np.abs(env.rng.standard_normal(s, dtype=np.float32)) * 0.01) for s in shapes]
        host_p0 = [env.to_host(a) for a in p0]

        def update(params: list[Any]) -> Callable[[], Any]:
            return lambda: tuple(env.to_host(a) - b for a, b in zip(params, host_p0))

        p, m, v = ([a.copy() for a in arrays] for arrays in (p0, m0, v0))
        impls = [Impl(OURS, lambda: be.adam_step(p, g, m, v, step=ADAM_STEP, **hyper), update(p))]
        if env.device == "cpu":
            pn = [a.copy() for a in p0]
            impls.append(_numpy_adam(pn, g, [a.copy() for a in m0], [a.copy() for a in v0], **hyper))
            impls[-1].result = update(pn)
        if env.torch is not None:
            torch = env.torch
            params = [torch.nn.Parameter(env.as_torch(a).clone()) for a in p0]
            opt = torch.optim.Adam(params, lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]),
                                   eps=hyper["eps"], fused=True)
            for tp, a, ma, va in zip(params, g, m0, v0):
                tp.grad = env.as_torch(a)
                opt.state[tp] = {"step": torch.tensor(float(ADAM_STEP - 1), device=tp.device),
                                 "exp_avg": env.as_torch(ma).clone(), "exp_avg_sq": env.as_torch(va).clone()}
            impls.append(Impl("torch (fused Adam)", opt.step, update([tp.detach() for tp in params]), "torch"))
        return impls + [env.copy_impl(nbytes)]

    # tolerance: the update is about lr; float32 rounding of p (|p| ~ 4) is ~1e-4 of it
    return Case("adam", "adam_step", f"{label}: {count / 1e6:.2f}M params in {len(shapes)} tensors",
                0, nbytes, build, 2e-3)


#: the step count the Adam cases run at (bias corrections 1 - beta^10), the same on every side
ADAM_STEP = 10


def _numpy_adam(p: list[np.ndarray], g: list[np.ndarray], m: list[np.ndarray], v: list[np.ndarray],
                lr: float, beta1: float, beta2: float, eps: float) -> Impl:
    step = ADAM_STEP
    c1, c2 = 1 - beta1**step, 1 - beta2**step

    def run() -> None:
        for pi, gi, mi, vi in zip(p, g, m, v):
            mi *= beta1
            mi += (1 - beta1) * gi
            vi *= beta2
            vi += (1 - beta2) * gi * gi
            pi -= (lr / c1) * mi / (np.sqrt(vi / c2) + eps)

    return Impl("numpy", run)
