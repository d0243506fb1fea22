"""Learning-rate schedules as pure functions of the global step, so a resumed run needs no
schedule state beyond the step counter (which the checkpoint holds).

`epoch` below is the fractional-free epoch index step // steps_per_epoch; step-wise schedules
(cosine, one-cycle, warm-up) use the step itself. Formulas follow PyTorch's schedulers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Schedule:
    """lr(step) for a base lr. `name` is constant | step | multistep | exponential | cosine |
    onecycle; `warmup_steps` (or epochs, converted by the trainer) ramps linearly from
    lr * warmup_start to the scheduled value."""

    name: str = "constant"
    base_lr: float = 1e-3
    steps_per_epoch: int = 1
    total_steps: int = 1
    step_size: int = 1              # step: epochs between decays
    milestones: list[int] = field(default_factory=list)  # multistep: epochs
    gamma: float = 0.1              # step, multistep, exponential (per epoch)
    min_lr: float = 0.0             # cosine
    max_lr: float | None = None     # onecycle (default base_lr)
    pct_start: float = 0.3          # onecycle
    div_factor: float = 25.0        # onecycle: initial lr = max_lr / div_factor
    final_div_factor: float = 1e4   # onecycle: final lr = initial / final_div_factor
    warmup_steps: int = 0
    warmup_start: float = 0.0

    def lr(self, step: int) -> float:
        """The learning rate for 0-based global step `step`."""
        epoch = step // max(1, self.steps_per_epoch)
        n = self.name
        if n == "constant":
            lr = self.base_lr
        elif n == "step":
            lr = self.base_lr * self.gamma ** (epoch // self.step_size)
        elif n == "multistep":
            lr = self.base_lr * self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        elif n == "exponential":
            lr = self.base_lr * self.gamma**epoch
        elif n == "cosine":
            t = min(step, self.total_steps) / max(1, self.total_steps)
            lr = self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t))
        elif n == "onecycle":
            lr = self._onecycle(step)
        else:
            raise ValueError(f"unknown schedule {n!r}")
        if step < self.warmup_steps:
            frac = (step + 1) / self.warmup_steps
            lr *= self.warmup_start + (1.0 - self.warmup_start) * frac
        return lr

    def _onecycle(self, step: int) -> float:
        # PyTorch OneCycleLR, anneal_strategy='cos', three_phase=False.
        max_lr = self.max_lr if self.max_lr is not None else self.base_lr
        initial = max_lr / self.div_factor
        final = initial / self.final_div_factor
        up_end = float(self.pct_start * self.total_steps) - 1
        down_end = float(self.total_steps) - 1

        def cos_anneal(start: float, end: float, pct: float) -> float:
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)

        if step <= up_end:
            return cos_anneal(initial, max_lr, step / up_end if up_end > 0 else 1.0)
        span = down_end - up_end
        return cos_anneal(max_lr, final, min(1.0, (step - up_end) / span) if span > 0 else 1.0)


SCHEDULES = ("constant", "step", "multistep", "exponential", "cosine", "onecycle")
