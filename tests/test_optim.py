"""Optimizers through the backend against their formulas' reference implementation in PyTorch
(when installed: same conventions for weight decay, Nesterov, bias correction), and gradient
clipping by global norm."""

from __future__ import annotations

import numpy as np
import pytest

from gpuml.backend.cpu import CpuBackend
from gpuml.optim import OPTIMIZERS

BE = CpuBackend(dtype="float64")

CASES = [
    ("sgd", {"weight_decay": 0.01}, "SGD", {"weight_decay": 0.01}),
    ("momentum", {"momentum": 0.9, "weight_decay": 0.01}, "SGD", {"momentum": 0.9, "weight_decay": 0.01}),
    ("momentum", {"momentum": 0.8, "nesterov": True}, "SGD", {"momentum": 0.8, "nesterov": True}),
    ("adam", {"weight_decay": 0.01}, "Adam", {"weight_decay": 0.01}),
    ("adamw", {"weight_decay": 0.05, "beta1": 0.8}, "AdamW", {"weight_decay": 0.05, "betas": (0.8, 0.999)}),
    ("rmsprop", {"alpha": 0.9, "eps": 1e-6, "weight_decay": 0.01}, "RMSprop",
     {"alpha": 0.9, "eps": 1e-6, "weight_decay": 0.01}),
]


@pytest.mark.parametrize("ours,kw,theirs,tkw", CASES)
def test_ten_steps_match_pytorch(ours: str, kw: dict, theirs: str, tkw: dict) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shapes = [(5, 3), (3,), (2, 2, 3, 3)]
    init = [rng.standard_normal(s) for s in shapes]
    grads_seq = [[rng.standard_normal(s) for s in shapes] for _ in range(10)]
    params = [BE.asarray(p) for p in init]
    grads = [BE.zeros(s) for s in shapes]
    opt = OPTIMIZERS[ours](BE, params, grads, **kw)
    tparams = [torch.nn.Parameter(torch.tensor(p)) for p in init]
    topt = getattr(torch.optim, theirs)(tparams, lr=0.05, **tkw)
    for step_grads in grads_seq:
        for g, new in zip(grads, step_grads):
            g[...] = new
        opt.step(0.05)
        for tp, new in zip(tparams, step_grads):
            tp.grad = torch.tensor(new)
        topt.step()
    for p, tp in zip(params, tparams):
        assert np.allclose(p, tp.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip() -> None:
    params = [BE.asarray(np.ones(4))]
    grads = [BE.asarray(np.full(4, 0.5))]
    opt = OPTIMIZERS["adam"](BE, params, grads)
    opt.step(0.1)
    state = opt.state_dict()
    other = OPTIMIZERS["adam"](BE, [BE.asarray(np.ones(4))], [BE.asarray(np.full(4, 0.5))])
    other.load_state_dict(state)
    assert other.step_count == 1 and np.array_equal(other.state["m"][0], opt.state["m"][0])
    assert np.array_equal(other.state["v"][0], opt.state["v"][0])


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_global_norm(max_norm: float) -> None:
    rng = np.random.default_rng(1)
    gs = [rng.standard_normal((4, 3)), rng.standard_normal(7)]
    total = np.sqrt(sum((g**2).sum() for g in gs))
    arrays = [BE.asarray(g) for g in gs]
    norm = BE.clip_grad_norm_(arrays, max_norm)
    assert float(norm) == pytest.approx(total, rel=1e-12)
    factor = min(1.0, max_norm / (total + 1e-6))
    for a, g in zip(arrays, gs):
        assert np.allclose(a, g * factor, rtol=1e-12)
    if max_norm < total:
        assert np.sqrt(sum((a**2).sum() for a in arrays)) == pytest.approx(max_norm, rel=1e-5)
