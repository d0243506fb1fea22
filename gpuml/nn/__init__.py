"""Layers, models and losses. Device work goes through the Backend only."""

from gpuml.nn.layers import (
    Activation,
    AvgPool2D,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    Layer,
    MaxPool2D,
)
from gpuml.nn.losses import MSE, Loss, SoftmaxCrossEntropy, make_loss
from gpuml.nn.model import Sequential

__all__ = [
    "Activation", "AvgPool2D", "Conv2D", "Dense", "Dropout", "Flatten", "Layer", "Loss",
    "MSE", "MaxPool2D", "Sequential", "SoftmaxCrossEntropy", "make_loss",
]
