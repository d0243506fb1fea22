"""Layers. Each layer is built once for an input shape (without the batch axis), owns its
parameters and gradients as backend arrays, and keeps per-batch-size buffers for its activations
and input gradient, allocated the first time a batch size is seen and reused afterwards, so a
training step allocates nothing after the first one.

Contract: `forward(x, training, step)` saves what backward needs and returns y;
`backward(dy)` fills `self.grads` and returns dx, or None when `need_input_grad` is False (the first
layer: nothing upstream wants dx, so the work is skipped).

`trainable = False` freezes a layer: backward skips its weight and bias gradients, the optimizer
leaves its parameters out, and no input gradient is computed below the first trainable layer.
It takes effect when the model is next set up for training (build_model, fit).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gpuml.backend.base import ACTIVATIONS, Array, Backend, Pair, conv_out_size
from gpuml.errors import ShapeError
from gpuml.nn.buffers import Buffers
from gpuml.nn.memory import ensure_host_memory, out_of_memory

Shape = tuple[int, ...]


def _pair(v: int | Pair | list[int], what: str, layer: str) -> Pair:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    raise ShapeError(f"layer {layer}: {what} must be an int or a pair of ints, got {v!r}")


class Layer:
    """Base class: no parameters, identity buffers."""

    kind = "layer"

    def __init__(self, name: str = "") -> None:
        self.name = name or self.kind
        self.params: dict[str, Array] = {}
        self.grads: dict[str, Array] = {}
        self.input_shape: Shape = ()
        self.output_shape: Shape = ()
        self.need_input_grad = True
        self.trainable = True
        self.backend: Backend | None = None
        self._buffers: Buffers | None = None

    # -- building -------------------------------------------------------------------------
    def build(self, input_shape: Shape, backend: Backend, rng: np.random.Generator) -> Shape:
        self.backend = backend
        self._buffers = Buffers(backend)
        self.input_shape = tuple(input_shape)
        self.output_shape = self.infer_shape(self.input_shape)
        try:
            self.init_params(rng)
        except MemoryError as exc:
            raise out_of_memory(self.name, "its parameters", "use fewer units or filters", exc) from None
        return self.output_shape

    def infer_shape(self, input_shape: Shape) -> Shape:
        return input_shape

    def init_params(self, rng: np.random.Generator) -> None:
        """Draw parameters on the host in float64 (identical on every backend), then send."""

    def _set_param(self, key: str, host: np.ndarray) -> None:
        assert self.backend is not None
        if self.backend.name == "cpu":  # on a GPU, CuPy's own OutOfMemoryError says it
            ensure_host_memory(self.name, host.shape, self.backend.dtype, "use fewer units or filters")
        self.params[key] = self.backend.asarray(host.astype(self.backend.dtype))
        self.grads[key] = self.backend.zeros(host.shape)

    def buffer(self, key: str, shape: Shape, dtype: Any = None) -> Array:
        """A buffer reused across steps for this (key, shape, dtype)."""
        assert self._buffers is not None, f"layer {self.name} used before build()"
        try:
            return self._buffers.get(key, shape, dtype)
        except MemoryError as exc:
            raise out_of_memory(self.name, f"its {key} buffer for a batch of {shape[0]}", "try a smaller batch size",
                                exc, shape, self.backend.dtype if dtype is None else dtype) from None

    def num_params(self) -> int:
        return int(sum(math.prod(p.shape) for p in self.params.values()))

    def describe(self) -> str:
        """The config-ish detail column of the summary."""
        return ""

    # -- running ---------------------------------------------------------------------------
    def check_input(self, x: Array) -> None:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ShapeError(
                f"layer {self.name}: expected input (batch, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )

    def forward(self, x: Array, training: bool, step: int = 0) -> Array:
        raise NotImplementedError

    def backward(self, dy: Array) -> Array | None:
        raise NotImplementedError

    def link_previous(self, prev: Layer | None) -> None:
        """Called by Sequential, in layer order, once `need_input_grad` is set: a layer may fuse
        work of the layer before it into its own launches (Dense: that layer's ReLU backward)."""


class _LinearActivation(Layer):
    """Dense and Conv2D: y = act(linear(x) + b). ReLU is fused into the linear op's epilogue,
    tanh/sigmoid are applied in place; backward goes through the activation (from the saved
    output), then the subclass's weight and input gradients."""

    def __init__(self, activation: str | None, use_bias: bool, init: str | None, name: str) -> None:
        super().__init__(name)
        self.activation = activation
        self.use_bias = use_bias
        self.init = init or ("he" if activation == "relu" else "glorot")
        #: the dy backward receives is already through this layer's ReLU (the next layer's dx
        #: epilogue applied it), so backward skips activation_bwd
        self.relu_grad_fused = False

    def link_previous(self, prev: Layer | None) -> None:
        self.relu_grad_fused = False  # until the next layer claims it
    def _linear(self, x: Array, fused: str | None, out: Array) -> None:
        raise NotImplementedError

    def _weight_grad(self, x: Array, dz: Array, db: Array | None) -> None:
        """The weight gradient, and the bias gradient into db (when not None), fused where the
        backend can."""
        raise NotImplementedError

    def _input_grad(self, dz: Array, out: Array) -> Array:
        raise NotImplementedError

    def _init_bias(self, n: int) -> None:
        if self.use_bias:
            self._set_param("b", np.zeros(n))

    def _activation_note(self) -> str:
        return f", {self.activation}" if self.activation else ""

    def forward(self, x: Array, training: bool, step: int = 0) -> Array:
        self.check_input(x)
        y = self.buffer("y", (x.shape[0], *self.output_shape))
        self._linear(x, "relu" if self.activation == "relu" else None, y)
        if self.activation not in (None, "relu"):
            self.backend.activation_fwd(self.activation, y, out=y)
        self._x, self._y = x, y
        return y

    def backward(self, dy: Array) -> Array | None:
        if not (self.trainable or self.need_input_grad):
            return None
        be = self.backend
        x, y = self._x, self._y
        dz = dy
        if self.activation and not self.relu_grad_fused:
            dz = be.activation_bwd(self.activation, y, dy, out=self.buffer("dz", y.shape))
        db = self.grads["b"] if self.use_bias and self.trainable else None
        if self.trainable and self.need_input_grad:
            return self._both_grads(x, dz, db, self.buffer("dx", x.shape))
        if self.trainable:  # a frozen layer's gradients are never read: skip the GEMMs
            self._weight_grad(x, dz, db)
        if not self.need_input_grad:
            return None
        return self._input_grad(dz, self.buffer("dx", x.shape))

    def _both_grads(self, x: Array, dz: Array, db: Array | None, out: Array) -> Array:
        """The weight (and bias) gradient, then the input gradient into `out`; a subclass may
        have the backend do both at once."""
        self._weight_grad(x, dz, db)
        return self._input_grad(dz, out)


class Dense(_LinearActivation):
    """y = act(x @ W + b); W (in, out)."""

    kind = "dense"

    def __init__(self, units: int, activation: str | None = None, use_bias: bool = True,
                 init: str | None = None, name: str = "") -> None:
        super().__init__(activation, use_bias, init, name)
        self.units = units
        self._relu_mask_of: _LinearActivation | None = None  # set by link_previous

    def infer_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 1:
            raise ShapeError(
                f"layer {self.name}: dense expects a flat input (features,), got "
                f"{input_shape} from the previous layer; add a flatten layer before it"
            )
        return (self.units,)

    def init_params(self, rng: np.random.Generator) -> None:
        fan_in, fan_out = self.input_shape[0], self.units
        self._set_param("W", init_weights(rng, self.init, (fan_in, fan_out), fan_in, fan_out))
        self._init_bias(fan_out)

    def describe(self) -> str:
        return f"units={self.units}" + self._activation_note()

    def _linear(self, x: Array, fused: str | None, out: Array) -> None:
        self.backend.matmul(x, self.params["W"], bias=self.params.get("b"), activation=fused, out=out)

    def link_previous(self, prev: Layer | None) -> None:
        super().link_previous(prev)
        # dx = (dz @ W^T) * (y_prev > 0) in one GEMM when the layer below is a ReLU Dense/Conv2D
        # whose output is this layer's input: the mask rides in the GEMM epilogue.
        fuse = isinstance(prev, _LinearActivation) and prev.activation == "relu" and self.need_input_grad
        self._relu_mask_of = prev if fuse else None
        if fuse:
            prev.relu_grad_fused = True

    def _weight_grad(self, x: Array, dz: Array, db: Array | None) -> None:
        self.backend.matmul(x, dz, trans_a=True, col_sums=db, out=self.grads["W"])  # db: dz's column sums

    def _input_grad(self, dz: Array, out: Array) -> Array:
        prev = self._relu_mask_of
        return self.backend.matmul(dz, self.params["W"], trans_b=True, out=out,
                                   relu_mask=None if prev is None else prev._y)


class Conv2D(_LinearActivation):
    """y = act(conv2d(x, W) + b); W (filters, C, kh, kw); NCHW."""

    kind = "conv2d"

    def __init__(self, filters: int, kernel: int | Pair, stride: int | Pair = 1,
                 padding: int | Pair | str = 0, activation: str | None = None,
                 use_bias: bool = True, init: str | None = None, name: str = "") -> None:
        super().__init__(activation, use_bias, init, name)
        self.filters = filters
        self.kernel = _pair(kernel, "kernel", self.name)
        self.stride = _pair(stride, "stride", self.name)
        if padding == "valid":
            padding = 0
        if padding == "same":
            if self.stride != (1, 1) or self.kernel[0] % 2 == 0 or self.kernel[1] % 2 == 0:
                raise ShapeError(f"layer {self.name}: padding 'same' needs stride 1 and an odd kernel")
            padding = (self.kernel[0] // 2, self.kernel[1] // 2)
        self.padding = _pair(padding, "padding", self.name)  # type: ignore[arg-type]

    def infer_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ShapeError(
                f"layer {self.name}: conv2d expects an image input (channels, height, width), got {input_shape}"
            )
        c, h, w = input_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        if kh > h + 2 * ph or kw > w + 2 * pw:
            raise ShapeError(
                f"layer {self.name}: kernel {kh}x{kw} is larger than its padded input "
                f"{h + 2 * ph}x{w + 2 * pw} (input {input_shape})"
            )
        return (self.filters, conv_out_size(h, kh, sh, ph), conv_out_size(w, kw, sw, pw))

    def init_params(self, rng: np.random.Generator) -> None:
        c = self.input_shape[0]
        kh, kw = self.kernel
        shape = (self.filters, c, kh, kw)
        self._set_param("W", init_weights(rng, self.init, shape, c * kh * kw, self.filters * kh * kw))
        self._init_bias(self.filters)

    def describe(self) -> str:
        s = f"{self.filters} {self.kernel[0]}x{self.kernel[1]}"
        if self.stride != (1, 1):
            s += f" stride {_pair_text(self.stride)}"
        if self.padding != (0, 0):
            s += f" pad {_pair_text(self.padding)}"
        return s + self._activation_note()

    def _linear(self, x: Array, fused: str | None, out: Array) -> None:
        self.backend.conv2d_fwd(x, self.params["W"], self.params.get("b"), self.stride, self.padding,
                                activation=fused, out=out)

    def link_previous(self, prev: Layer | None) -> None:
        super().link_previous(prev)
        # The conv backward kernels apply this layer's own ReLU backward as they gather dy
        # (relu_mask=), so no launch writes dz.
        self.relu_grad_fused = self.activation == "relu"

    def _relu_mask(self) -> Array | None:
        return self._y if self.relu_grad_fused else None

    def _weight_grad(self, x: Array, dz: Array, db: Array | None) -> None:
        self.backend.conv2d_bwd_weight(x, dz, self.params["W"].shape, self.stride, self.padding,
                                       relu_mask=self._relu_mask(), db=db, out=self.grads["W"])

    def _input_grad(self, dz: Array, out: Array) -> Array:
        return self.backend.conv2d_bwd_data(dz, self.params["W"], out.shape, self.stride, self.padding,
                                            relu_mask=self._relu_mask(), out=out)

    def _both_grads(self, x: Array, dz: Array, db: Array | None, out: Array) -> Array:
        return self.backend.conv2d_bwd(x, dz, self.params["W"], self.stride, self.padding,
                                       relu_mask=self._relu_mask(), db=db, dw=self.grads["W"], dx=out)[1]


class _Pool2D(Layer):
    def __init__(self, size: int | Pair, stride: int | Pair | None = None,
                 padding: int | Pair = 0, name: str = "") -> None:
        super().__init__(name)
        self.size = _pair(size, "size", self.name)
        self.stride = _pair(stride if stride is not None else size, "stride", self.name)
        self.padding = _pair(padding, "padding", self.name)
        if self.padding[0] * 2 > self.size[0] or self.padding[1] * 2 > self.size[1]:
            raise ShapeError(f"layer {self.name}: padding {self.padding} must be at most half the window {self.size}")

    def infer_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 3:
            raise ShapeError(
                f"layer {self.name}: {self.kind} expects an image input (channels, height, width), got {input_shape}"
            )
        c, h, w = input_shape
        (kh, kw), (sh, sw), (ph, pw) = self.size, self.stride, self.padding
        if kh > h + 2 * ph or kw > w + 2 * pw:
            raise ShapeError(
                f"layer {self.name}: window {kh}x{kw} is larger than its input {h}x{w} (input {input_shape})"
            )
        return (c, conv_out_size(h, kh, sh, ph), conv_out_size(w, kw, sw, pw))

    def describe(self) -> str:
        s = f"{self.size[0]}x{self.size[1]}"
        if self.stride != self.size:
            s += f" stride {_pair_text(self.stride)}"
        if self.padding != (0, 0):
            s += f" pad {_pair_text(self.padding)}"
        return s


class MaxPool2D(_Pool2D):
    kind = "maxpool2d"

    def forward(self, x: Array, training: bool, step: int = 0) -> Array:
        self.check_input(x)
        shape = (x.shape[0], *self.output_shape)
        y, self._argmax = self.backend.maxpool2d_fwd(
            x, self.size, self.stride, self.padding,
            out=self.buffer("y", shape), argmax=self.buffer("argmax", shape, np.int32),
        )
        self._x_shape = x.shape
        return y

    def backward(self, dy: Array) -> Array | None:
        if not self.need_input_grad:
            return None
        return self.backend.maxpool2d_bwd(dy, self._argmax, self._x_shape, self.size, self.stride,
                                          self.padding, out=self.buffer("dx", self._x_shape))


class AvgPool2D(_Pool2D):
    kind = "avgpool2d"

    def forward(self, x: Array, training: bool, step: int = 0) -> Array:
        self.check_input(x)
        self._x_shape = x.shape
        return self.backend.avgpool2d_fwd(x, self.size, self.stride, self.padding,
                                          out=self.buffer("y", (x.shape[0], *self.output_shape)))

    def backward(self, dy: Array) -> Array | None:
        if not self.need_input_grad:
            return None
        return self.backend.avgpool2d_bwd(dy, self._x_shape, self.size, self.stride, self.padding,
                                          out=self.buffer("dx", self._x_shape))


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W): a view, no copy."""

    kind = "flatten"

    def infer_shape(self, input_shape: Shape) -> Shape:
        return (math.prod(input_shape),)

    def forward(self, x: Array, training: bool, step: int = 0) -> Array:
        self.check_input(x)
        self._x_shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy: Array) -> Array | None:
        return dy.reshape(self._x_shape) if self.need_input_grad else None


class Activation(Layer):
    """A standalone relu/tanh/sigmoid layer (the `activation:` key of dense/conv2d fuses it)."""

    kind = "activation"

    def __init__(self, activation: str, name: str = "") -> None:
        if activation not in ACTIVATIONS:
            raise ShapeError(f"layer {name or activation}: unknown activation {activation!r}")
        self.kind = activation
        super().__init__(name)
        self.activation = activation

    def forward(self, x: Array, training: bool, step: int = 0) -> Array:
        self.check_input(x)
        self._y = self.backend.activation_fwd(self.activation, x, out=self.buffer("y", x.shape))
        return self._y

    def backward(self, dy: Array) -> Array | None:
        if not self.need_input_grad:
            return None
        return self.backend.activation_bwd(self.activation, self._y, dy,
                                           out=self.buffer("dx", dy.shape))


class Dropout(Layer):
    """Inverted dropout. The mask is a pure function of (layer seed, step, element) through the
    shared counter-based generator, so it is the same on every backend and after a resume."""

    kind = "dropout"

    def __init__(self, rate: float, name: str = "") -> None:
        super().__init__(name)
        if not 0.0 <= rate < 1.0:
            raise ShapeError(f"layer {self.name}: dropout rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.seed = 0
        #: index in the global batch of this input's first sample (a data-parallel rank's shard
        #: starts past 0): the mask is keyed by the global element, so ranks draw what one
        #: process draws for the same samples
        self.sample_offset = 0

    def describe(self) -> str:
        return f"rate={self.rate}"

    def forward(self, x: Array, training: bool, step: int | Array = 0) -> Array:
        self.check_input(x)
        self._active = training and self.rate > 0
        if not self._active:
            return x
        # `step` is the training step, or (a captured step) a device counter holding step << 32
        counter = None if isinstance(step, (int, np.integer)) else step
        offset = (0 if counter is not None else int(step) << 32) + self.sample_offset * (x.size // x.shape[0])
        y, self._mask = self.backend.dropout_fwd(
            x, self.rate, self.seed, offset, offset_counter=counter,
            out=self.buffer("y", x.shape), mask=self.buffer("mask", x.shape, np.uint8),
        )
        return y

    def backward(self, dy: Array) -> Array | None:
        if not self.need_input_grad:
            return None
        if not self._active:
            return dy
        return self.backend.dropout_bwd(dy, self._mask, self.rate, out=self.buffer("dx", dy.shape))


def _pair_text(pair: Pair) -> str:
    """(2, 2) -> "2", (2, 1) -> "2x1" (height x width): the summary shows both when they differ."""
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def init_weights(rng: np.random.Generator, scheme: str, shape: tuple[int, ...],
                 fan_in: int, fan_out: int) -> np.ndarray:
    """He (normal, std sqrt(2/fan_in)) or Glorot (uniform, limit sqrt(6/(fan_in+fan_out)))."""
    if scheme == "he":
        return rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)
    if scheme == "glorot":
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, size=shape)
    raise ShapeError(f"unknown init {scheme!r}: choose he or glorot")
