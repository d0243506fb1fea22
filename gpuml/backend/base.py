"""The Backend protocol: the one seam between model code and device code.

Layers, losses, optimizers and the trainer hold arrays they got from a backend and call its
methods; they never import numpy-for-device-work, cupy or numba themselves.

Contracts shared by every op:
- Arrays are the backend's native arrays (numpy.ndarray on CPU, cupy.ndarray on CUDA), C-contiguous,
  of dtype `self.dtype` (float32, or float64 in check mode) unless stated otherwise.
- Every op that produces an array takes an optional `out=` (and the other outputs likewise). When
  given, the op writes into it and returns it, so a training step can run on buffers allocated once
  per (model, batch size) and be replayed as a CUDA graph. When None, the op allocates.
- Image tensors are NCHW. Conv weights are (C_out, C_in, KH, KW). Dense weights are (in, out), so a
  Dense forward is `x @ W + b`.
- `stride` and `padding` are (h, w) int pairs; `kernel` is a (kh, kw) pair. Output size is
  floor((H + 2*pad - k) / stride) + 1, as in PyTorch/cuDNN.
- Ops check shapes and raise `gpuml.errors.ShapeError` naming the op and both shapes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np

from gpuml.errors import ShapeError

Array = Any  # numpy.ndarray or cupy.ndarray: whatever the backend's `xp` module produces
Pair = tuple[int, int]

ACTIVATIONS = ("relu", "tanh", "sigmoid")


def check_activation(op: str, kind: str) -> None:
    if kind not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {kind!r}; choose one of {', '.join(ACTIVATIONS)}")


def dropout_scale(op: str, p: float) -> float:
    """1 / (1 - p), the scale of the kept activations; p outside [0, 1) is refused."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: drop probability p must be in [0, 1), got {p}")
    return 1.0 / (1.0 - p)


def fail(op: str, message: str) -> NoReturn:
    """Raise the one-line ShapeError every backend uses: "<op>: <what is wrong>"."""
    raise ShapeError(f"{op}: {message}")


def check_pair(op: str, name: str, value: Any, minimum: int) -> Pair:
    """An (h, w) pair of ints each >= minimum (stride, padding, kernel), or a ShapeError."""
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        fail(op, f"{name} must be an (h, w) pair of ints, got {value!r}")
    if a < minimum or b < minimum:
        fail(op, f"{name} {value!r} must be >= {minimum}")
    return a, b


def host_int(value: int, counter: Array | None = None) -> int:
    """value + counter[0]: the CPU backend's reading of an offset or cursor whose `counter` part
    (a one-element int64 array) the CUDA backend reads on the device."""
    return int(value) + (0 if counter is None else int(np.asarray(counter).reshape(-1)[0]))


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output size of a convolution or pooling window (floor mode)."""
    return (size + 2 * padding - kernel) // stride + 1


#: matmul operand precisions (Backend.precision)
PRECISIONS = ("fp32", "tf32", "bf16")


class Backend(ABC):
    """A device: array creation and transfer, and every op the models need."""

    #: "cpu" or "cuda"
    name: str = "abstract"
    #: the array module (numpy or cupy); for array bookkeeping only, never for math in layers
    xp: Any = np

    def __init__(self, dtype: str | np.dtype = "float32") -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"backend dtype must be float32 or float64, got {self.dtype}")

    #: operands of matmul (the Dense layers' products): "fp32" as given; "tf32" rounded to 10
    #: mantissa bits (nearest, ties away: cvt.rna), "bf16" to 7 (nearest even); FP32 sums either
    #: way. Convolutions, the loss, optimizer state and master weights stay FP32.
    precision: str = "fp32"

    def set_precision(self, precision: str) -> None:
        """Use `precision` (one of PRECISIONS) for every later matmul. A device that cannot
        (CUDA before sm_80) raises DeviceError naming it."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision

    # ------------------------------------------------------------------ arrays and transfer
    def describe(self) -> str:
        """One line naming the device, for the first log line ("cpu (numpy 2.4, 2 threads)")."""
        return self.name

    @abstractmethod
    def asarray(self, x: Any, dtype: Any = None) -> Array:
        """Host data -> a contiguous device array (dtype defaults to `self.dtype` for floats,
        kept as is for integer input)."""

    @abstractmethod
    def to_numpy(self, x: Array) -> np.ndarray:
        """Device array -> numpy array (a copy on CUDA; synchronises)."""

    def empty(self, shape: Sequence[int] | int, dtype: Any = None) -> Array:
        return self.xp.empty(shape, dtype=self.dtype if dtype is None else dtype)

    def zeros(self, shape: Sequence[int] | int, dtype: Any = None) -> Array:
        return self.xp.zeros(shape, dtype=self.dtype if dtype is None else dtype)

    def copy_(self, dst: Array, src: Array) -> Array:
        """dst[...] = src (same shape); returns dst."""
        dst[...] = src
        return dst

    def fill_(self, dst: Array, value: float) -> Array:
        dst.fill(value)
        return dst

    def synchronize(self) -> None:  # noqa: B027 - a no-op on synchronous backends is the right default
        """Wait for all queued work (no-op on CPU)."""

    def upload_(self, dst: Array, host: np.ndarray) -> Array:
        """dst[...] = host, a host array of dst's shape, into an existing device buffer (which keeps
        its address: a captured CUDA graph that reads it stays valid). Not inside a step."""
        dst[...] = host
        return dst

    # ------------------------------------------------------------------ per-step counters
    # The values that change from one training step to the next (RNG offset, batch cursor,
    # schedule row) live in an int64 counter array on the device, passed to ops as one-element
    # views (`offset_counter=`, `start_counter=`) and bumped by `advance_` at the end of each step, so the step
    # can be captured once as a CUDA graph and replayed. On the CPU they are plain numpy ints.

    def advance_(self, counters: Array, increments: Array) -> Array:
        """counters += increments (int64 arrays of one length), in place, in one launch."""
        counters += increments
        return counters

    def step_runner(self, mode: str, warn: Any = None) -> StepRunner:
        """What runs the training and evaluation steps: `mode` is trainer.cuda_graph's
        "on" / "off" / "auto". The CPU runs every step as it comes (there is no graph)."""
        return StepRunner()

    # ------------------------------------------------------------------ dense algebra
    @abstractmethod
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
        """out = act(op(a) @ op(b) + bias), op(x) = x.T when trans_x.

        a, b 2-D; bias (N,) broadcast over rows; activation None or "relu".
        accumulate=True adds the product into `out` (which must be given): out += op(a) @ op(b);
        bias and activation are then not allowed.
        Fused epilogues (one launch on CUDA, the same semantics everywhere):
        relu_mask (M, N): then out = where(relu_mask > 0, out, 0), the select of
        activation_bwd("relu", relu_mask, out) (a Dense dx through the previous layer's ReLU,
        relu_mask being that layer's output). col_sums (N,): also written with op(b) summed
        over its rows, bias_grad(op(b)) (a Dense layer's bias gradient next to dW = x.T @ dy).
        """

    @abstractmethod
    def bias_grad(self, dy: Array, out: Array | None = None) -> Array:
        """Sum of dy over every axis but axis 1: (N, C) -> (C,), (N, C, H, W) -> (C,)."""

    # ------------------------------------------------------------------ convolution (NCHW)
    @abstractmethod
    def conv2d_fwd(
        self,
        x: Array,
        w: Array,
        bias: Array | None,
        stride: Pair,
        padding: Pair,
        *,
        activation: str | None = None,
        out: Array | None = None,
    ) -> Array:
        """y = act(conv(x, w) + bias): x (N, C, H, W), w (K, C, R, S) -> y (N, K, P, Q).
        Cross-correlation (no kernel flip), zero padding; activation None or "relu"."""

    @abstractmethod
    def conv2d_bwd_data(
        self,
        dy: Array,
        w: Array,
        x_shape: Sequence[int],
        stride: Pair,
        padding: Pair,
        *,
        relu_mask: Array | None = None,
        out: Array | None = None,
    ) -> Array:
        """dx (x_shape) of the convolution given dy (N, K, P, Q). relu_mask (N, K, P, Q): the
        gradient first goes through that ReLU output's backward, dz = where(relu_mask > 0, dy,
        0), as activation_bwd("relu", relu_mask, dy) (fused: no launch writes dz)."""

    @abstractmethod
    def conv2d_bwd_weight(
        self,
        x: Array,
        dy: Array,
        w_shape: Sequence[int],
        stride: Pair,
        padding: Pair,
        *,
        relu_mask: Array | None = None,
        db: Array | None = None,
        out: Array | None = None,
    ) -> Array:
        """dw (w_shape), summed over the batch, given x and dy. Deterministic. relu_mask as in
        conv2d_bwd_data; db (K,): also the bias gradient, bias_grad(dz), in the same pass."""

    def conv2d_bwd(
        self,
        x: Array,
        dy: Array,
        w: Array,
        stride: Pair,
        padding: Pair,
        *,
        relu_mask: Array | None = None,
        db: Array | None = None,
        dw: Array | None = None,
        dx: Array | None = None,
    ) -> tuple[Array, Array]:
        """(dw, dx): conv2d_bwd_weight and conv2d_bwd_data of one layer, for a backend that can
        do both in one pass (the CPU backend); by default the two ops, weight gradient first."""
        dw = self.conv2d_bwd_weight(x, dy, w.shape, stride, padding, relu_mask=relu_mask, db=db, out=dw)
        return dw, self.conv2d_bwd_data(dy, w, x.shape, stride, padding, relu_mask=relu_mask, out=dx)

    # ------------------------------------------------------------------ pooling (NCHW)
    @abstractmethod
    def maxpool2d_fwd(
        self,
        x: Array,
        kernel: Pair,
        stride: Pair,
        padding: Pair,
        *,
        out: Array | None = None,
        argmax: Array | None = None,
    ) -> tuple[Array, Array]:
        """(y, argmax): y (N, C, P, Q) the max over each window (padding never wins: padded
        cells count as -inf); argmax int32 (N, C, P, Q), the flat index h*W + w of the winner
        within its (n, c) plane. Ties go to the first element in row-major window order."""

    @abstractmethod
    def maxpool2d_bwd(
        self,
        dy: Array,
        argmax: Array,
        x_shape: Sequence[int],
        kernel: Pair,
        stride: Pair,
        padding: Pair,
        *,
        out: Array | None = None,
    ) -> Array:
        """dx (x_shape): each dy routed to its argmax; overlapping windows sum."""

    @abstractmethod
    def avgpool2d_fwd(
        self,
        x: Array,
        kernel: Pair,
        stride: Pair,
        padding: Pair,
        *,
        out: Array | None = None,
    ) -> Array:
        """Mean over each window, padded cells counted as zeros in a divisor of kh*kw
        (PyTorch's count_include_pad=True)."""

    @abstractmethod
    def avgpool2d_bwd(
        self,
        dy: Array,
        x_shape: Sequence[int],
        kernel: Pair,
        stride: Pair,
        padding: Pair,
        *,
        out: Array | None = None,
    ) -> Array:
        """dx (x_shape) of avgpool2d_fwd."""

    # ------------------------------------------------------------------ losses
    @abstractmethod
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
        """Fused softmax + cross-entropy in one pass.

        logits (B, K), labels int32 (B,) in [0, K). Returns (loss, dlogits): loss a 0-d array,
        the mean over the batch of -sum_k t_k log softmax(logits)_k with target
        t = (1 - eps) * onehot + eps / K; dlogits (B, K) = (softmax - t) / B.
        `dlogits` may be the `logits` array itself (overwritten in place, as llm.c does).
        accumulate (2,) of self.dtype: also the trainer's metric sums, in the same pass (one
        launch on CUDA): accumulate[0] += B * loss, accumulate[1] += count_correct(logits,
        labels) (rows whose first argmax is the label, counted before dlogits is written).
        """

    @abstractmethod
    def mse(
        self,
        pred: Array,
        target: Array,
        *,
        loss: Array | None = None,
        dpred: Array | None = None,
    ) -> tuple[Array, Array]:
        """(loss, dpred): loss 0-d = mean over all elements of (pred - target)^2,
        dpred = 2 (pred - target) / pred.size."""

    @abstractmethod
    def count_correct(self, logits: Array, labels: Array, *, out: Array | None = None) -> Array:
        """0-d array of self.dtype: how many rows have argmax(logits) == label (first max on
        ties). A float so the trainer can accumulate it on the device with `add_` (exact below
        2**24 per call)."""

    def one_hot(self, labels: Array, num_classes: int, *, out: Array | None = None) -> Array:
        """(B, num_classes) of self.dtype: 1 at each row's label, 0 elsewhere."""
        xp = self.xp
        if out is None:
            out = self.empty((labels.shape[0], num_classes))
        out.fill(0)
        out[xp.arange(labels.shape[0]), labels] = 1
        return out

    # ------------------------------------------------------------------ elementwise
    @abstractmethod
    def activation_fwd(self, kind: str, x: Array, *, out: Array | None = None) -> Array:
        """y = relu(x) | tanh(x) | sigmoid(x). `out` may be `x`."""

    @abstractmethod
    def activation_bwd(self, kind: str, y: Array, dy: Array, *, out: Array | None = None) -> Array:
        """dx from the forward *output* y: relu: dy*(y>0); tanh: dy*(1-y^2);
        sigmoid: dy*y*(1-y). `out` may be `dy`."""

    @abstractmethod
    def dropout_fwd(
        self,
        x: Array,
        p: float,
        seed: int,
        offset: int,
        *,
        offset_counter: Array | None = None,
        out: Array | None = None,
        mask: Array | None = None,
    ) -> tuple[Array, Array]:
        """Inverted dropout: keep element i with probability 1-p, scaled by 1/(1-p).
        The generator offset is `offset` plus, when given, `offset_counter[0]` (a one-element
        int64 device counter, read when the op runs, so a replayed graph draws new masks).

        The mask is a pure function of (seed, offset, flat index i) through the counter-based
        generator in `gpuml.backend.rng` (Philox-free: a 64-bit splitmix hash), so every backend
        draws the same mask. mask: uint8 (1 = kept), same shape as x. `offset` advances per call.
        """

    @abstractmethod
    def dropout_bwd(self, dy: Array, mask: Array, p: float, *, out: Array | None = None) -> Array:
        """dx = dy * mask / (1 - p)."""

    @abstractmethod
    def add_(self, dst: Array, src: Array, alpha: float = 1.0) -> Array:
        """dst += alpha * src, in place."""

    @abstractmethod
    def scale_(self, dst: Array, factor: float | Array) -> Array:
        """dst *= factor, in place (factor a Python float or a 0-d device array)."""

    # ------------------------------------------------------------------ optimizer updates
    # Each updates *all* parameters in place in a single fused pass over each tensor (one launch
    # for the whole list on CUDA). `params`, `grads` and the state lists are parallel lists.
    # weight_decay adds wd*p to the gradient (L2), except in AdamW where the update subtracts
    # lr*wd*p (decoupled, Loshchilov & Hutter). grad_scale (a 0-d device array, e.g. the factor
    # of grad_clip_factor) multiplies every gradient first, g = g * grad_scale rounded once, as
    # scale_ would have stored it: clipping without a pass over the gradients.

    @abstractmethod
    def sgd_step(
        self,
        params: list[Array],
        grads: list[Array],
        *,
        lr: float,
        weight_decay: float = 0.0,
        grad_scale: Array | None = None,
    ) -> None:
        """p -= lr * (g + wd p)"""

    @abstractmethod
    def momentum_step(
        self,
        params: list[Array],
        grads: list[Array],
        velocities: list[Array],
        *,
        lr: float,
        momentum: float,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        grad_scale: Array | None = None,
    ) -> None:
        """PyTorch's SGD-with-momentum: g' = g + wd p; v = mu v + g';
        p -= lr * (g' + mu v if nesterov else v)."""

    @abstractmethod
    def adam_step(
        self,
        params: list[Array],
        grads: list[Array],
        m: list[Array],
        v: list[Array],
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        step: int,
        weight_decay: float = 0.0,
        decoupled: bool = False,
        grad_scale: Array | None = None,
    ) -> None:
        """Adam (decoupled=False: L2 folded into g) or AdamW (decoupled=True: p *= 1 - lr wd
        first). step is 1-based: m_hat = m / (1 - beta1^step), v_hat likewise;
        p -= lr * m_hat / (sqrt(v_hat) + eps)."""

    @abstractmethod
    def rmsprop_step(
        self,
        params: list[Array],
        grads: list[Array],
        sq: list[Array],
        *,
        lr: float,
        alpha: float,
        eps: float,
        weight_decay: float = 0.0,
        grad_scale: Array | None = None,
    ) -> None:
        """g' = g + wd p; s = alpha s + (1 - alpha) g'^2; p -= lr g' / (sqrt(s) + eps)."""

    @abstractmethod
    def global_norm(self, arrays: list[Array]) -> Array:
        """0-d array: sqrt(sum of squares over every element of every array)."""

    def grad_clip_factor(self, grads: list[Array], max_norm: float) -> tuple[Array, Array]:
        """(norm, factor), 0-d arrays: the grads' global norm and min(1, max_norm / (norm +
        1e-6)), without a host round trip; the grads are left alone (pass factor to the
        optimizer step's grad_scale: the trainer's clipping, fused into the update)."""
        norm = self.global_norm(grads)
        return norm, self.xp.minimum(max_norm / (norm + 1e-6), 1.0).astype(self.dtype)

    def clip_grad_norm_(self, grads: list[Array], max_norm: float) -> Array:
        """Scale all grads in place by min(1, max_norm / (norm + 1e-6)) where norm is their
        global norm, without a host round trip; returns the (pre-clip) norm as a 0-d array."""
        norm, factor = self.grad_clip_factor(grads, max_norm)
        for g in grads:
            self.scale_(g, factor)
        return norm

    # ------------------------------------------------------------------ data
    @abstractmethod
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
        """x = (images[idx] / 255 - mean) / std as self.dtype, y = labels[idx] as int32, where
        idx = indices[s:s + count], s = start (+ start_counter[0], a one-element int64 device
        counter read on the device; `count` is then required), count defaults to the rest.
        images uint8 (N, ...), labels (N,) integers, indices int64/int32 (1-D)."""

    @abstractmethod
    def augment_images(
        self,
        x: Array,
        *,
        seed: int,
        offset: int,
        offset_counter: Array | None = None,
        max_shift: float,
        max_rotate: float,
        max_scale: float,
        hflip: bool,
        fill: float,
        out: Array | None = None,
    ) -> Array:
        """Random affine transform of each image of x (N, C, H, W), bilinear, drawn from the
        counter-based generator; the exact contract is in gpuml/backend/augment.py. `out` must
        not be x. `offset_counter` as for dropout_fwd."""


class StepRunner:
    """Runs the steps of a training run (Backend.step_runner): `run(key, fn)` calls `fn`, the
    whole step, whose shapes `key` names. The CUDA backend's runner captures `fn` as a CUDA graph
    per key after warm-up and replays it (gpuml/backend/cuda/graph.py); `fn` must then take every
    per-step value from device counters. Host-side bookkeeping belongs outside `fn`."""

    def run(self, key: Any, fn: Any) -> None:
        fn()

    def set_hyper_rows(self, record: Any, count: int, row_counter: Any = None) -> None:  # noqa: B027
        """Tabulate the optimizer's per-step hyperparameters for the next `count` steps:
        `record(i)` makes step i's optimizer call; inside a step the optimizer then reads row
        `row_counter[0]` (a device counter) of that table. The CPU reads them from each call."""

    def stream(self) -> Any:
        """A context in which the run's device work is queued (the CUDA runner's stream)."""
        import contextlib

        return contextlib.nullcontext()

    def drop(self) -> None:  # noqa: B027
        """Forget the captured graphs (their buffers may go)."""
