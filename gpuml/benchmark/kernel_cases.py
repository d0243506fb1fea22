"""The kernel benchmark cases: for each op, ours (the gpuml backend) and its anchors, built on the
same random inputs (never zeros), plus the sweeps of sizes `gpuml bench kernels` runs.

Anchors by device: on CUDA, cuBLAS through `cupy.matmul` (TF32 off) for GEMM, PyTorch (cuDNN, TF32
off) for conv, pooling, cross-entropy and Adam, and a device-to-device copy of the op's minimum
bytes for the bandwidth-bound ops. On CPU, NumPy where a straightforward NumPy version is natural,
PyTorch CPU, and a parallel host copy. Every case returns its implementations as `Impl`s, ours
first; `result` gives the array(s) an implementation produced, for the agreement check, which
every implementation of an op has (only copies have none).

Fair anchors: each writes into outputs allocated once, as ours writes into `out=` buffers, through
the `out=` overloads of PyTorch's ATen ops (torch.ops.aten.<op>.out / .grad_input; conv2d bwd_data
as the transposed convolution it is). The one exception: conv2d bwd_weight, whose only ATen op
(convolution_backward) has no usable out= overload for a single gradient, so that anchor allocates
its (small) dw each call. No anchor builds an autograd graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuml.benchmark import formulas as fm

OURS = "gpuml"


@dataclass
class Impl:
    name: str
    run: Callable[[], Any]
    #: the output(s) to compare with ours (called after `run`; an array or a tuple of them);
    #: None only for a copy, which is not an implementation of the op
    result: Callable[[], Any] | None = None
    #: which library's CUDA events time it on a GPU ("cupy" or "torch")
    lib: str = "cupy"


@dataclass(frozen=True)
class Case:
    family: str  # matmul, conv2d, maxpool2d, avgpool2d, softmax_xent, adam
    op: str
    shape: str
    flops: int  # 0 for bandwidth-bound ops
    bytes: int
    build: Callable[[Any], list[Impl]]  # Env -> [ours, anchors...]
    tolerance: float = 1e-4  # max |ours - anchor| / max |anchor|

    @property
    def metric(self) -> str:
        """What the rate counts: FLOPs for compute-bound families, bytes for the rest."""
        return "flops" if self.flops else "bytes"


# ------------------------------------------------------------------------------------- GEMM
def gemm_case(op: str, m: int, n: int, k: int, trans_a: bool, trans_b: bool, label: str) -> Case:
    """out(M,N) = op(a) @ op(b); a stored (K,M) when trans_a, b stored (N,K) when trans_b."""

    def build(env: Any) -> list[Impl]:
        be = env.backend
        a = env.rand((k, m) if trans_a else (m, k))
        b = env.rand((n, k) if trans_b else (k, n))
        out = be.empty((m, n))
        impls = [Impl(OURS, lambda: be.matmul(a, b, trans_a=trans_a, trans_b=trans_b, out=out),
                      lambda: out)]
        xp = env.xp
        opa, opb = (a.T if trans_a else a), (b.T if trans_b else b)
        ref = xp.empty((m, n), dtype=xp.float32)
        anchor = "cuBLAS (cupy.matmul)" if env.device == "cuda" else "numpy"
        impls.append(Impl(anchor, lambda: xp.matmul(opa, opb, out=ref), lambda: ref))
        if env.torch is not None:
            ta, tb = env.as_torch(a), env.as_torch(b)
            ta, tb = (ta.T if trans_a else ta), (tb.T if trans_b else tb)
            tout = env.torch.empty((m, n), dtype=env.torch.float32, device=env.torch_device)
            impls.append(Impl("torch", lambda: env.torch.matmul(ta, tb, out=tout), lambda: tout, "torch"))
        return impls

    return Case("matmul", op, label, fm.gemm_flops(m, n, k), fm.gemm_bytes(m, n, k), build)


def square_gemm(size: int) -> Case:
    return gemm_case("gemm_square", size, size, size, False, False, f"{size}x{size}x{size}")


def dense_gemms(batch: int, fan_in: int, fan_out: int) -> list[Case]:
    """The three products of a Dense layer x(B,in) @ W(in,out): forward, dX = dY W^T, dW = x^T dY."""
    tag = f"B={batch} {fan_in}->{fan_out}"
    return [
        gemm_case("dense_fwd", batch, fan_out, fan_in, False, False, f"{tag} (M={batch} N={fan_out} K={fan_in})"),
        gemm_case("dense_dx", batch, fan_in, fan_out, False, True, f"{tag} (M={batch} N={fan_in} K={fan_out})"),
        gemm_case("dense_dw", fan_in, fan_out, batch, True, False, f"{tag} (M={fan_in} N={fan_out} K={batch})"),
    ]


# ------------------------------------------------------------------------------------- conv2d
def conv_cases(n: int, c: int, h: int, k: int, r: int, pad: int, tag: str) -> list[Case]:
    """fwd (with bias), bwd_data and bwd_weight of a stride-1 r x r convolution on h x h inputs."""
    p = fm.conv_out(h, r, 1, pad)
    label = f"{tag}: N={n} {c}->{k} {r}x{r} pad {pad} on {h}x{h}"
    geo = ((1, 1), (pad, pad))
    flops = fm.conv_flops(n, c, h, h, k, r, r, 1, pad)

    def inputs(env: Any) -> tuple[Any, Any, Any, Any]:
        return env.rand((n, c, h, h)), env.rand((k, c, r, r)) * 0.1, env.rand((k,)), env.rand((n, k, p, p))

    def torch_bwd(env: Any, x: Any, w: Any, dy: Any, which: int) -> Callable[[], Any]:
        tx, tw, tdy = env.as_torch(x), env.as_torch(w), env.as_torch(dy)
        aten = env.torch.ops.aten
        if which == 0:  # dx is the transposed convolution of dy, written into a buffer
            tdx = env.as_torch(env.backend.empty(x.shape))
            return lambda: aten.convolution.out(tdy, tw, None, [1, 1], [pad, pad], [1, 1], True, [0, 0], 1, out=tdx)
        # dw: convolution_backward has no out= overload for one gradient; it allocates dw (small)
        return lambda: aten.convolution_backward(
            tdy, tx, tw, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [False, True, False])[1]

    def fwd(env: Any) -> list[Impl]:
        be = env.backend
        x, w, b, _ = inputs(env)
        y = be.empty((n, k, p, p))
        impls = [Impl(OURS, lambda: be.conv2d_fwd(x, w, b, *geo, out=y), lambda: y)]
        if env.device == "cpu":
            impls.append(_numpy_conv_fwd(x, w, b, pad))
        if env.torch is not None:
            tx, tw, tb = env.as_torch(x), env.as_torch(w), env.as_torch(b)
            ty = env.as_torch(be.empty((n, k, p, p)))
            conv = env.torch.ops.aten.convolution.out
            impls.append(Impl("torch", lambda: conv(tx, tw, tb, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, out=ty),
                              lambda: ty, "torch"))
        return impls

    def bwd_data(env: Any) -> list[Impl]:
        be = env.backend
        x, w, _, dy = inputs(env)
        dx = be.empty(x.shape)
        impls = [Impl(OURS, lambda: be.conv2d_bwd_data(dy, w, x.shape, *geo, out=dx), lambda: dx)]
        if env.device == "cpu":
            impls.append(_numpy_conv_bwd_data(dy, w, pad))
        return impls + _torch_impl(env, torch_bwd, x, w, dy, 0)

    def bwd_weight(env: Any) -> list[Impl]:
        be = env.backend
        x, w, _, dy = inputs(env)
        dw = be.empty(w.shape)
        impls = [Impl(OURS, lambda: be.conv2d_bwd_weight(x, dy, w.shape, *geo, out=dw), lambda: dw)]
        if env.device == "cpu":
            impls.append(_numpy_conv_bwd_weight(x, dy, w.shape, pad))
        return impls + _torch_impl(env, torch_bwd, x, w, dy, 1)

    shape = (n, c, h, h, k, r, r, 1, pad)
    return [
        Case("conv2d", "conv2d_fwd", label, flops, fm.conv_bytes("conv2d_fwd", *shape), fwd),
        Case("conv2d", "conv2d_bwd_data", label, flops, fm.conv_bytes("conv2d_bwd_data", *shape), bwd_data),
        Case("conv2d", "conv2d_bwd_weight", label, flops, fm.conv_bytes("conv2d_bwd_weight", *shape), bwd_weight),
    ]


def _torch_impl(env: Any, make: Callable[..., Callable[[], Any]], *args: Any) -> list[Impl]:
    if env.torch is None:
        return []
    held: dict[str, Any] = {}
    fn = make(env, *args)

    def run() -> None:
        held["out"] = fn()

    return [Impl("torch", run, lambda: held["out"], "torch")]


def _numpy_conv_fwd(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> Impl:
    """Straightforward NumPy: a sliding-window view contracted with tensordot (im2col + BLAS)."""
    held: dict[str, np.ndarray] = {}
    kh, kw = w.shape[2], w.shape[3]

    def run() -> None:
        xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
        win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))  # N,C,P,Q,R,S
        y = np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3]))  # N,P,Q,K
        y += b
        held["y"] = np.ascontiguousarray(y.transpose(0, 3, 1, 2))

    return Impl("numpy", run, lambda: held["y"])


def _numpy_conv_bwd_data(dy: np.ndarray, w: np.ndarray, pad: int) -> Impl:
    """Stride 1: dx is dy, padded by R-1-pad, correlated with the flipped kernel (C and K swapped)."""
    held: dict[str, np.ndarray] = {}
    kh, kw = w.shape[2], w.shape[3]
    flipped = np.ascontiguousarray(w[:, :, ::-1, ::-1])

    def run() -> None:
        ph, pw = kh - 1 - pad, kw - 1 - pad
        dyp = np.pad(dy, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        win = np.lib.stride_tricks.sliding_window_view(dyp, (kh, kw), axis=(2, 3))  # N,K,H,W,R,S
        dx = np.tensordot(win, flipped, axes=([1, 4, 5], [0, 2, 3]))  # N,H,W,C
        held["dx"] = np.ascontiguousarray(dx.transpose(0, 3, 1, 2))

    return Impl("numpy", run, lambda: held["dx"])


def _numpy_conv_bwd_weight(x: np.ndarray, dy: np.ndarray, w_shape: tuple[int, ...], pad: int) -> Impl:
    """dw[k, c, r, s] = sum over n, p, q of dy[n, k, p, q] * window[n, c, p, q, r, s]."""
    held: dict[str, np.ndarray] = {}
    kh, kw = w_shape[2], w_shape[3]

    def run() -> None:
        xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
        win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))  # N,C,P,Q,R,S
        held["dw"] = np.tensordot(dy, win, axes=([0, 2, 3], [0, 2, 3]))  # K,C,R,S

    return Impl("numpy", run, lambda: held["dw"])


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


# ------------------------------------------------------------------------------------- sweeps
MLP_LAYERS = [(784, 1024), (1024, 1024), (1024, 10)]


def full_sweep(device: str) -> list[Case]:
    # 8192^3 on a GPU only: on a few CPU cores each call takes seconds and shows what 4096^3 shows
    sizes = (256, 512, 1024, 2048, 4096, 8192) if device == "cuda" else (256, 512, 1024, 2048, 4096)
    cases = [square_gemm(s) for s in sizes]
    for batch in (32, 256, 4096):
        for fan_in, fan_out in MLP_LAYERS:
            cases += dense_gemms(batch, fan_in, fan_out)
    cases += conv_cases(256, 1, 28, 32, 3, 0, "seed CNN conv1")
    cases += conv_cases(256, 32, 13, 64, 3, 0, "seed CNN conv2")
    cases += conv_cases(64, 64, 56, 64, 3, 1, "ResNet-like")
    cases += pool_cases(256, 64, 56, 2)
    cases += [softmax_xent_case(256, 10), softmax_xent_case(8192, 10), softmax_xent_case(4096, 32000)]
    cases += [adam_case(MLP_PARAM_SHAPES, "seed MLP"), adam_case(LARGE_PARAM_SHAPES, "25M")]
    return cases + _precision_sweep(device, quick=False)


def quick_sweep(device: str) -> list[Case]:
    """One or two cases per op. On CPU the sizes are small enough for a 2-core machine to finish
    the whole sweep in a few seconds; on a GPU they are the full sizes."""
    if device == "cpu":
        cases = [square_gemm(256), square_gemm(512), *dense_gemms(32, 784, 1024)]
        cases += conv_cases(32, 32, 13, 64, 3, 0, "seed CNN conv2")
        cases += pool_cases(32, 32, 28, 2)
        cases += [softmax_xent_case(256, 10), softmax_xent_case(1024, 1000)]
        return cases + [adam_case(MLP_PARAM_SHAPES, "seed MLP")]
    cases = [square_gemm(4096), *dense_gemms(256, 1024, 1024)]
    cases += conv_cases(64, 64, 56, 64, 3, 1, "ResNet-like")
    cases += pool_cases(256, 64, 56, 2)
    cases += [softmax_xent_case(8192, 10), softmax_xent_case(4096, 32000)]
    return cases + [adam_case(MLP_PARAM_SHAPES, "seed MLP")] + _precision_sweep(device, quick=True)


def _precision_sweep(device: str, quick: bool) -> list[Case]:
    """The TF32 / BF16 tensor-core rows (precision_cases.py; it imports this module)."""
    from gpuml.benchmark.precision_cases import precision_sweep

    return precision_sweep(device, quick)
