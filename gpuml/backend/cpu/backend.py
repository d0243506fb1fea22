"""The CPU backend: NumPy (BLAS for every GEMM) plus numba loops, float32 or float64.

It is the reference every CUDA kernel is tested against, so each op checks its arguments where
they enter (shape, dtype, C-contiguous `out=` buffers) and raises ShapeError naming the op and the
shapes. Inputs may be non-contiguous (they are copied); outputs and in-place targets may not.
Reductions over float32 data accumulate in float64. Every op is deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from gpuml.backend import augment
from gpuml.backend.base import Backend, Pair, check_activation, dropout_scale, host_int
from gpuml.backend.cpu import conv as cpu_conv
from gpuml.backend.cpu import loops
from gpuml.backend.cpu import mkl as cpu_mkl
from gpuml.backend.cpu.checks import Checks, fail, first_outside
from gpuml.backend.cpu.losses import LossOps
from gpuml.backend.cpu.optim import OptimizerSteps
from gpuml.backend.cpu.pool import PoolingOps
from gpuml.backend.cpu.precision import round_operand

#: elements from which _on_mkl_pool splits a pass
SPLIT_MIN = 1 << 15
_ACT_BWD = {"relu": loops.relu_bwd, "tanh": loops.tanh_bwd, "sigmoid": loops.sigmoid_bwd}


class CpuBackend(LossOps, PoolingOps, OptimizerSteps, Checks, Backend):
    """NumPy + numba, float32 or float64 (`CpuBackend(dtype="float64")` for gradient checks)."""

    name = "cpu"
    xp = np

    def __init__(self, dtype: str | np.dtype = "float32") -> None:
        super().__init__(dtype)
        # MKL for the dense and convolution products when the `mkl` extra is installed (mkl.py)
        self._ws = cpu_conv.Workspace(cpu_mkl.load(_blas_threads()))
        self._luts: dict[tuple[float, float], np.ndarray] = {}

    def describe(self) -> str:
        mkl = f"{self._mkl.version} for GEMMs, " if self._mkl else ""
        return (f"cpu (numpy {np.__version__}, numba {numba.__version__}, {mkl}{_blas_threads()} BLAS threads, "
                f"{self.dtype})")

    @property
    def _mkl(self) -> cpu_mkl.Mkl | None:
        """The MKL this backend's products run on, or None (numpy's BLAS)."""
        return self._ws.mkl

    def _on_mkl_pool(self, work: int = SPLIT_MIN) -> bool:
        """Whether a pass of `work` elements (Adam's update, or an elementwise pass right after a
        dense product) runs split on MKL's OpenMP threads (numba's parallel loops share them,
        mkl.py): they still spin from the last product, so splitting costs a few us instead of a
        helper's wake-up; from 32 Ki elements (the seed MLP at batch 128: its 128x1024 ReLU masks
        took 94 and 68 us on one thread)."""
        mkl = self._ws.mkl
        return work >= SPLIT_MIN and mkl is not None and mkl.threads > 1 and mkl.numba_shares_pool

    # ------------------------------------------------------------------ arrays and transfer
    def asarray(self, x: Any, dtype: Any = None) -> np.ndarray:
        """Always a fresh copy, so later writes to the host data cannot reach it (as on CUDA)."""
        arr = np.asarray(x)
        if dtype is None:
            dtype = self.dtype if arr.dtype.kind == "f" else arr.dtype
        return np.array(arr, dtype=dtype, order="C", copy=True)

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, copy=True)

    # ------------------------------------------------------------------ dense algebra
    def matmul(
        self,
        a: np.ndarray,
        b: np.ndarray,
        *,
        trans_a: bool = False,
        trans_b: bool = False,
        bias: np.ndarray | None = None,
        activation: str | None = None,
        accumulate: bool = False,
        relu_mask: np.ndarray | None = None,
        col_sums: np.ndarray | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        c = self.checks("matmul", a, b, trans_a, trans_b, bias, activation, accumulate, relu_mask, col_sums, out)
        a = c.float_in("a", a, ndim=2)
        b = c.float_in("b", b, ndim=2)
        opa = a.T if trans_a else a
        opb = b.T if trans_b else b
        if opa.shape[1] != opb.shape[0]:
            na, nb = "a.T" if trans_a else "a", "b.T" if trans_b else "b"
            c.fail(f"{na} {opa.shape} and {nb} {opb.shape} do not fit ({opa.shape[1]} != {opb.shape[0]})")
        shape = (opa.shape[0], opb.shape[1])
        relu = c.epilogue_act(activation)
        if bias is not None:
            bias = c.float_in("bias", bias, shape=(shape[1],))
        if relu_mask is not None:
            relu_mask = c.float_in("relu_mask", relu_mask, shape=shape)
        if col_sums is not None:
            col_sums = c.out_buf("col_sums", col_sums, (shape[1],))
        if accumulate and (out is None or bias is not None or relu):
            raise ValueError("matmul: accumulate=True needs out= and allows no bias or activation")
        out = c.out_buf("out", out, shape)
        c.done()
        if col_sums is not None:  # first: `out` may not alias b, but the sums read b only
            self.bias_grad(np.ascontiguousarray(opb), out=col_sums)
        if self.precision != "fp32":  # the tensor-core kernels' operand rounding (after the FP32 sums)
            opa, opb = round_operand(opa, self.precision), round_operand(opb, self.precision)
        if accumulate:
            part = self._ws.scratch("matmul_part", shape, self.dtype)
            self._ws.gemm(opa, opb, part, alone=False)
            np.add(out, part, out=out)
        else:
            self._ws.gemm(opa, opb, out, alone=False)
            if bias is not None or relu:
                b_arr = bias if bias is not None else out[0]
                if self._on_mkl_pool(out.size):
                    loops.bias_act_rows_split(out, b_arr, bias is not None, relu, loops.worker_count())
                else:
                    loops.bias_act_rows(out, b_arr, bias is not None, relu)
        if relu_mask is not None:  # the ReLU backward, as activation_bwd's select
            self.activation_bwd("relu", relu_mask, out, out=out)
        return out

    def bias_grad(self, dy: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        c = self.checks("bias_grad", dy, out)
        dy = c.float_in("dy", dy)
        if dy.ndim < 2:
            c.fail(f"dy {dy.shape} needs a batch axis and a channel axis")
        out = c.out_buf("out", out, (dy.shape[1],))
        c.done()
        dy3 = dy.reshape(dy.shape[0], dy.shape[1], -1)
        loops.run_ranges(loops.channel_sums, (dy3, out, loops.SUM_LANES), dy3.shape[1], dy3.size)
        return out

    # ------------------------------------------------------------------ convolution
    def conv2d_fwd(
        self,
        x: np.ndarray,
        w: np.ndarray,
        bias: np.ndarray | None,
        stride: Pair,
        padding: Pair,
        *,
        activation: str | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        c = self.checks("conv2d_fwd", x, w, bias, stride, padding, activation, out)
        x = c.float_in("x", x, ndim=4)
        w = c.float_in("w", w, ndim=4)
        relu = c.epilogue_act(activation)
        geom, y_shape = c.conv_geometry(x.shape, w.shape, stride, padding)
        if bias is not None:
            bias = c.float_in("bias", bias, shape=(w.shape[0],))
        out = c.out_buf("out", out, y_shape)
        c.done()
        if self.precision != "fp32":  # the tensor-core conv kernels round x and w (the bias stays FP32)
            x, w = round_operand(x, self.precision), round_operand(w, self.precision)
        cpu_conv.conv2d_fwd(self._ws, x, w, bias, geom, relu, out)
        return out

    def conv2d_bwd_data(
        self,
        dy: np.ndarray,
        w: np.ndarray,
        x_shape: Sequence[int],
        stride: Pair,
        padding: Pair,
        *,
        relu_mask: np.ndarray | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        c = self.checks("conv2d_bwd_data", dy, w, x_shape, stride, padding, relu_mask, out)
        w = c.float_in("w", w, ndim=4)
        x_shape = c.shape4("x_shape", x_shape)
        geom, y_shape = c.conv_geometry(x_shape, w.shape, stride, padding)
        dy = c.float_in("dy", dy, shape=y_shape)
        if relu_mask is not None:
            relu_mask = c.float_in("relu_mask", relu_mask, shape=y_shape)
        out = c.out_buf("out", out, x_shape)
        c.done()
        # the ReLU backward (activation_bwd's select) rides in the pass laying dz out for the GEMMs;
        # tf32 / bf16: the tensor-core kernels round dz (there, after the mask) and w
        if self.precision != "fp32":
            w = round_operand(w, self.precision)
        cpu_conv.conv2d_bwd_data(self._ws, cpu_conv.Dz(dy, relu_mask, precision=self.precision), w, geom, out)
        return out

    def conv2d_bwd_weight(
        self,
        x: np.ndarray,
        dy: np.ndarray,
        w_shape: Sequence[int],
        stride: Pair,
        padding: Pair,
        *,
        relu_mask: np.ndarray | None = None,
        db: np.ndarray | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        c = self.checks("conv2d_bwd_weight", x, dy, w_shape, stride, padding, relu_mask, db, out)
        x = c.float_in("x", x, ndim=4)
        w_shape = c.shape4("w_shape", w_shape)
        geom, y_shape = c.conv_geometry(x.shape, w_shape, stride, padding)
        dy = c.float_in("dy", dy, shape=y_shape)
        if relu_mask is not None:
            relu_mask = c.float_in("relu_mask", relu_mask, shape=y_shape)
        if db is not None:
            db = c.out_buf("db", db, (w_shape[0],))
        out = c.out_buf("out", out, w_shape)
        c.done()
        # the ReLU backward and the bias gradient ride in the pass laying dz out for the GEMMs;
        # tf32 / bf16: the kernels round x and dz, and db is the sum of the unrounded dz
        if self.precision != "fp32":
            x = round_operand(x, self.precision)
        cpu_conv.conv2d_bwd_weight(self._ws, x, cpu_conv.Dz(dy, relu_mask, db, precision=self.precision), geom, out)
        return out

    def conv2d_bwd(
        self,
        x: np.ndarray,
        dy: np.ndarray,
        w: np.ndarray,
        stride: Pair,
        padding: Pair,
        *,
        relu_mask: np.ndarray | None = None,
        db: np.ndarray | None = None,
        dw: np.ndarray | None = None,
        dx: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if not cpu_conv.fused_bwd(np.shape(x)[1] if np.ndim(x) == 4 else 0):
            return super().conv2d_bwd(x, dy, w, stride, padding, relu_mask=relu_mask, db=db, dw=dw, dx=dx)
        c = self.checks("conv2d_bwd", x, dy, w, stride, padding, relu_mask, db, dw, dx)
        x = c.float_in("x", x, ndim=4)
        w = c.float_in("w", w, ndim=4)
        geom, y_shape = c.conv_geometry(x.shape, w.shape, stride, padding)
        dy = c.float_in("dy", dy, shape=y_shape)
        if relu_mask is not None:
            relu_mask = c.float_in("relu_mask", relu_mask, shape=y_shape)
        if db is not None:
            db = c.out_buf("db", db, (w.shape[0],))
        dw = c.out_buf("dw", dw, w.shape)
        dx = c.out_buf("dx", dx, x.shape)
        c.done()
        if self.precision != "fp32":  # as conv2d_bwd_weight (x) and conv2d_bwd_data (w) round them
            x, w = round_operand(x, self.precision), round_operand(w, self.precision)
        cpu_conv.conv2d_bwd(self._ws, x, w, cpu_conv.Dz(dy, relu_mask, db, precision=self.precision), geom, dw, dx)
        return dw, dx

    # ------------------------------------------------------------------ elementwise
    def activation_fwd(self, kind: str, x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        c = self.checks("activation_fwd", kind, x, out)
        check_activation("activation_fwd", kind)
        x = c.float_in("x", x)
        out = c.out_buf("out", out, x.shape)
        c.done()
        if kind == "relu":
            np.maximum(x, 0, out=out)
        elif kind == "tanh":
            np.tanh(x, out=out)
        else:
            args = (x.reshape(-1), out.reshape(-1), loops.smallest_normal(self.dtype))
            loops.run_parts(loops.sigmoid_fwd, args, (0, 1), x.size)
        return out

    def activation_bwd(self, kind: str, y: np.ndarray, dy: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        c = self.checks("activation_bwd", kind, y, dy, out)
        check_activation("activation_bwd", kind)
        y = c.float_in("y", y)
        dy = c.float_in("dy", dy, shape=y.shape)
        out = c.out_buf("out", out, y.shape)
        c.done()
        if kind == "relu" and self._on_mkl_pool(y.size):
            loops.relu_bwd_split(y.reshape(-1), dy.reshape(-1), out.reshape(-1), loops.worker_count())
        else:
            loops.run_parts(_ACT_BWD[kind], (y.reshape(-1), dy.reshape(-1), out.reshape(-1)), (0, 1, 2), y.size)
        return out

    def dropout_fwd(
        self,
        x: np.ndarray,
        p: float,
        seed: int,
        offset: int,
        *,
        offset_counter: np.ndarray | None = None,
        out: np.ndarray | None = None,
        mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        op = "dropout_fwd"
        c = self.checks(op, x, out, mask)
        x = c.float_in("x", x)
        out = c.out_buf("out", out, x.shape)
        mask = c.out_buf("mask", mask, x.shape, np.uint8)
        c.done()
        offset = host_int(offset, offset_counter)
        scale = dropout_scale(op, p)
        if not 0 <= offset < 2**64 - x.size:
            raise ValueError(f"dropout_fwd: offset must be in [0, 2**64 - x.size), got {offset}")
        loops.dropout_fwd(
            x.reshape(-1), float(p), np.uint64(seed & 0xFFFFFFFFFFFFFFFF), np.uint64(offset),
            self.dtype.type(scale), out.reshape(-1), mask.reshape(-1),
        )  # fmt: skip
        return out, mask

    def dropout_bwd(self, dy: np.ndarray, mask: np.ndarray, p: float, *, out: np.ndarray | None = None) -> np.ndarray:
        c = self.checks("dropout_bwd", dy, mask, out)
        dy = c.float_in("dy", dy)
        mask = c.typed_in("mask", mask, np.uint8, dy.shape)
        out = c.out_buf("out", out, dy.shape)
        c.done()
        scale = dropout_scale("dropout_bwd", p)
        args = (dy.reshape(-1), mask.reshape(-1), self.dtype.type(scale), out.reshape(-1))
        loops.run_parts(loops.mask_scale, args, (0, 1, 3), dy.size)
        return out

    def add_(self, dst: np.ndarray, src: np.ndarray, alpha: float = 1.0) -> np.ndarray:
        c = self.checks("add_", dst, src)
        dst = c.inplace("dst", dst)
        src = c.float_in("src", src, shape=dst.shape)
        c.done()
        loops.run_parts(loops.axpy, (dst.reshape(-1), src.reshape(-1), self.dtype.type(alpha)), (0, 1), dst.size)
        return dst

    def scale_(self, dst: np.ndarray, factor: float | np.ndarray) -> np.ndarray:
        c = self.checks("scale_", dst)
        dst = c.inplace("dst", dst)
        c.done()
        np.multiply(dst, np.asarray(factor, dtype=self.dtype), out=dst)
        return dst

    # ------------------------------------------------------------------ data
    def gather_batch(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        indices: np.ndarray,
        *,
        mean: float,
        std: float,
        out_x: np.ndarray | None = None,
        out_y: np.ndarray | None = None,
        start: int = 0,
        start_counter: np.ndarray | None = None,
        count: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        first = host_int(start, start_counter)
        c = self.checks("gather_batch", images, labels, indices, first, count, out_x, out_y)
        images = c.typed_in("images", images, np.uint8)
        if images.ndim < 1:
            c.fail(f"images {images.shape} needs a sample axis")
        n = images.shape[0]
        labels = c.int_in("labels", labels, (n,))
        indices = c.int_in("indices", indices, ndim=1)
        indices = indices[first:] if count is None else indices[first:first + count]
        B = indices.shape[0]
        out_x = c.out_buf("out_x", out_x, (B, *images.shape[1:]))
        out_y = c.out_buf("out_y", out_y, (B,), np.int32)
        c.done()
        bad = first_outside(indices, n)  # a value check: on every call
        if bad >= 0:
            raise IndexError(f"gather_batch: index {indices[bad]} is outside the {n} samples")
        rows = images.reshape(n, -1)
        loops.gather_rows_lut(rows, indices.astype(np.int64), self._lut(mean, std), out_x.reshape(B, -1))
        np.copyto(out_y, labels[indices], casting="unsafe")
        return out_x, out_y

    def augment_images(
        self,
        x: np.ndarray,
        *,
        seed: int,
        offset: int,
        offset_counter: np.ndarray | None = None,
        max_shift: float,
        max_rotate: float,
        max_scale: float,
        hflip: bool,
        fill: float,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        c = self.checks("augment_images", x, out)
        x = c.float_in("x", x, ndim=4)
        out = c.out_buf("out", out, x.shape)
        c.done()
        if np.shares_memory(out, x):  # depends on where the arrays are, not on their signature
            fail("augment_images", "out must not overlap x (every output pixel reads several inputs)")
        params = augment.sample_params(seed, host_int(offset, offset_counter), x.shape[0], max_shift, max_rotate,
                                       max_scale, hflip)
        augment.affine_sample(x, params, float(fill), out)
        return out

    def _lut(self, mean: float, std: float) -> np.ndarray:
        """(v / 255 - mean) / std for every uint8 v, evaluated in float64 then rounded once."""
        key = (float(mean), float(std))
        if key not in self._luts:
            self._luts[key] = ((np.arange(256) / 255.0 - key[0]) / key[1]).astype(self.dtype)
        return self._luts[key]


def _blas_threads() -> int:
    """Threads of the BLAS numpy loaded (OpenBLAS in numpy's wheels): every GEMM runs on them, and
    the numba loops on the calling thread. Falls back to the usable core count."""
    fns = loops.blas_thread_functions()
    if fns is not None:
        return int(fns[0]())
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
