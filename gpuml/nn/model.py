"""Sequential: a stack of layers built for one input shape, with a printed summary, weights
loaded by layer name (fine-tuning) and frozen layers."""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from gpuml.backend.base import Array, Backend
from gpuml.errors import ShapeError
from gpuml.nn.layers import Dropout, Layer, Shape


class Sequential:
    def __init__(self, layers: list[Layer]) -> None:
        self.layers = list(layers)
        self.input_shape: Shape = ()
        self.output_shape: Shape = ()
        self.backend: Backend | None = None
        # What load_weights() loaded (or will load at build), recorded as model.init_from /
        # model.init_skip so that the config a run saves can rebuild this model.
        self.init_from: str | None = None
        self.init_skip: list[str] = []
        self._name_layers()

    @property
    def built(self) -> bool:
        return self.backend is not None

    def _name_layers(self) -> None:
        """Number unnamed layers like Keras does (conv2d_1, dense_2), skipping names given
        explicitly; names must be unique, as weights, checkpoints, init_skip and freeze refer to
        layers by name."""
        given = {layer.name for layer in self.layers if layer.name != layer.kind}
        counts: dict[str, int] = {}
        for layer in (layer for layer in self.layers if layer.name == layer.kind):
            while layer.name == layer.kind or layer.name in given:
                counts[layer.kind] = counts.get(layer.kind, 0) + 1
                layer.name = f"{layer.kind}_{counts[layer.kind]}"
        seen: set[str] = set()
        for i, layer in enumerate(self.layers):
            if layer.name in seen:
                err = ShapeError(f"layer {layer.name}: the name is used by an earlier layer too; names must be unique")
                err.layer_index = i  # type: ignore[attr-defined]
                raise err
            seen.add(layer.name)

    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def build(self, input_shape: Shape, backend: Backend, seed: int) -> Sequential:
        """Build every layer in order (shape errors name the layer), drawing initial weights
        from one generator seeded by `seed`."""
        self.backend = backend
        self.input_shape = tuple(input_shape)
        rng = np.random.default_rng(seed)
        shape = self.input_shape
        self._name_layers()
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Dropout):
                layer.seed = zlib.crc32(f"{seed}:{i}:dropout".encode())
            try:
                shape = layer.build(shape, backend, rng)
            except ShapeError as exc:
                exc.layer_index = i  # type: ignore[attr-defined]
                raise
        self.output_shape = shape
        self.update_grad_flags()
        return self

    def update_grad_flags(self) -> None:
        """Layers up to and including the first with trainable parameters need no input
        gradient (nothing below them has anything to learn). Call after changing `trainable`."""
        first = next((i for i, layer in enumerate(self.layers) if layer.params and layer.trainable),
                     len(self.layers) - 1)
        for i, layer in enumerate(self.layers):
            layer.need_input_grad = i > first
        for i, layer in enumerate(self.layers):  # fusions across layers depend on need_input_grad
            layer.link_previous(self.layers[i - 1] if i else None)

    def forward_buffered(self, x: Array, training: bool = False, step: int = 0) -> Array:
        """The output in the last layer's own buffer (or a view of x), overwritten by the next
        call: the trainer's step uses it before then and copies nothing."""
        for layer in self.layers:
            x = layer.forward(x, training, step)
        return x

    def forward(self, x: Array, training: bool = False, step: int = 0) -> Array:
        """The model's output as a new array the caller owns (later calls do not change it)."""
        y = self.forward_buffered(x, training, step)
        assert self.backend is not None
        return self.backend.copy_(self.backend.empty(y.shape, y.dtype), y)

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

    def trainable_parameters(self) -> Iterator[tuple[str, Array, Array]]:
        """named_parameters() of the layers with `trainable` set: what the optimizer updates."""
        for layer in self.layers:
            if layer.trainable:
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

    def load_weights(self, path: str | Path, skip: Iterable[str] = ()) -> None:
        """Initialise from a weights file, matching parameters by layer name: a run folder, a
        weights .npz or checkpoint, or a .safetensors export. Layers named in `skip` keep their
        fresh initialisation (e.g. a new head). On a model not built yet the weights are loaded
        when it is built (the first fit or predict)."""
        # Absolute, so the config a run saves still finds it from another working directory.
        from gpuml.data.user import expand_user

        self.init_from, self.init_skip = str(expand_user(path, "load_weights").resolve()), list(skip)
        if self.built:
            from gpuml.weights import read_weights

            self.load_matching(read_weights(Path(self.init_from)), self.init_skip, source=str(path))

    def load_matching(self, state: dict[str, np.ndarray], skip: Iterable[str] = (),
                      source: str = "weights") -> None:
        """Copy `state` ("layer.param" keys) into every layer with parameters, except those in
        `skip`; checks every name and shape before changing anything."""
        assert self.backend is not None
        names = self.layer_names()
        skip = list(skip)
        for name in skip:
            if name not in names:
                raise ShapeError(f"{source}: init_skip names unknown layer {name!r}; the model's layers "
                                 f"are {', '.join(names)}")
        in_file = sorted({k.rpartition(".")[0] for k in state})
        todo = []
        for layer in self.layers:
            if not layer.params or layer.name in skip:
                continue
            for key, p in layer.params.items():
                name = f"{layer.name}.{key}"
                if name not in state:
                    raise ShapeError(f"{source}: no weights for layer {layer.name} ({name}); the file has "
                                     f"layers {', '.join(in_file) or '(none)'}; put {layer.name} in "
                                     f"init_skip to keep its fresh initialisation")
                got = tuple(state[name].shape)
                if got != tuple(p.shape):
                    raise ShapeError(f"{source}: {name} has shape {got} in the file, the model wants "
                                     f"{tuple(p.shape)}; put {layer.name} in init_skip to train it afresh "
                                     f"(the model's layers are {', '.join(names)})")
                todo.append((p, state[name]))
        for p, value in todo:
            self.backend.copy_(p, self.backend.asarray(np.asarray(value, dtype=self.backend.dtype)))

    def summary(self) -> str:
        if not self.built:
            raise ShapeError("summary: the model is not built yet; its shapes come from the input "
                             "(the first fit or predict, or build())")
        rows = [("layer", "output shape", "params", "")]
        rows.append(("input", str(self.input_shape), "", ""))
        for layer in self.layers:
            frozen = ", frozen" if layer.params and not layer.trainable else ""
            rows.append((layer.name, str(layer.output_shape), f"{layer.num_params():,}", layer.describe() + frozen))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        rule = "-" * max(len(line) for line in lines)
        total = f"total parameters: {self.num_params():,}"
        trained = sum(layer.num_params() for layer in self.layers if layer.trainable)
        if trained != self.num_params():
            total += f" ({trained:,} trainable)"
        return "\n".join([lines[0], rule, *lines[1:], rule, total])
