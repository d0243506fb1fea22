"""Each LR schedule against its formula (and, where installed, PyTorch's scheduler)."""

from __future__ import annotations

import math

import pytest

from gpuml.optim.schedules import Schedule

SPE = 10  # steps per epoch


def lrs(s: Schedule, n: int) -> list[float]:
    return [s.lr(i) for i in range(n)]


def test_constant() -> None:
    assert lrs(Schedule("constant", base_lr=0.1, steps_per_epoch=SPE), 30) == [0.1] * 30


def test_step_decays_every_step_size_epochs() -> None:
    s = Schedule("step", base_lr=1.0, steps_per_epoch=SPE, step_size=2, gamma=0.5)
    assert [s.lr(e * SPE) for e in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert s.lr(2 * SPE - 1) == 1.0  # within an epoch the lr does not move


def test_multistep() -> None:
    s = Schedule("multistep", base_lr=1.0, steps_per_epoch=SPE, milestones=[1, 3], gamma=0.1)
    assert [s.lr(e * SPE) for e in range(5)] == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])


def test_exponential() -> None:
    s = Schedule("exponential", base_lr=2.0, steps_per_epoch=SPE, gamma=0.9)
    assert [s.lr(e * SPE + 3) for e in range(4)] == pytest.approx([2.0 * 0.9**e for e in range(4)])


def test_cosine_endpoints_and_midpoint() -> None:
    s = Schedule("cosine", base_lr=1.0, min_lr=0.1, steps_per_epoch=SPE, total_steps=100)
    assert s.lr(0) == pytest.approx(1.0)
    assert s.lr(50) == pytest.approx(0.55)
    assert s.lr(25) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert s.lr(100) == pytest.approx(0.1)


def test_linear_warmup_then_schedule() -> None:
    s = Schedule("constant", base_lr=1.0, steps_per_epoch=SPE, warmup_steps=4)
    assert lrs(s, 6) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    s = Schedule("constant", base_lr=1.0, steps_per_epoch=SPE, warmup_steps=2, warmup_start=0.5)
    assert lrs(s, 3) == pytest.approx([0.75, 1.0, 1.0])


def test_onecycle_shape() -> None:
    s = Schedule("onecycle", base_lr=1.0, max_lr=1.0, steps_per_epoch=SPE, total_steps=100,
                 pct_start=0.3, div_factor=25, final_div_factor=1e4)
    v = lrs(s, 100)
    assert v[0] == pytest.approx(1.0 / 25)
    assert max(v) == pytest.approx(1.0) and v.index(max(v)) == 29
    assert v[-1] == pytest.approx(1.0 / 25 / 1e4)
    assert all(a <= b for a, b in zip(v[:30], v[1:30])) and all(a >= b for a, b in zip(v[29:], v[30:]))


@pytest.mark.parametrize("kind", ["step", "multistep", "exponential", "cosine", "onecycle"])
def test_matches_pytorch(kind: str) -> None:
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    total = 60
    if kind == "step":
        ours = Schedule(kind, base_lr=0.5, steps_per_epoch=1, step_size=7, gamma=0.3)
        ref = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.3)
    elif kind == "multistep":
        ours = Schedule(kind, base_lr=0.5, steps_per_epoch=1, milestones=[5, 20], gamma=0.2)
        ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[5, 20], gamma=0.2)
    elif kind == "exponential":
        ours = Schedule(kind, base_lr=0.5, steps_per_epoch=1, gamma=0.95)
        ref = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
    elif kind == "cosine":
        ours = Schedule(kind, base_lr=0.5, steps_per_epoch=1, total_steps=total, min_lr=0.01)
        ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.01)
    else:
        ours = Schedule(kind, base_lr=0.5, max_lr=0.5, steps_per_epoch=1, total_steps=total)
        ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=total)
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert lrs(ours, total) == pytest.approx(theirs, rel=1e-9)
