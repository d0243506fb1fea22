"""Optimizers (fused single-launch updates through the backend) and LR schedules."""

from gpuml.optim.optimizers import OPTIMIZERS, SGD, Adam, AdamW, Momentum, Optimizer, RMSprop
from gpuml.optim.schedules import SCHEDULES, Schedule

__all__ = ["OPTIMIZERS", "SCHEDULES", "SGD", "Adam", "AdamW", "Momentum", "Optimizer", "RMSprop", "Schedule"]
