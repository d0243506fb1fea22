"""The training and evaluation steps, written once for eager runs and CUDA-graph capture.

A step reads nothing per step from the host: its batch cursor, RNG offset and schedule row are
device counters (`counters`, bumped by `Backend.advance_` as the step's last launch), the epoch's
permutation sits in one device buffer (BatchIterator), and the optimizer's learning rate and
bias corrections come from a device table filled once per epoch (StepRunner.set_hyper_rows).
The backend's StepRunner decides how a step runs: the CPU's calls it, the CUDA one captures it
per batch shape after a warm-up run and replays the graph (gpuml/backend/cuda/graph.py).
Host bookkeeping (step counts, metrics) stays outside the step function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gpuml import distributed
from gpuml.backend.augment import UNIFORMS_PER_SAMPLE
from gpuml.backend.base import Array, StepRunner
from gpuml.data.loader import BatchIterator
from gpuml.distributed.shard import shard_bounds
from gpuml.errors import ConfigError
from gpuml.nn.buffers import Buffers
from gpuml.nn.losses import Loss
from gpuml.nn.model import Sequential
from gpuml.train.config import blame

if TYPE_CHECKING:
    from gpuml.train.trainer import Trainer

# Slots of the training step's counters (int64): RNG offset (step << 32, dropout and
# augmentation), first row of the batch in the epoch's permutation, row of the hyper table.
RNG, START, ROW = 0, 1, 2


def graph_mode(cfg: dict[str, Any], backend_name: str, source: Any) -> str:
    """trainer.cuda_graph as "on" / "off" / "auto" (YAML reads on/off as booleans); `on` with a
    backend other than CUDA is a ConfigError naming the key."""
    mode = cfg["trainer"].get("cuda_graph", "auto")
    mode = {True: "on", False: "off"}.get(mode, mode)
    if mode == "on" and backend_name != "cuda":
        raise ConfigError(blame(source, "trainer.cuda_graph", f"on needs the CUDA backend; this run is on "
                                f"{backend_name} (device: {cfg['device']}); use auto or off"))
    return mode


class TrainStep:
    def __init__(self, trainer: Trainer, mode: str) -> None:
        self.t = trainer
        be = trainer.backend
        self.runner: StepRunner = be.step_runner(mode, warn=trainer.log)
        self.counters = be.zeros((3,), np.int64)
        self.increments = be.asarray(np.array([1 << 32, trainer.train_iter.batch_size, 1], dtype=np.int64))

    def begin_epoch(self) -> list[int]:
        """The (global) batch sizes left in the epoch, starting the next one when the current is
        complete; the counters are set for its next batch and the schedule tabulated."""
        t, be = self.t, self.t.backend
        sizes = t.train_iter.batch_sizes()
        first = t.global_step
        be.upload_(self.counters, np.array([first << 32, t.train_iter.cursor * t.train_iter.batch_size, 0]))
        opt, count = t.optimizer, t.optimizer.step_count

        def record(i: int) -> None:
            opt.step_count = count + i
            opt.step(t.schedule.lr(first + i))

        try:
            self.runner.set_hyper_rows(record, len(sizes), self.counters[ROW:ROW + 1])
        finally:
            opt.step_count = count
        return sizes

    def run(self, rows: int, lr: float) -> None:
        """One training step on the next batch of `rows` (the global batch), run, captured or
        replayed by the runner; the caller counts it (train_iter.advance, global_step)."""
        lo, hi = shard_bounds(rows, *self.t.train_iter.shard)
        count = self.t.optimizer.step_count
        self.runner.run(("train", rows), lambda: self._step(rows, lo, hi, lr))
        self.t.optimizer.step_count = count + 1  # a replay does not run optimizer.step

    def _step(self, rows: int, lo: int, hi: int, lr: float) -> None:
        t, be = self.t, self.t.backend
        it = t.train_iter
        it.batch_rows, it.shard_start = rows, lo  # read by the gradient hook of data parallelism
        rng = self.counters[RNG:RNG + 1]
        x, y = it.gather_at(self.counters[START:START + 1], hi - lo, start=lo)
        if t.dist.size > 1:  # dropout keyed by each sample's index in the global batch
            distributed.offset_dropout(t.model, lo)
        if t.augment:
            x = self._augmented(x, rng, lo)
        out = t.model.forward_buffered(x, training=True, step=rng)
        loss, dout = t.loss_fn(out, y, accumulate=t._acc)  # + batch * loss, + correct: fused
        t.model.backward(dout)
        for hook in t.grad_hooks:  # e.g. the data-parallel gradient all-reduce
            hook()
        clip = t.cfg["trainer"]["grad_clip_norm"]
        scale = None if clip is None else be.grad_clip_factor(t.grads, clip)[1]  # applied in the update
        t.optimizer.step(lr, grad_scale=scale)
        be.advance_(self.counters, self.increments)

    def _augmented(self, x: Array, rng: Array, lo: int) -> Array:
        """The batch under a random affine transform keyed by (run seed, step, sample index in
        the global batch)."""
        t, a = self.t, self.t.augment
        return t.backend.augment_images(
            x, seed=t._augment_seed, offset=UNIFORMS_PER_SAMPLE * lo, offset_counter=rng,
            max_shift=a["shift"], max_rotate=a["rotate"], max_scale=a["scale"], hflip=a["hflip"],
            fill=t._augment_fill, out=t._buffers.get("augmented", x.shape))


def evaluate_sums(model: Sequential, loss_fn: Loss, it: BatchIterator, buffers: Buffers,
                  runner: StepRunner | None = None) -> tuple[float, float, int]:
    """(loss * samples, correct, samples) of `model` over every batch of `it` in eval mode,
    accumulated on the device and read back once (sums add up over data-parallel ranks). With a
    `runner`, each batch is a step it may capture (the cursor is a device counter)."""
    be = buffers.backend
    runner = runner or StepRunner()
    counter, step = buffers.get("eval_cursor", (1,), np.int64), buffers.get("eval_step", (1,), np.int64)
    acc = buffers.get("eval_acc", (2,))
    be.fill_(acc, 0.0)
    be.upload_(counter, np.zeros(1, dtype=np.int64))
    be.upload_(step, np.array([it.batch_size], dtype=np.int64))

    def batch(size: int) -> None:
        x, y = it.gather_at(counter, size)
        out = model.forward_buffered(x, training=False)
        loss_fn(out, y, accumulate=acc)
        be.advance_(counter, step)

    for size in it.batch_sizes(rest_of_epoch=False):
        runner.run(("eval", id(it), size), lambda size=size: batch(size))
    loss_sum, n_correct = (float(v) for v in be.to_numpy(acc))
    return loss_sum, n_correct, it.num_samples
