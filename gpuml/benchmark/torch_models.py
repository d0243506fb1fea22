"""PyTorch twins of gpuml models: the same layers, the same initial weights, the same optimizer.

`torch_twin(model)` walks a built gpuml Sequential (so `padding: same`, default strides and
inferred shapes are already resolved) and returns a torch.nn.Sequential whose parameters are
copies of gpuml's initial weights. Layouts: a gpuml Dense W is (in, out), a torch Linear weight
(out, in), so it is transposed; conv weights are (out, in, kh, kw) in both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpuml.benchmark.hardware import core_count
from gpuml.errors import GpumlError
from gpuml.nn import layers as L
from gpuml.nn.model import Sequential


def import_torch(device: str) -> Any:
    """PyTorch set up as an anchor on `device`, or None when it is missing (or has no CUDA for
    device "cuda"). TF32 is turned off so PyTorch computes in full FP32 like our kernels; its CPU
    threads are set to the core count, as numba's and the BLAS's are by default."""
    try:
        import torch
    except Exception:  # not installed, or broken: the comparison is optional
        return None
    if device == "cuda" and not torch.cuda.is_available():
        return None
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # Shapes are fixed within a benchmark, so let cuDNN time its algorithms once (during warm-up)
    # and keep the fastest: PyTorch's best setting, and the one fixed-shape training uses.
    torch.backends.cudnn.benchmark = True
    torch.set_num_threads(core_count())
    return torch


def _activation(torch: Any, kind: str | None) -> list[Any]:
    if kind is None:
        return []
    return [{"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}[kind]()]


def torch_twin(model: Sequential, device: str) -> Any:
    """A torch.nn.Sequential computing what `model` computes, starting from its weights."""
    import torch

    nn = torch.nn
    modules: list[Any] = []
    state = model.state_dict()
    for layer in model.layers:
        if isinstance(layer, L.Dense):
            lin = nn.Linear(layer.input_shape[0], layer.units, bias=layer.use_bias)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(state[f"{layer.name}.W"].T)))
                if layer.use_bias:
                    lin.bias.copy_(torch.from_numpy(state[f"{layer.name}.b"]))
            modules += [lin, *_activation(torch, layer.activation)]
        elif isinstance(layer, L.Conv2D):
            conv = nn.Conv2d(layer.input_shape[0], layer.filters, layer.kernel, stride=layer.stride,
                             padding=layer.padding, bias=layer.use_bias)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(state[f"{layer.name}.W"]))
                if layer.use_bias:
                    conv.bias.copy_(torch.from_numpy(state[f"{layer.name}.b"]))
            modules += [conv, *_activation(torch, layer.activation)]
        elif isinstance(layer, L.MaxPool2D):
            modules.append(nn.MaxPool2d(layer.size, layer.stride, layer.padding))
        elif isinstance(layer, L.AvgPool2D):
            modules.append(nn.AvgPool2d(layer.size, layer.stride, layer.padding, count_include_pad=True))
        elif isinstance(layer, L.Flatten):
            modules.append(nn.Flatten())
        elif isinstance(layer, L.Activation):
            modules += _activation(torch, layer.activation)
        elif isinstance(layer, L.Dropout):
            modules.append(nn.Dropout(layer.rate))  # same rate; the masks are torch's own
        else:
            raise GpumlError(f"bench train: no PyTorch equivalent for layer {layer.name} ({layer.kind})")
    return nn.Sequential(*modules).to(device)


def torch_optimizer(cfg: dict[str, Any], params: Any, device: str, *, capturable: bool = False) -> Any:
    """Adam/AdamW with the config's lr, betas, eps and weight decay. fused=True (one kernel per
    step on CUDA, a vectorised loop on CPU) is the fastest PyTorch implementation on both."""
    import torch

    o = cfg["optimizer"]
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if o["name"] not in kinds:
        raise GpumlError(f"bench train: the PyTorch comparison supports adam and adamw, not {o['name']!r}")
    extra = {"capturable": True} if capturable else {}
    return kinds[o["name"]](params, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
                            weight_decay=o["weight_decay"], fused=True, **extra)


def check_supported(cfg: dict[str, Any]) -> None:
    """Raise when the run's settings have no faithful PyTorch counterpart here."""
    if cfg["schedule"]["name"] != "constant":
        raise GpumlError("bench train: the PyTorch comparison uses a constant learning rate; "
                         f"this config has schedule {cfg['schedule']['name']!r}")
    if cfg["loss"]["name"] != "softmax_cross_entropy":
        raise GpumlError("bench train: the PyTorch comparison supports softmax_cross_entropy only")
    if cfg["trainer"]["grad_clip_norm"] is not None:
        raise GpumlError("bench train: the PyTorch comparison does not clip gradients")
    if any(cfg["data"]["augment"][k] for k in ("shift", "rotate", "scale", "hflip")):
        raise GpumlError("bench train: the PyTorch comparison does not augment")
