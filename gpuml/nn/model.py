"""Sequential: a stack of layers built for one input shape, with a printed summary."""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

from gpuml.backend.base import Array, Backend
from gpuml.errors import ShapeError
from gpuml.nn.layers import Dropout, Layer, Shape


class Sequential:
    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers
        self.input_shape: Shape = ()
        self.output_shape: Shape = ()
        self.backend: Backend | None = None

    def build(self, input_shape: Shape, backend: Backend, seed: int) -> Sequential:
        """Build every layer in order (shape errors name the layer), drawing initial weights
        from one generator seeded by `seed`."""
        self.backend = backend
        self.input_shape = tuple(input_shape)
        rng = np.random.default_rng(seed)
        shape = self.input_shape
        counts: dict[str, int] = {}
        for i, layer in enumerate(self.layers):
            if layer.name == layer.kind:  # unnamed: number it like Keras does (conv2d_1, dense_2)
                counts[layer.kind] = counts.get(layer.kind, 0) + 1
                layer.name = f"{layer.kind}_{counts[layer.kind]}"
            if isinstance(layer, Dropout):
                layer.seed = zlib.crc32(f"{seed}:{i}:dropout".encode())
            try:
                shape = layer.build(shape, backend, rng)
            except ShapeError as exc:
                exc.layer_index = i  # type: ignore[attr-defined]
                raise
        self.output_shape = shape
        # Layers up to and including the first with parameters need no input gradient.
        for layer in self.layers:
            layer.need_input_grad = False
            if layer.params:
                break
        return self

    def forward(self, x: Array, training: bool = False, step: int = 0) -> Array:
        for layer in self.layers:
            x = layer.forward(x, training, step)
        return x

    def backward(self, dy: Array) -> None:
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
            if dy is None:
                break

    def named_parameters(self) -> Iterator[tuple[str, Array, Array]]:
        """(name, param, grad) in a fixed order: layer order, then W before b."""
        for layer in self.layers:
            for key in layer.params:
                yield f"{layer.name}.{key}", layer.params[key], layer.grads[key]

    def num_params(self) -> int:
        return sum(layer.num_params() for layer in self.layers)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of every parameter, keyed `layer.param`."""
        assert self.backend is not None
        return {name: self.backend.to_numpy(p) for name, p, _ in self.named_parameters()}

    def load_state_dict(self, state: dict[str, np.ndarray], source: str = "weights") -> None:
        """Copy host arrays into the parameters; every name and shape must match."""
        assert self.backend is not None
        names = [n for n, _, _ in self.named_parameters()]
        missing = [n for n in names if n not in state]
        extra = [n for n in state if n not in names]
        if missing or extra:
            raise ShapeError(f"{source}: parameters do not match the model (missing {missing}, unexpected {extra})")
        for name, p, _ in self.named_parameters():
            if tuple(state[name].shape) != tuple(p.shape):
                raise ShapeError(f"{source}: {name} has shape {tuple(state[name].shape)}, "
                                 f"the model wants {tuple(p.shape)}")
            self.backend.copy_(p, self.backend.asarray(np.asarray(state[name], dtype=self.backend.dtype)))

    def summary(self) -> str:
        rows = [("layer", "output shape", "params", "")]
        rows.append(("input", str(self.input_shape), "", ""))
        for layer in self.layers:
            rows.append((layer.name, str(layer.output_shape), f"{layer.num_params():,}", layer.describe()))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        rule = "-" * max(len(line) for line in lines)
        return "\n".join([lines[0], rule, *lines[1:], rule, f"total parameters: {self.num_params():,}"])
