"""The CUDA backend: CuPy arrays and gpuml's own kernels (kernels/*.cu), float32 only.

Every op: check shapes, dtypes and contiguity (ShapeError naming the op and the shapes) ->
output buffer (the caller's `out=`, or a fresh one) -> launch on the current CuPy stream.
Inside ops there is no host synchronisation, no cuBLAS and no CuPy elementwise kernel, and once
a shape has been seen nothing is allocated when `out=` is given (launch plans and scratch
buffers are cached per shape), so a training step can be captured and replayed as a CUDA graph.
Convolution and pooling come from `ConvPoolOps` (conv.py), the optimizer updates and
global_norm from `MultiTensorOps` (optim.py), launch plans from launch.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gpuml.backend.base import Array, Backend, check_activation, dropout_scale, fail
from gpuml.backend.cuda import launch as plan
from gpuml.backend.cuda.augment import AugmentOps
from gpuml.backend.cuda.common import DevicePlumbing, aligned16
from gpuml.backend.cuda.conv import ConvPoolOps
from gpuml.backend.cuda.kernels import arch_from_compute_capability
from gpuml.backend.cuda.optim import MultiTensorOps
from gpuml.errors import DeviceError

BLOCK = (plan.THREADS, 1, 1)
_LABEL_KINDS = {np.dtype(np.uint8): 0, np.dtype(np.int32): 1, np.dtype(np.int64): 2}
_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


class CudaBackend(AugmentOps, MultiTensorOps, ConvPoolOps, DevicePlumbing, Backend):
    name = "cuda"

    def __init__(self, dtype: str | np.dtype = "float32") -> None:
        super().__init__(dtype)
        if self.dtype != np.float32:
            raise DeviceError(
                f"the CUDA backend computes in float32 only, got dtype {self.dtype}; "
                "use device 'cpu' for float64 checks"
            )
        try:
            import cupy
        except Exception as exc:  # ImportError or a broken CUDA install
            raise DeviceError(f"the CUDA backend needs CuPy ({type(exc).__name__}: {exc})") from None
        self.xp = cupy
        self._device_id = cupy.cuda.Device().id
        self._gemm_plans: dict[tuple, plan.GemmPlan] = {}

    # ------------------------------------------------------------------ plumbing
    def describe(self) -> str:
        cupy = self.xp
        props = cupy.cuda.runtime.getDeviceProperties(self._device_id)
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        arch = arch_from_compute_capability(cupy.cuda.Device(self._device_id).compute_capability)
        return (
            f"cuda:{self._device_id} ({gpu}, compute capability {arch}, "
            f"{props['multiProcessorCount']} SMs, CuPy {cupy.__version__}, float32)"
        )

    def set_precision(self, precision: str) -> None:
        """tf32 and bf16 run on tensor cores through mma.sync, which needs sm_80 or newer: an older
        GPU is a DeviceError naming it and its compute capability, never a silent FP32 run."""
        if precision in plan.TENSOR_CORE_PRECISIONS:
            cupy = self.xp
            cc = str(cupy.cuda.Device(self._device_id).compute_capability)
            if int(cc) < 80:
                props = cupy.cuda.runtime.getDeviceProperties(self._device_id)
                gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
                raise DeviceError(
                    f"precision: {precision} needs tensor cores of compute capability 8.0 or newer (sm_80); "
                    f"cuda:{self._device_id} is {gpu}, compute capability {cc[:-1]}.{cc[-1]}")
        super().set_precision(precision)

    # ------------------------------------------------------------------ arrays and transfer
    def asarray(self, x: Any, dtype: Any = None) -> Array:
        """A fresh C-contiguous device copy (floats become float32 unless dtype says)."""
        if not isinstance(x, self.xp.ndarray):
            x = np.asarray(x)
        if dtype is None:
            dtype = self.dtype if x.dtype.kind == "f" else x.dtype
        return self.xp.array(x, dtype=dtype, order="C", copy=True)

    def to_numpy(self, x: Array) -> np.ndarray:
        # The run's work may be queued on a non-blocking stream (graph.py), which the legacy
        # stream asnumpy copies on does not wait for.
        self.synchronize()
        return self.xp.asnumpy(x)

    def synchronize(self) -> None:
        self.xp.cuda.get_current_stream().synchronize()

    def upload_(self, dst: Array, host: np.ndarray) -> Array:
        dst = self._dev_in("upload_", "dst", dst, dtype=dst.dtype)
        host = np.ascontiguousarray(host, dtype=dst.dtype)
        if host.shape != dst.shape:
            fail("upload_", f"host {host.shape} does not fit dst {dst.shape}")
        self.synchronize()  # the buffer may still be read by queued work
        dst.set(host)
        return dst

    # ------------------------------------------------------------------ per-step counters
    def advance_(self, counters: Array, increments: Array) -> Array:
        op = "advance_"
        counters = self._dev_in(op, "counters", counters, ndim=1, dtype=np.int64)
        increments = self._dev_in(op, "increments", increments, shape=counters.shape, dtype=np.int64)
        if counters.size:
            self._launch("elementwise", "counters_advance", (1, 1, 1), (1, 1, 1),
                         (counters, increments, np.int32(counters.size)))
        return counters

    def step_runner(self, mode: str, warn: Any = None) -> Any:
        from gpuml.backend.cuda.graph import GraphRunner

        return GraphRunner(self, mode, warn)

    def _offset_args(self, op: str, name: str, offset: int, counter: Array | None,
                     span: int) -> tuple[np.uint64, Array]:
        """(host part, device counter) of an offset or start: the kernel adds counter[0] (one
        int64, read on the device) to the scalar; without a counter it reads a zero."""
        if not 0 <= offset < 2**64 - span:
            raise ValueError(f"{op}: {name} must be in [0, 2**64 - {span}), got {offset}")
        if counter is not None:
            counter = self._dev_in(op, f"{name}_counter", counter, dtype=np.int64)
            if counter.size != 1:
                fail(op, f"{name}_counter must hold one int64, got shape {counter.shape}")
            return np.uint64(offset), counter
        zero = self.__dict__.get("_zero_counter")
        if zero is None:
            zero = self._zero_counter = self.xp.zeros(1, dtype=np.int64)
        return np.uint64(offset), zero

    # ------------------------------------------------------------------ dense algebra
    def matmul(
        self,
        a: Array,
        b: Array,
        *,
        trans_a: bool = False,
        trans_b: bool = False,
        bias: Array | None = None,
        activation: str | None = None,
        accumulate: bool = False,
        relu_mask: Array | None = None,
        col_sums: Array | None = None,
        out: Array | None = None,
    ) -> Array:
        op = "matmul"
        a = self._dev_in(op, "a", a, ndim=2)
        b = self._dev_in(op, "b", b, ndim=2)
        M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
        Kb, N = (b.shape[1], b.shape[0]) if trans_b else b.shape
        if K != Kb:
            na, nb = "a.T" if trans_a else "a", "b.T" if trans_b else "b"
            fail(op, f"{na} {(M, K)} and {nb} {(Kb, N)} do not fit ({K} != {Kb})")
        if activation not in (None, "relu"):
            raise ValueError(f"{op}: fused activation must be None or 'relu', got {activation!r}")
        if bias is not None:
            bias = self._dev_in(op, "bias", bias, shape=(N,))
        if accumulate and (out is None or bias is not None or activation is not None):
            raise ValueError("matmul: accumulate=True needs out= and allows no bias or activation")
        if relu_mask is not None:
            relu_mask = self._dev_in(op, "relu_mask", relu_mask, shape=(M, N))
        if col_sums is not None:
            col_sums = self._dev_out(op, "col_sums", col_sums, (N,), a=a, b=b, bias=bias, relu_mask=relu_mask)
        out = self._dev_out(op, "out", out, (M, N))
        self._no_alias(op, "out", out, a=a, b=b, bias=bias, relu_mask=relu_mask, col_sums=col_sums)
        if N == 0:
            return out
        if M == 0 and col_sums is None:
            return out
        flags = (
            (plan.EPILOGUE_BIAS if bias is not None else 0)
            | (plan.EPILOGUE_RELU if activation == "relu" else 0)
            | (plan.EPILOGUE_ACCUMULATE if accumulate else 0)
            | (plan.EPILOGUE_RELU_MASK if relu_mask is not None else 0)
            | (plan.EPILOGUE_COL_SUMS if col_sums is not None else 0)
        )
        key = (M, N, K, bool(trans_a), bool(trans_b), self.precision)
        gp = self._gemm_plans.get(key)
        if gp is None:  # any M, including 0 (only the column sums: block row 0 writes them)
            gp = self._gemm_plans[key] = plan.gemm_plan(M, N, K, trans_a, trans_b, self.precision)
        # Pointers the flags say are never read are passed as `out` (a valid device pointer).
        epilogue = (out if bias is None else bias, out if relu_mask is None else relu_mask,
                    out if col_sums is None else col_sums)
        if gp.splits > 1:  # one launch: the last block of each tile adds the K slices (gemm_core.cuh)
            work = self._scratch("gemm_splitk", gp.workspace_elems + gp.splits * N)
            tickets = self._tickets(gp.tiles)
        else:
            work, tickets = out, self._tickets(1)
        family = "gemm" if self.precision == "fp32" else f"gemm_tc_{self.precision}"
        self._launch(
            family, gp.kernel, gp.grid, gp.block,
            (a, b, out, *epilogue, work, tickets, np.int32(M), np.int32(N), np.int32(K),
             np.int32(gp.k_per_split), np.int32(flags)),
        )  # fmt: skip
        return out

    def bias_grad(self, dy: Array, out: Array | None = None) -> Array:
        op = "bias_grad"
        dy = self._dev_in(op, "dy", dy)
        if dy.ndim < 2:
            fail(op, f"dy {dy.shape} needs a batch axis and a channel axis")
        N, C = dy.shape[0], dy.shape[1]
        HW = int(np.prod(dy.shape[2:], dtype=np.int64))
        if max(N, C, HW, N * C) > plan.INT32_MAX:
            fail(op, f"dy {dy.shape} is past the kernels' 32-bit indexing")
        out = self._dev_out(op, "out", out, (C,))
        self._no_alias(op, "out", out, dy=dy)
        if C == 0:
            return out
        if dy.ndim == 2:
            self._launch("elementwise", "bias_grad_nc", plan.bias_grad_nc_grid(C), (32, 8, 1),
                         (dy, out, np.int32(N), np.int32(C)))
        else:
            self._launch("elementwise", "bias_grad_nchw", (C, 1, 1), BLOCK,
                         (dy, out, np.int32(N), np.int32(C), np.int32(HW)))
        return out

    # ------------------------------------------------------------------ losses
    def softmax_xent(
        self,
        logits: Array,
        labels: Array,
        *,
        label_smoothing: float = 0.0,
        loss: Array | None = None,
        dlogits: Array | None = None,
        accumulate: Array | None = None,
    ) -> tuple[Array, Array]:
        """As Backend.softmax_xent, in one launch (argmax, mean and accumulation included);
        labels are not range-checked on the host (that would sync): a label outside [0, K)
        makes the loss NaN."""
        op = "softmax_xent"
        logits = self._dev_in(op, "logits", logits, ndim=2)
        B, K = logits.shape
        labels = self._dev_in(op, "labels", labels, shape=(B,), dtype=np.int32)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"{op}: label_smoothing must be in [0, 1), got {label_smoothing}")
        loss = self._dev_out(op, "loss", loss, ())
        dlogits = self._dev_out(op, "dlogits", dlogits, (B, K))
        self._out_may_alias(op, "dlogits", dlogits, "logits", logits)
        self._no_alias(op, "loss", loss, logits=logits, dlogits=dlogits)
        if accumulate is not None:
            accumulate = self._dev_in(op, "accumulate", accumulate, shape=(2,))
            self._no_alias(op, "accumulate", accumulate, logits=logits, dlogits=dlogits, loss=loss)
        xp_plan = plan.softmax_xent_plan(B, K, aligned16(logits, dlogits))
        row_loss = self._scratch("xent_row_loss", B)
        row_correct = self._scratch("xent_row_correct", B, np.int32)
        args = (logits, labels, dlogits, row_loss, row_correct, loss,
                loss if accumulate is None else accumulate, self._tickets(1), np.int32(B), np.int32(K),
                np.float32(label_smoothing), np.float32(1.0 / B), np.int32(accumulate is not None))
        if xp_plan.kernel == "softmax_xent_fwd_bwd_block":
            args = (*args, np.int32(xp_plan.vec4))
        self._launch("softmax_xent", xp_plan.kernel, xp_plan.grid, BLOCK, args)
        return loss, dlogits

    def mse(
        self, pred: Array, target: Array, *, loss: Array | None = None, dpred: Array | None = None
    ) -> tuple[Array, Array]:
        op = "mse"
        pred = self._dev_in(op, "pred", pred)
        target = self._dev_in(op, "target", target, shape=pred.shape)
        if pred.size == 0:
            fail(op, f"pred {pred.shape} is empty")
        loss = self._dev_out(op, "loss", loss, ())
        dpred = self._dev_out(op, "dpred", dpred, pred.shape)
        self._out_may_alias(op, "dpred", dpred, "pred", pred)
        self._no_alias(op, "dpred", dpred, target=target)
        grid = plan.partials_grid(pred.size)
        partials = self._scratch("mse_partials", grid[0], np.float64)
        self._launch("elementwise", "mse_partial", grid, BLOCK,
                     (pred, target, dpred, np.int64(pred.size), np.float32(2.0 / pred.size), partials))
        self._launch("elementwise", "sum_partials_final", (1, 1, 1), BLOCK,
                     (partials, np.int32(grid[0]), loss, np.float64(1.0 / pred.size), np.int32(0)))
        return loss, dpred

    def one_hot(self, labels: Array, num_classes: int, *, out: Array | None = None) -> Array:
        """As Backend.one_hot, in one launch that writes every element of `out` (no fill, no
        index arrays: nothing is allocated when out= is given). Labels are int32 and not
        range-checked on the host (a sync): a label outside [0, num_classes) gives a NaN row."""
        op = "one_hot"
        labels = self._dev_in(op, "labels", labels, ndim=1, dtype=np.int32)
        B = labels.shape[0]
        if not 1 <= num_classes <= plan.INT32_MAX or B > plan.INT32_MAX:
            fail(op, f"labels {labels.shape} with {num_classes} classes: both must be 1 to 2^31 - 1")
        out = self._dev_out(op, "out", out, (B, num_classes), labels=labels)
        if B:
            self._launch("elementwise", "one_hot", plan.grid_1d(B * num_classes), BLOCK,
                         (labels, out, np.int32(B), np.int32(num_classes)))
        return out

    def count_correct(self, logits: Array, labels: Array, *, out: Array | None = None) -> Array:
        op = "count_correct"
        logits = self._dev_in(op, "logits", logits, ndim=2)
        B, K = logits.shape
        labels = self._dev_in(op, "labels", labels, shape=(B,), dtype=np.int32)
        out = self._dev_out(op, "out", out, ())
        if K == 0 or B > plan.INT32_MAX or K > plan.INT32_MAX:
            fail(op, f"logits {logits.shape} need 1 to 2^31 - 1 classes and rows")
        grid = plan.count_correct_grid(B)
        counts = self._scratch("correct_counts", grid[0], np.int32)
        self._launch("softmax_xent", "count_correct", grid, BLOCK,
                     (logits, labels, np.int32(B), np.int32(K), counts, self._tickets(1), out))
        return out

    # ------------------------------------------------------------------ elementwise
    def activation_fwd(self, kind: str, x: Array, *, out: Array | None = None) -> Array:
        op = "activation_fwd"
        check_activation(op, kind)
        x = self._dev_in(op, "x", x)
        out = self._dev_out(op, "out", out, x.shape)
        self._out_may_alias(op, "out", out, "x", x)
        if x.size:
            self._launch("elementwise", f"{kind}_fwd", plan.grid_1d(x.size), BLOCK, (x, out, np.int64(x.size)))
        return out

    def activation_bwd(self, kind: str, y: Array, dy: Array, *, out: Array | None = None) -> Array:
        op = "activation_bwd"
        check_activation(op, kind)
        y = self._dev_in(op, "y", y)
        dy = self._dev_in(op, "dy", dy, shape=y.shape)
        out = self._dev_out(op, "out", out, y.shape)
        self._out_may_alias(op, "out", out, "dy", dy)
        self._no_alias(op, "out", out, y=y)
        if y.size:
            self._launch("elementwise", f"{kind}_bwd", plan.grid_1d(y.size), BLOCK, (y, dy, out, np.int64(y.size)))
        return out

    def dropout_fwd(
        self, x: Array, p: float, seed: int, offset: int, *, offset_counter: Array | None = None,
        out: Array | None = None, mask: Array | None = None,
    ) -> tuple[Array, Array]:
        op = "dropout_fwd"
        x = self._dev_in(op, "x", x)
        scale = dropout_scale(op, p)
        host_offset, offset_at = self._offset_args(op, "offset", offset, offset_counter, x.size)
        out = self._dev_out(op, "out", out, x.shape)
        mask = self._dev_out(op, "mask", mask, x.shape, np.uint8)
        self._out_may_alias(op, "out", out, "x", x)
        self._no_alias(op, "mask", mask, x=x, out=out)
        # keep iff uniform >= p  <=>  k / 2^24 >= p  <=>  k >= ceil(p * 2^24) (k an integer; the
        # product is exact in float64), so the mask equals rng.keep_mask bit for bit.
        threshold = np.uint32(math.ceil(p * (1 << 24)))
        if x.size:
            self._launch("elementwise", "dropout_fwd", plan.grid_1d(x.size), BLOCK, (
                x, out, mask, np.int64(x.size), np.uint64(seed & 0xFFFFFFFFFFFFFFFF), host_offset, offset_at,
                threshold, np.float32(scale)))  # fmt: skip
        return out, mask

    def dropout_bwd(self, dy: Array, mask: Array, p: float, *, out: Array | None = None) -> Array:
        op = "dropout_bwd"
        dy = self._dev_in(op, "dy", dy)
        mask = self._dev_in(op, "mask", mask, shape=dy.shape, dtype=np.uint8)
        scale = dropout_scale(op, p)
        out = self._dev_out(op, "out", out, dy.shape)
        self._out_may_alias(op, "out", out, "dy", dy)
        self._no_alias(op, "out", out, mask=mask)
        if dy.size:
            self._launch("elementwise", "dropout_bwd", plan.grid_1d(dy.size), BLOCK,
                         (dy, mask, out, np.int64(dy.size), np.float32(scale)))
        return out

    def add_(self, dst: Array, src: Array, alpha: float = 1.0) -> Array:
        op = "add_"
        dst = self._dev_in(op, "dst", dst)
        src = self._dev_in(op, "src", src, shape=dst.shape)
        self._out_may_alias(op, "dst", dst, "src", src)
        if dst.size:
            self._launch("elementwise", "add_scaled_inplace", plan.grid_1d(dst.size), BLOCK,
                         (dst, src, np.float32(alpha), np.int64(dst.size)))
        return dst

    def scale_(self, dst: Array, factor: float | Array) -> Array:
        op = "scale_"
        dst = self._dev_in(op, "dst", dst)
        if not dst.size:
            return dst
        if isinstance(factor, self.xp.ndarray):
            factor = self._dev_in(op, "factor", factor, dtype=np.float32)
            if factor.size != 1:
                fail(op, f"factor must be a scalar, got shape {factor.shape}")
            self._no_alias(op, "dst", dst, factor=factor)
            self._launch("elementwise", "scale_inplace_by_device", plan.grid_1d(dst.size), BLOCK,
                         (dst, factor, np.int64(dst.size)))
        else:
            self._launch("elementwise", "scale_inplace", plan.grid_1d(dst.size), BLOCK,
                         (dst, np.float32(factor), np.int64(dst.size)))
        return dst

    # ------------------------------------------------------------------ data
    def gather_batch(
        self,
        images: Array,
        labels: Array,
        indices: Array,
        *,
        mean: float,
        std: float,
        out_x: Array | None = None,
        out_y: Array | None = None,
        start: int = 0,
        start_counter: Array | None = None,
        count: int | None = None,
    ) -> tuple[Array, Array]:
        """As Backend.gather_batch; indices are not range-checked on the host (a sync), nor is
        a device `start` (the caller keeps start + count within indices)."""
        op = "gather_batch"
        images = self._dev_in(op, "images", images, dtype=np.uint8)
        if images.ndim < 1:
            fail(op, f"images {images.shape} needs a sample axis")
        n = images.shape[0]
        if labels.dtype not in _LABEL_KINDS:
            fail(op, f"labels {labels.shape} have dtype {labels.dtype}; uint8, int32 or int64 expected")
        labels = self._dev_in(op, "labels", labels, shape=(n,), dtype=labels.dtype)
        if indices.dtype not in _INDEX_DTYPES or indices.ndim != 1:
            fail(op, f"indices must be 1-D int32 or int64, got {indices.dtype} {indices.shape}")
        indices = self._dev_in(op, "indices", indices, dtype=indices.dtype)
        if not 0 <= start <= indices.shape[0]:
            fail(op, f"start {start} is outside indices {indices.shape}")
        indices = indices[start:]  # a view: the kernel adds start_counter[0] (or 0) on the device
        if start_counter is not None and count is None:
            fail(op, "a start_counter needs count=")
        B = indices.shape[0] if count is None else int(count)
        if start_counter is None and not 0 <= B <= indices.shape[0]:
            fail(op, f"{B} indices from {start} do not fit in indices {indices.shape}")
        _, start_at = self._offset_args(op, "start", 0, start_counter, 0)
        D = int(np.prod(images.shape[1:], dtype=np.int64))
        if B > plan.INT32_MAX:
            fail(op, f"{B} indices are more than one launch covers")
        out_x = self._dev_out(op, "out_x", out_x, (B, *images.shape[1:]))
        out_y = self._dev_out(op, "out_y", out_y, (B,), np.int32)
        if B == 0:
            return out_x, out_y
        scale, shift = 1.0 / (255.0 * std), -mean / std  # (v / 255 - mean) / std = v * scale + shift
        self._launch("elementwise", "gather_batch", plan.gather_grid(B, D), BLOCK, (
            images, labels, indices, start_at, out_x, out_y, np.int32(B), np.int64(D),
            np.int32(indices.dtype == np.int64), np.int32(_LABEL_KINDS[labels.dtype]),
            np.float32(scale), np.float32(shift)))  # fmt: skip
        return out_x, out_y
