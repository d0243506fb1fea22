"""Optimizers: hold per-parameter state as backend arrays and call one fused backend update
for all parameters per step. The learning rate comes from the schedule each step. They see only
the parameters they train: frozen layers' are never passed in (gpuml.train.build)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuml.backend.base import Array, Backend
from gpuml.errors import GpumlError


class Optimizer:
    name = "optimizer"
    #: names of per-parameter state tensors, in checkpoint order
    state_names: tuple[str, ...] = ()

    def __init__(self, backend: Backend, params: list[Array], grads: list[Array],
                 weight_decay: float = 0.0) -> None:
        self.backend = backend
        self.params = params
        self.grads = grads
        self.weight_decay = weight_decay
        self.step_count = 0
        self.state: dict[str, list[Array]] = {
            s: [backend.zeros(p.shape) for p in params] for s in self.state_names
        }

    def step(self, lr: float, grad_scale: Array | None = None) -> None:
        """One update; `grad_scale` (0-d device array, e.g. Backend.grad_clip_factor's factor)
        multiplies the gradients inside the update kernel."""
        self.step_count += 1
        self._update(lr, grad_scale)

    def _update(self, lr: float, grad_scale: Array | None) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step_count": self.step_count}
        for s, arrays in self.state.items():
            for i, a in enumerate(arrays):
                out[f"{s}.{i}"] = self.backend.to_numpy(a)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step count and state tensors, which must be one per trained parameter
        (frozen ones have none) with the same shapes; checked before anything changes."""
        for s, arrays in self.state.items():
            saved = sum(1 for k in state if k.startswith(f"{s}.") and k[len(s) + 1:].isdigit())
            if saved != len(arrays):
                raise GpumlError(f"optimizer state: the checkpoint has {saved} {s!r} tensors, the model "
                                 f"trains {len(arrays)} parameters (did model.freeze or the layers change?)")
            for i, a in enumerate(arrays):
                got = tuple(np.shape(state[f"{s}.{i}"]))
                if got != tuple(a.shape):
                    raise GpumlError(f"optimizer state: {s}.{i} has shape {got} in the checkpoint, "
                                     f"the parameter has {tuple(a.shape)}")
        self.step_count = int(state["step_count"])
        for s, arrays in self.state.items():
            for i, a in enumerate(arrays):
                self.backend.copy_(a, self.backend.asarray(np.asarray(state[f"{s}.{i}"], dtype=self.backend.dtype)))


class SGD(Optimizer):
    name = "sgd"

    def _update(self, lr: float, grad_scale: Array | None) -> None:
        self.backend.sgd_step(self.params, self.grads, lr=lr, weight_decay=self.weight_decay, grad_scale=grad_scale)


class Momentum(Optimizer):
    name = "momentum"
    state_names = ("velocity",)

    def __init__(self, backend: Backend, params: list[Array], grads: list[Array],
                 weight_decay: float = 0.0, momentum: float = 0.9, nesterov: bool = False) -> None:
        super().__init__(backend, params, grads, weight_decay)
        self.momentum = momentum
        self.nesterov = nesterov

    def _update(self, lr: float, grad_scale: Array | None) -> None:
        self.backend.momentum_step(self.params, self.grads, self.state["velocity"], lr=lr,
                                   momentum=self.momentum, nesterov=self.nesterov,
                                   weight_decay=self.weight_decay, grad_scale=grad_scale)


class Adam(Optimizer):
    name = "adam"
    state_names = ("m", "v")
    decoupled = False

    def __init__(self, backend: Backend, params: list[Array], grads: list[Array],
                 weight_decay: float = 0.0, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        super().__init__(backend, params, grads, weight_decay)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    def _update(self, lr: float, grad_scale: Array | None) -> None:
        self.backend.adam_step(self.params, self.grads, self.state["m"], self.state["v"], lr=lr,
                               beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                               step=self.step_count, weight_decay=self.weight_decay,
                               decoupled=self.decoupled, grad_scale=grad_scale)


class AdamW(Adam):
    name = "adamw"
    decoupled = True


class RMSprop(Optimizer):
    name = "rmsprop"
    state_names = ("square_avg",)

    def __init__(self, backend: Backend, params: list[Array], grads: list[Array],
                 weight_decay: float = 0.0, alpha: float = 0.99, eps: float = 1e-8) -> None:
        super().__init__(backend, params, grads, weight_decay)
        self.alpha, self.eps = alpha, eps

    def _update(self, lr: float, grad_scale: Array | None) -> None:
        self.backend.rmsprop_step(self.params, self.grads, self.state["square_avg"], lr=lr,
                                  alpha=self.alpha, eps=self.eps, weight_decay=self.weight_decay,
                                  grad_scale=grad_scale)


OPTIMIZERS: dict[str, type[Optimizer]] = {
    c.name: c for c in (SGD, Momentum, Adam, AdamW, RMSprop)
}
