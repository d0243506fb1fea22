"""Losses: each computes the mean loss (a 0-d device array, never read back here) and the
gradient with respect to the model output in one call."""

from __future__ import annotations

from gpuml.backend.base import Array, Backend
from gpuml.errors import ShapeError
from gpuml.nn.buffers import Buffers


class Loss:
    name = "loss"

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._buf = Buffers(backend).get

    def __call__(self, outputs: Array, labels: Array, accumulate: Array | None = None) -> tuple[Array, Array]:
        """(loss, doutputs). `accumulate` (2,): also add batch * loss and the number of rows
        whose argmax is the label to accumulate[0], accumulate[1] (the trainer's metric sums)."""
        raise NotImplementedError

    def _accumulate(self, acc: Array, outputs: Array, labels: Array, loss: Array) -> None:
        """The metric sums of __call__ by separate ops, for losses without a fused form."""
        be = self.backend
        be.add_(acc[0:1], loss.reshape(1), alpha=float(outputs.shape[0]))  # a NaN loss stays NaN
        be.add_(acc[1:2], be.count_correct(outputs, labels, out=self._buf("correct", ())).reshape(1))


class SoftmaxCrossEntropy(Loss):
    """Fused softmax + cross-entropy on integer labels, with optional label smoothing."""

    name = "softmax_cross_entropy"

    def __init__(self, backend: Backend, label_smoothing: float = 0.0) -> None:
        super().__init__(backend)
        if not 0.0 <= label_smoothing < 1.0:
            raise ShapeError(f"loss: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def __call__(self, outputs: Array, labels: Array, accumulate: Array | None = None) -> tuple[Array, Array]:
        if outputs.ndim != 2:
            raise ShapeError(
                f"loss {self.name}: expects logits (batch, classes), got {tuple(outputs.shape)}; "
                "end the model with a dense layer"
            )
        return self.backend.softmax_xent(
            outputs, labels, label_smoothing=self.label_smoothing,
            loss=self._buf("loss", ()), dlogits=self._buf("dlogits", outputs.shape), accumulate=accumulate,
        )


class MSE(Loss):
    """Mean squared error against one-hot targets (integer labels) or a float target array."""

    name = "mse"

    def __call__(self, outputs: Array, labels: Array, accumulate: Array | None = None) -> tuple[Array, Array]:
        target = labels
        if labels.ndim == 1:
            if outputs.ndim != 2:
                raise ShapeError(f"loss mse: integer labels need outputs (batch, classes), got {tuple(outputs.shape)}")
            target = self.backend.one_hot(labels, outputs.shape[1], out=self._buf("target", outputs.shape))
        if tuple(target.shape) != tuple(outputs.shape):
            raise ShapeError(f"loss mse: outputs {tuple(outputs.shape)} and targets {tuple(target.shape)} differ")
        loss, dpred = self.backend.mse(outputs, target, loss=self._buf("loss", ()),
                                       dpred=self._buf("dpred", outputs.shape))
        if accumulate is not None:
            self._accumulate(accumulate, outputs, labels, loss)
        return loss, dpred


LOSSES = {"softmax_cross_entropy": SoftmaxCrossEntropy, "mse": MSE}


def make_loss(name: str, backend: Backend, label_smoothing: float = 0.0) -> Loss:
    if name == "softmax_cross_entropy":
        return SoftmaxCrossEntropy(backend, label_smoothing)
    if name == "mse":
        if label_smoothing:
            raise ShapeError("loss: label_smoothing applies to softmax_cross_entropy only")
        return MSE(backend)
    raise ShapeError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
