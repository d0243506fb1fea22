"""Turn a resolved config into a model, loss, optimizer and schedule. Layer build errors become
config errors naming the file, the layer's position and both shapes."""

from __future__ import annotations

import math
from typing import Any

from gpuml.backend.base import Backend
from gpuml.errors import ConfigError, ShapeError
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


def build_model(cfg: dict[str, Any], backend: Backend, input_shape: tuple[int, ...],
                source: str = "config") -> Sequential:
    """Build the configured layers for `input_shape` (without the batch axis)."""
    layers = []
    for i, spec in enumerate(cfg["model"]["layers"]):
        try:
            layers.append(make_layer(spec))
        except ShapeError as exc:
            raise ConfigError(blame(source, f"model.layers.{i}", str(exc))) from None
    model = Sequential(layers)
    try:
        model.build(tuple(input_shape), backend, seed=cfg["seed"])
    except ShapeError as exc:
        idx = getattr(exc, "layer_index", None)
        where = f"model.layers.{idx}" if idx is not None else "model.layers"
        raise ConfigError(blame(source, where, str(exc))) from None
    return model


def build_loss(cfg: dict[str, Any], backend: Backend, source: str = "config") -> Loss:
    try:
        return make_loss(cfg["loss"]["name"], backend, cfg["loss"]["label_smoothing"])
    except ShapeError as exc:
        raise ConfigError(blame(source, "loss", str(exc))) from None


def build_optimizer(cfg: dict[str, Any], backend: Backend, model: Sequential) -> Optimizer:
    o = cfg["optimizer"]
    params = [p for _, p, _ in model.named_parameters()]
    grads = [g for _, _, g in model.named_parameters()]
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
