"""Turn a resolved config into a model, loss, optimizer and schedule. Layer build errors become
config errors naming the file, the layer's position and both shapes. Fine-tuning lives here too:
model.init_from / init_skip load weights by layer name, model.freeze fixes layers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gpuml.backend.base import Backend
from gpuml.errors import ConfigError, GpumlError, ShapeError
from gpuml.nn import layers as L
from gpuml.nn.losses import Loss, make_loss
from gpuml.nn.model import Sequential
from gpuml.optim import OPTIMIZERS, Optimizer, Schedule
from gpuml.train.config import blame


def make_layer(spec: dict[str, Any]) -> L.Layer:
    kind = spec["type"]
    kw = {k: v for k, v in spec.items() if k != "type" and v is not None}
    kw.setdefault("name", "")
    for key in ("kernel", "stride", "padding", "size"):
        if isinstance(kw.get(key), list):
            kw[key] = tuple(kw[key])
    if kind == "dense":
        return L.Dense(**kw)
    if kind == "conv2d":
        return L.Conv2D(**kw)
    if kind == "maxpool2d":
        return L.MaxPool2D(**kw)
    if kind == "avgpool2d":
        return L.AvgPool2D(**kw)
    if kind == "flatten":
        return L.Flatten(**kw)
    if kind == "dropout":
        return L.Dropout(**kw)
    if kind in ("relu", "tanh", "sigmoid"):
        return L.Activation(kind, **kw)
    raise ConfigError(f"unknown layer type {kind!r}")


def layer_spec(layer: L.Layer) -> dict[str, Any]:
    """A `model.layers` entry that make_layer() turns back into the same layer."""
    spec: dict[str, Any] = {"type": layer.kind}
    if isinstance(layer, L.Dense):
        spec["units"] = layer.units
    elif isinstance(layer, L.Conv2D):
        spec.update(filters=layer.filters, kernel=list(layer.kernel), stride=list(layer.stride),
                    padding=list(layer.padding))
    elif isinstance(layer, (L.MaxPool2D, L.AvgPool2D)):
        spec.update(size=list(layer.size), stride=list(layer.stride), padding=list(layer.padding))
    elif isinstance(layer, L.Dropout):
        spec["rate"] = layer.rate
    elif not isinstance(layer, (L.Flatten, L.Activation)):
        raise ConfigError(f"layer {layer.name}: {type(layer).__name__} has no config form")
    if isinstance(layer, (L.Dense, L.Conv2D)):
        spec.update(activation=layer.activation, use_bias=layer.use_bias, init=layer.init)
    spec["name"] = layer.name
    return spec


def model_section(model: Sequential) -> dict[str, Any]:
    """The `model` config section describing `model` (layers, frozen layers, what
    load_weights() loaded), so that a saved config rebuilds it."""
    return {
        "input_shape": list(model.input_shape) if model.built else None,
        "layers": [layer_spec(layer) for layer in model.layers],
        "init_from": model.init_from, "init_skip": list(model.init_skip),
        "freeze": [layer.name for layer in model.layers if not layer.trainable],
    }


def build_model(cfg: dict[str, Any], backend: Backend, input_shape: tuple[int, ...],
                source: str = "config", model: Sequential | None = None, load_init: bool = True) -> Sequential:
    """Build the configured layers for `input_shape` (without the batch axis), apply
    model.freeze, and load model.init_from into freshly initialised weights (unless not
    `load_init`: a resume restores a checkpoint's weights, and the source may be gone since).

    `model` (the Python API's) is used instead of new layers made from cfg; the weights it
    already has are kept (carried over when it is rebuilt for another backend or dtype)."""
    m = cfg["model"]
    if model is None:
        layers = []
        for i, spec in enumerate(m["layers"]):
            try:
                layers.append(make_layer(spec))
            except ShapeError as exc:
                raise ConfigError(blame(source, f"model.layers.{i}", str(exc))) from None
        try:
            model = Sequential(layers)
        except ShapeError as exc:  # a layer name used twice
            raise ConfigError(blame(source, f"model.layers.{exc.layer_index}.name", str(exc))) from None  # type: ignore[attr-defined]
    state = model.state_dict() if model.built else None
    if model.backend is not backend or model.input_shape != tuple(input_shape):
        try:
            model.build(tuple(input_shape), backend, seed=cfg["seed"])
            if state is not None:
                model.load_state_dict(state, source="the model's weights")
        except ShapeError as exc:
            idx = getattr(exc, "layer_index", None)
            where = f"model.layers.{idx}" if idx is not None else "model.layers"
            raise ConfigError(blame(source, where, str(exc))) from None
    _freeze(model, m["freeze"], source)
    if m["init_skip"] and m["init_from"] is None:
        raise ConfigError(blame(source, "model.init_skip", "is only read with model.init_from"))
    if state is None and load_init and m["init_from"] is not None:
        from gpuml.weights import read_weights

        try:
            model.load_matching(read_weights(Path(m["init_from"]).expanduser()), m["init_skip"],
                                source=m["init_from"])
        except GpumlError as exc:
            raise ConfigError(blame(source, "model.init_from", str(exc))) from None
    model.init_from, model.init_skip = m["init_from"], list(m["init_skip"])
    return model


def _freeze(model: Sequential, names: list[str], source: str) -> None:
    known = model.layer_names()
    for name in names:
        if name not in known:
            raise ConfigError(blame(source, "model.freeze", f"unknown layer {name!r}; the model's "
                                    f"layers are {', '.join(known)}"))
    for layer in model.layers:
        layer.trainable = layer.name not in names
    model.update_grad_flags()


def build_loss(cfg: dict[str, Any], backend: Backend, source: str = "config") -> Loss:
    try:
        return make_loss(cfg["loss"]["name"], backend, cfg["loss"]["label_smoothing"])
    except ShapeError as exc:
        raise ConfigError(blame(source, "loss", str(exc))) from None


def build_optimizer(cfg: dict[str, Any], backend: Backend, model: Sequential) -> Optimizer:
    o = cfg["optimizer"]
    # Frozen layers' parameters are left out, so every backend's fused update skips them.
    params = [p for _, p, _ in model.trainable_parameters()]
    grads = [g for _, _, g in model.trainable_parameters()]
    frozen = [layer.name for layer in model.layers if layer.params and not layer.trainable]
    if not params and frozen:
        raise ConfigError(f"model.freeze: every layer with parameters is frozen ({', '.join(frozen)}); "
                          "nothing would train")
    name = o["name"]
    wd = o["weight_decay"]
    if name == "sgd":
        return OPTIMIZERS["sgd"](backend, params, grads, weight_decay=wd)
    if name in ("momentum", "nesterov"):
        return OPTIMIZERS["momentum"](backend, params, grads, weight_decay=wd,
                                      momentum=o["momentum"], nesterov=name == "nesterov")
    if name in ("adam", "adamw"):
        return OPTIMIZERS[name](backend, params, grads, weight_decay=wd, beta1=o["beta1"],
                                beta2=o["beta2"], eps=o["eps"])
    if name == "rmsprop":
        return OPTIMIZERS["rmsprop"](backend, params, grads, weight_decay=wd, alpha=o["alpha"],
                                     eps=o["eps"])
    raise ConfigError(f"unknown optimizer {name!r}")


def build_schedule(cfg: dict[str, Any], steps_per_epoch: int) -> Schedule:
    s = cfg["schedule"]
    epochs = cfg["trainer"]["epochs"]
    return Schedule(
        name=s["name"], base_lr=cfg["optimizer"]["lr"], steps_per_epoch=steps_per_epoch,
        total_steps=steps_per_epoch * epochs, step_size=s["step_size"],
        milestones=list(s["milestones"]), gamma=s["gamma"], min_lr=s["min_lr"],
        max_lr=s["max_lr"], pct_start=s["pct_start"], div_factor=s["div_factor"],
        final_div_factor=s["final_div_factor"],
        warmup_steps=int(math.ceil(s["warmup_epochs"] * steps_per_epoch)),
        warmup_start=s["warmup_start"],
    )


def check_model_fits_data(model: Sequential, data_shape: tuple[int, ...], num_classes: int,
                          source: str = "config") -> None:
    """Before anything is trained or written: the model's input is the data's sample shape and
    its output has a unit for every class (a narrower head would only fail at the first label
    past it, possibly an epoch later)."""
    if tuple(model.input_shape) != tuple(data_shape):
        raise ConfigError(blame(source, "model.input_shape",
                                f"{list(model.input_shape)} does not match the data's samples "
                                f"{list(data_shape)}; remove it to use the data's shape"))
    out = model.output_shape
    last = model.layers[-1].name if model.layers else "the model"
    if len(out) != 1:
        raise ShapeError(f"{source}: the model's output {tuple(out)} (after layer {last}) must be flat "
                         f"(one score per class); add a flatten and a dense layer")
    if out[0] < num_classes:
        key = f"model.layers.{len(model.layers) - 1}" + (".units" if isinstance(model.layers[-1], L.Dense) else "")
        raise ConfigError(blame(source, key, f"layer {last} has {out[0]} outputs but the data has {num_classes} "
                                f"classes (labels 0..{num_classes - 1}); give it {num_classes} units"))
