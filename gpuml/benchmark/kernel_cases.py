"""The kernel benchmark cases: for each op, ours (the gpuml backend) and its anchors, built on the
same random inputs (never zeros), plus the sweeps of sizes `gpuml bench kernels` runs. GEMM and
convolution cases are here; pooling, softmax cross-entropy and Adam in memory_cases.py.

Anchors by device: on CUDA, cuBLAS through `cupy.matmul` for GEMM, PyTorch (cuDNN for conv) for
conv, pooling, cross-entropy and Adam, and a device-to-device copy of the op's minimum bytes for
the bandwidth-bound ops. All compute in FP32, TF32 off: cuBLAS through CuPy by CUPY_TF32=0 and
the float32 compute type COMPUTE_TYPE_FP32 (kernels.import_cupy_fp32; the TF32 anchor of
precision_cases.py switches it for its own call and back), torch.matmul by import_torch's
torch.backends.cuda.matmul.allow_tf32 = False (nothing switches it on), and cuDNN by
torch.backends.cudnn.allow_tf32 = False set around every conv anchor call (torch_conv_impl). A
TF32 leak would also fail the rows' 1e-4 agreement check, narrowly for conv1's 9-term forward: TF32
operand rounding moves these products by 1.4e-4 (there, where the bias dominates) to 1e-3 of their
largest value (tests/test_bench_conv_precision.py computes it for each row's reduction length).
On CPU, NumPy where a straightforward NumPy version is natural, PyTorch CPU, and a parallel host
copy. Every case returns its implementations as `Impl`s, ours first; `result` gives the array(s)
an implementation produced, for the agreement check, which every implementation of an op has
(only copies have none).

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
CONV_OPS = ("conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight")


def conv_label(n: int, c: int, h: int, k: int, r: int, pad: int, tag: str) -> str:
    return f"{tag}: N={n} {c}->{k} {r}x{r} pad {pad} on {h}x{h}"


def conv_inputs(env: Any, n: int, c: int, h: int, k: int, r: int, pad: int) -> tuple[Any, Any, Any, Any]:
    """x (N,C,H,W), w (K,C,R,S) scaled by 0.1, bias (K,), dy (N,K,P,Q): all four for every op, so
    the three ops of a layer see the same values."""
    p = fm.conv_out(h, r, 1, pad)
    return env.rand((n, c, h, h)), env.rand((k, c, r, r)) * 0.1, env.rand((k,)), env.rand((n, k, p, p))


def ours_conv_impl(be: Any, op: str, x: Any, w: Any, b: Any, dy: Any, pad: int) -> Impl:
    """`op` (one of CONV_OPS, stride 1) through the backend's public API, into a buffer made here."""
    geo = ((1, 1), (pad, pad))
    if op == "conv2d_fwd":
        y = be.empty(dy.shape)
        return Impl(OURS, lambda: be.conv2d_fwd(x, w, b, *geo, out=y), lambda: y)
    if op == "conv2d_bwd_data":
        dx = be.empty(x.shape)
        return Impl(OURS, lambda: be.conv2d_bwd_data(dy, w, x.shape, *geo, out=dx), lambda: dx)
    dw = be.empty(w.shape)
    return Impl(OURS, lambda: be.conv2d_bwd_weight(x, dy, w.shape, *geo, out=dw), lambda: dw)


def with_cudnn_tf32(torch: Any, enabled: bool, fn: Callable[[], Any]) -> Callable[[], Any]:
    """`fn` run with torch.backends.cudnn.allow_tf32 = enabled and the previous setting restored
    after, also when `fn` raises. PyTorch reads the flag when the op is dispatched (and keys its
    cuDNN algorithm cache on it), so the switch is per call. Setting two flags costs about a
    microsecond of host time, hidden on a GPU: the timer queues the cache flush (tens of
    microseconds of GPU work) before each timed call."""

    def run() -> Any:
        flags = torch.backends.cudnn
        before = flags.allow_tf32
        flags.allow_tf32 = enabled
        try:
            return fn()
        finally:
            flags.allow_tf32 = before

    return run


def torch_conv_impl(env: Any, op: str, x: Any, w: Any, b: Any, dy: Any, pad: int, *, name: str = "torch",
                    dtype: Any = None, tf32: bool = False) -> Impl | None:
    """PyTorch's ATen op for `op` (cuDNN on a GPU), or None without torch. Inputs: ours shared
    through DLPack, or copies in `dtype` (torch.bfloat16) made here, outside the timing; outputs in
    the same dtype, allocated here (bwd_weight excepted, see the module docstring). Every call runs
    with cuDNN's TF32 switch set to `tf32`: off for the FP32 rows, explicitly rather than trusting
    the process-wide setting of import_torch, which a TF32 anchor's switch restores anyway."""
    torch = env.torch
    if torch is None:
        return None

    def tensor(a: Any) -> Any:
        t = env.as_torch(a)
        return t if dtype is None else t.to(dtype)

    tx, tw, tb, tdy = (tensor(a) for a in (x, w, b, dy))
    aten, geo = torch.ops.aten, ([1, 1], [pad, pad], [1, 1])
    held: dict[str, Any] = {}
    if op == "conv2d_bwd_weight":  # no out= overload for one gradient: it allocates dw (small)
        def call() -> None:
            held["out"] = aten.convolution_backward(tdy, tx, tw, None, *geo, False, [0, 0], 1, [False, True, False])[1]
    else:
        held["out"] = torch.empty(tuple(dy.shape if op == "conv2d_fwd" else x.shape),
                                  dtype=dtype or torch.float32, device=env.torch_device)
        if op == "conv2d_fwd":
            def call() -> None:
                aten.convolution.out(tx, tw, tb, *geo, False, [0, 0], 1, out=held["out"])
        else:  # dx is the transposed convolution of dy
            def call() -> None:
                aten.convolution.out(tdy, tw, None, *geo, True, [0, 0], 1, out=held["out"])

    def result() -> Any:
        return held["out"] if dtype is None else held["out"].float()

    return Impl(name, with_cudnn_tf32(torch, tf32, call), result, "torch")


def conv_cases(n: int, c: int, h: int, k: int, r: int, pad: int, tag: str) -> list[Case]:
    """fwd (with bias), bwd_data and bwd_weight of a stride-1 r x r convolution on h x h inputs, in
    FP32: ours next to PyTorch (cuDNN with TF32 off on a GPU) and, on a CPU, NumPy."""
    label = conv_label(n, c, h, k, r, pad, tag)
    flops = fm.conv_flops(n, c, h, h, k, r, r, 1, pad)

    def build(op: str) -> Callable[[Any], list[Impl]]:
        def impls(env: Any) -> list[Impl]:
            x, w, b, dy = conv_inputs(env, n, c, h, k, r, pad)
            out = [ours_conv_impl(env.backend, op, x, w, b, dy, pad)]
            if env.device == "cpu":
                out.append(_NUMPY_CONV[op](x, w, b, dy, pad))
            anchor = torch_conv_impl(env, op, x, w, b, dy, pad)
            return out + ([anchor] if anchor else [])

        return impls

    shape = (n, c, h, h, k, r, r, 1, pad)
    return [Case("conv2d", op, label, flops, fm.conv_bytes(op, *shape), build(op)) for op in CONV_OPS]


def _numpy_conv_fwd(x: np.ndarray, w: np.ndarray, b: np.ndarray, dy: np.ndarray, pad: int) -> Impl:
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


def _numpy_conv_bwd_data(x: np.ndarray, w: np.ndarray, b: np.ndarray, dy: np.ndarray, pad: int) -> Impl:
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


def _numpy_conv_bwd_weight(x: np.ndarray, w: np.ndarray, b: np.ndarray, dy: np.ndarray, pad: int) -> Impl:
    """dw[k, c, r, s] = sum over n, p, q of dy[n, k, p, q] * window[n, c, p, q, r, s]."""
    held: dict[str, np.ndarray] = {}
    kh, kw = w.shape[2], w.shape[3]

    def run() -> None:
        xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))) if pad else x
        win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))  # N,C,P,Q,R,S
        held["dw"] = np.tensordot(dy, win, axes=([0, 2, 3], [0, 2, 3]))  # K,C,R,S

    return Impl("numpy", run, lambda: held["dw"])


_NUMPY_CONV = {"conv2d_fwd": _numpy_conv_fwd, "conv2d_bwd_data": _numpy_conv_bwd_data,
               "conv2d_bwd_weight": _numpy_conv_bwd_weight}


# ------------------------------------------------------------------------------------- sweeps
MLP_LAYERS = [(784, 1024), (1024, 1024), (1024, 10)]
#: the seed CNN's Dense layers (64 channels x 5 x 5 after the second pool -> 64 -> 10)
CNN_DENSE_LAYERS = [(1600, 64), (64, 10)]
#: the seed CNN's convolutions and a ResNet 3x3 block layer: (N, C, H, K, R, pad, tag)
SEED_CONV_LAYERS = [(n, *layer) for n in (32, 256) for layer in
                    ((1, 28, 32, 3, 0, "seed CNN conv1"), (32, 13, 64, 3, 0, "seed CNN conv2"))]
RESNET_CONV_LAYER = (64, 64, 56, 64, 3, 1, "ResNet-like")


def full_sweep(device: str) -> list[Case]:
    from gpuml.benchmark.memory_cases import (
        LARGE_PARAM_SHAPES,
        MLP_PARAM_SHAPES,
        adam_case,
        pool_cases,
        softmax_xent_case,
    )

    # 8192^3 on a GPU only: on a few CPU cores each call takes seconds and shows what 4096^3 shows
    sizes = (256, 512, 1024, 2048, 4096, 8192) if device == "cuda" else (256, 512, 1024, 2048, 4096)
    cases = [square_gemm(s) for s in sizes]
    for batch in (32, 256, 4096):
        for fan_in, fan_out in MLP_LAYERS:
            cases += dense_gemms(batch, fan_in, fan_out)
    for batch in (32, 256):
        for fan_in, fan_out in CNN_DENSE_LAYERS:
            cases += dense_gemms(batch, fan_in, fan_out)
    for layer in (*SEED_CONV_LAYERS, RESNET_CONV_LAYER):
        cases += conv_cases(*layer)
    cases += pool_cases(256, 64, 56, 2)
    cases += [softmax_xent_case(256, 10), softmax_xent_case(8192, 10), softmax_xent_case(4096, 32000)]
    cases += [adam_case(MLP_PARAM_SHAPES, "seed MLP"), adam_case(LARGE_PARAM_SHAPES, "25M")]
    return cases + _precision_sweep(device, quick=False)


def quick_sweep(device: str) -> list[Case]:
    """One or two cases per op. On CPU the sizes are small enough for a 2-core machine to finish
    the whole sweep in a few seconds; on a GPU they are the full sizes."""
    from gpuml.benchmark.memory_cases import MLP_PARAM_SHAPES, adam_case, pool_cases, softmax_xent_case

    if device == "cpu":
        cases = [square_gemm(256), square_gemm(512), *dense_gemms(32, 784, 1024)]
        cases += conv_cases(32, 32, 13, 64, 3, 0, "seed CNN conv2")
        cases += pool_cases(32, 32, 28, 2)
        cases += [softmax_xent_case(256, 10), softmax_xent_case(1024, 1000)]
        return cases + [adam_case(MLP_PARAM_SHAPES, "seed MLP")]
    cases = [square_gemm(4096), *dense_gemms(256, 1024, 1024)]
    cases += conv_cases(*RESNET_CONV_LAYER)
    cases += pool_cases(256, 64, 56, 2)
    cases += [softmax_xent_case(8192, 10), softmax_xent_case(4096, 32000)]
    return cases + [adam_case(MLP_PARAM_SHAPES, "seed MLP")] + _precision_sweep(device, quick=True)


def _precision_sweep(device: str, quick: bool) -> list[Case]:
    """The TF32 / BF16 tensor-core rows (precision_cases.py; it imports this module)."""
    from gpuml.benchmark.precision_cases import precision_sweep

    return precision_sweep(device, quick)
