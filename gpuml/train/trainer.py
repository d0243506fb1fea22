"""The training loop: build everything from a resolved config, train with a progress bar,
checkpoint after every epoch, every `trainer.checkpoint_every` steps or minutes and on Ctrl-C /
SIGTERM, resume exactly, stop early, and write the run folder (locked while training).

The step itself (forward, fused loss, backward, one fused optimizer launch) touches only
preallocated buffers; the loss and accuracy are accumulated on the device and read back once
per `trainer.log_every` steps (every step on CPU, where reading is free) to drive the progress
bar and catch a NaN early.
"""

from __future__ import annotations

import json
import math
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gpuml import distributed
from gpuml.backend import get_backend
from gpuml.data.atomic import atomic_write, disk_full_as_error
from gpuml.data.loader import BatchIterator, Dataset, load_dataset_config
from gpuml.errors import ConfigError, DeviceError, Interrupted, TrainingDiverged
from gpuml.nn.buffers import Buffers
from gpuml.nn.losses import Loss
from gpuml.nn.model import Sequential
from gpuml.train import checkpoint as ckpt
from gpuml.train.build import build_loss, build_model, build_optimizer, build_schedule, check_model_fits_data
from gpuml.train.config import blame
from gpuml.train.metrics import MetricsLog, format_epoch, plural
from gpuml.train.monitor import judge_epoch
from gpuml.train.runfiles import write_config, write_run_info
from gpuml.train.runlock import hold_run_lock
from gpuml.train.step import TrainStep, evaluate_sums, graph_mode
from gpuml.train.stopping import StopFlag, StopRequested
from gpuml.train.tensorboard import TensorBoardLogger

__all__ = ["Interrupted", "Trainer", "write_config", "write_run_info"]  # Interrupted: old import path

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _quiet(msg: str) -> None:
    pass


class Trainer:
    def __init__(self, cfg: dict[str, Any], run_dir: Path, *, source: str = "config",
                 log: Log = _stderr, dataset: Dataset | None = None,
                 model: Sequential | None = None, resume: bool = False,
                 allow_world_change: bool = False) -> None:
        """`dataset` replaces the one the config names, `model` the one its layers describe
        (the Python API passes the user's; it must match cfg["model"]). `resume`: find the
        checkpoint resume_latest() restores (the run folder must be locked). Under an MPI
        launcher every rank makes one (gpuml.distributed); `allow_world_change` lets a resume
        use another number of ranks than the checkpoint's."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.source = source
        self.dist = distributed.world()
        if not self.dist.is_root:  # rank 0 speaks for the run; errors still name their rank
            log = _quiet
        self.log = log
        self.backend = get_backend(self.dist.device(cfg["device"]), dtype=cfg["dtype"])
        self.backend.set_precision(cfg["precision"])  # a GPU before sm_80 refuses tf32/bf16 here
        graph = graph_mode(cfg, self.backend.name, source)
        precision = "" if cfg["precision"] == "fp32" else f", precision: {cfg['precision']}"
        self.log(f"gpuml: device {self.backend.describe()} (device: {cfg['device']}{precision}){self.dist.describe()}")
        d = cfg["data"]
        self.data = dataset or self.dist.root_first(lambda: load_dataset_config(d))
        mean, std = (self.data.mean, self.data.std) if d["normalize"] else (0.0, 1.0)
        t = cfg["trainer"]
        self.dist.check_batches(len(self.data.train), t["batch_size"], t["drop_last"], source)
        self.train_iter = BatchIterator(self.backend, self.data.train, t["batch_size"], mean=mean,
                                        std=std, shuffle=True, rng=np.random.default_rng(cfg["seed"]),
                                        drop_last=t["drop_last"], shard=(self.dist.rank, self.dist.size))
        self.eval_iters = {
            name: BatchIterator(self.backend, self.dist.eval_part(split, name), t["eval_batch_size"],
                                mean=mean, std=std)
            for name, split in (("val", self.data.val), ("test", self.data.test))
            if split is not None and len(split)  # fit() without validation data has no test split
        }
        input_shape = tuple(cfg["model"]["input_shape"] or self.data.train.images.shape[1:])
        # The checkpoint holds the weights: model.init_from (perhaps moved since) is not read.
        self._resume_point = self.dist.resume_point(self.run_dir, log) if resume else None
        if self._resume_point is not None:
            distributed.check_resume_ranks(self._resume_point, self.dist.size, allow_world_change)
        if resume and self._resume_point is None:  # said first: it is why init_from is read
            log(f"{self.run_dir}: no checkpoint yet; starting from the beginning")
        self.model = build_model(cfg, self.backend, input_shape, source, model=model,
                                 load_init=self._resume_point is None)
        self.loss_fn = build_loss(cfg, self.backend, source)
        self.optimizer = build_optimizer(cfg, self.backend, self.model)
        self.schedule = build_schedule(cfg, len(self.train_iter))
        self.grads = list(self.optimizer.grads)  # frozen layers' stay out of the clipping norm
        #: run inside the step after backward, before clipping and the optimizer; capturable on
        #: CUDA (the data-parallel gradient all-reduce is one)
        self.grad_hooks: list[Callable[[], None]] = []
        reduce = self.dist.gradient_hook(self.backend, self.grads, self.train_iter)
        if reduce is not None:
            self.grad_hooks.append(reduce)
        aug = cfg["data"]["augment"]
        self.augment = aug if (aug["shift"] or aug["rotate"] or aug["scale"] or aug["hflip"]) else None
        if self.augment and len(input_shape) != 3:
            raise ConfigError(blame(source, "data.augment", "needs image input (channels, height, width), "
                                    f"the model input is {input_shape}"))
        check_model_fits_data(self.model, self.data.train.images.shape[1:], self.data.num_classes, source)
        self._augment_seed = zlib.crc32(f"{cfg['seed']}:augment".encode())
        self._augment_fill = (0.0 - mean) / std  # a black pixel, normalised
        self._buffers = Buffers(self.backend)
        self.metric_names = ["train_loss", "train_accuracy", "lr"]
        if "val" in self.eval_iters:
            self.metric_names[2:2] = ["val_loss", "val_accuracy"]
        self.monitor = self._check_metric(t["monitor"], "trainer.monitor")
        es = t["early_stopping"]
        if es["enabled"]:
            self._check_metric(es["monitor"], "trainer.early_stopping.monitor")
        # Device accumulators: loss sum (weighted by batch size), correct count.
        self._acc = self.backend.zeros((2,))
        self._correct = self.backend.zeros(())
        self.steps = TrainStep(self, graph)  # the step function and what runs it (CUDA graphs)
        # Progress state (restored on resume)
        self.epoch = 0            # completed epochs
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"value": None, "epoch": None}
        self.es_wait = 0
        self.partial = {"loss_sum": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
        #: called with each epoch's metrics row once it is logged and checkpointed (Python callbacks)
        self.epoch_end_hooks: list[Callable[[dict[str, Any]], None]] = []
        self.tensorboard = TensorBoardLogger.from_config(cfg, self.run_dir) if self.dist.is_root else None
        if self.tensorboard is not None:
            self.epoch_end_hooks.append(lambda row: self.tensorboard.on_epoch_end(row, self.global_step))
        self.seconds_before = 0.0  # training time of earlier sessions, up to the checkpoint
        self._session_t0: float | None = None
        self._epoch_t0: float | None = None
        self._last_save_t = 0.0
        self._stop = StopFlag(log)
        # Names in the final log line (the API's fit tests on its validation data, may delete the folder)
        self.test_label, self.run_label = "test", str(self.run_dir)

    # ------------------------------------------------------------------ set-up helpers
    def _check_metric(self, name: str, key: str) -> str:
        if name == "auto":
            return "val_accuracy" if "val_accuracy" in self.metric_names else "train_accuracy"
        if name not in self.metric_names:
            raise ConfigError(blame(self.source, key, f"unknown metric {name!r}; this run logs "
                                    f"{', '.join(self.metric_names)}"))
        return name

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict[str, Any]:
        now = time.perf_counter()
        partial = dict(self.partial)
        if self._epoch_t0 is not None:  # mid-epoch: the epoch's time so far
            partial["seconds"] += now - self._epoch_t0
        return {
            "epoch": self.epoch, "global_step": self.global_step, "config": self.cfg,
            "history": self.history, "best": self.best, "es_wait": self.es_wait,
            "partial": partial, "data": self.train_iter.state_dict(),
            "seconds_total": self.total_seconds(now), "world_size": self.dist.size,
        }

    def total_seconds(self, now: float | None = None) -> float:
        """Training time of this run across every session (resumes add up)."""
        if self._session_t0 is None:
            return self.seconds_before
        return self.seconds_before + (time.perf_counter() if now is None else now) - self._session_t0

    def save_checkpoint(self, best: bool = False) -> Path:
        """The rolling step checkpoint, and best.npz too when `best` (one host copy for both)."""
        folder = self.run_dir / "checkpoints"
        if not self.dist.is_root:  # rank 0 writes; the clock of checkpoint_every.minutes restarts on all
            self._last_save_t = time.perf_counter()
            return ckpt.step_path(folder, self.global_step)
        state = (self.model.state_dict(), self.optimizer.state_dict(), self._meta())
        path = ckpt.save(ckpt.step_path(folder, self.global_step), *state)
        if best:
            ckpt.save(folder / "best.npz", *state)
        ckpt.prune(folder, self.cfg["trainer"]["keep_checkpoints"])
        self._last_save_t = time.perf_counter()
        return path

    def restore(self, path: Path, state: ckpt.State | None = None) -> None:
        model, optim, meta = state or ckpt.load(path)
        self.model.load_state_dict(model, source=str(path))
        self.optimizer.load_state_dict(optim)
        self.epoch, self.global_step = meta["epoch"], meta["global_step"]
        self.history, self.best, self.es_wait = meta["history"], meta["best"], meta["es_wait"]
        self.partial = meta["partial"]
        self.seconds_before = meta.get("seconds_total", 0.0)  # absent in older checkpoints
        self.train_iter.load_state_dict(meta["data"])
        where = f"epoch {self.epoch}" + (f" + {self.train_iter.cursor} batches" if self.partial["seen"] else "")
        self.log(f"resumed from {path} ({where}, step {self.global_step})")

    def resume_latest(self) -> bool:
        """Restore the newest checkpoint that loads, found when this Trainer was made with
        `resume` (damaged newer ones skipped, each said in one line); with none, keep the fresh
        state: the run starts from the beginning and ends as an uninterrupted one would. True
        when a checkpoint was restored."""
        if self._resume_point is None:
            return False
        self.restore(*self._resume_point)
        self._resume_point = None  # its arrays are in the model now
        return True

    def finished_summary(self) -> dict[str, Any] | None:
        """summary.json when the run already reached its end at the restored checkpoint."""
        return ckpt.finished_summary(self.run_dir, self.epoch, self.cfg["trainer"]["epochs"])

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Mean loss and accuracy over a whole split, in eval mode (no dropout)."""
        with self.steps.runner.stream():
            sums = evaluate_sums(self.model, self.loss_fn, self.eval_iters[split], self._buffers, self.steps.runner)
        loss_sum, correct, n = self.dist.sum(sums)
        return {"loss": loss_sum / n, "accuracy": correct / n}

    # ------------------------------------------------------------------ training
    def fit(self, progress: bool | None = None) -> dict[str, Any]:
        """Train to the configured end (or early stop) and write the run's final files; a run
        already finished at the restored checkpoint is reported and left unchanged."""
        done = self.dist.from_root(self.finished_summary)
        if done is not None:
            self.log(f"{self.run_dir}: already finished ({plural(self.epoch, 'epoch')}); nothing to do")
            return done
        # errstate: an overflowing step must be reported by the loss check (TrainingDiverged),
        # not by NumPy warnings printed before it.
        with hold_run_lock(self.run_dir), ckpt.disk_full_keeps_last(self.run_dir), \
                np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                return self._fit(progress)
            finally:  # a later fit() of this trainer (Python API) adds its time to this one's
                self.seconds_before, self._session_t0 = self.total_seconds(), None

    def _fit(self, progress: bool | None) -> dict[str, Any]:
        t = self.cfg["trainer"]
        metrics = MetricsLog(self.run_dir)
        if self.dist.is_root:
            metrics.rewrite(self.history)  # on resume: drop rows past the checkpoint, never duplicate
        self.log(self.model.summary())
        show = (t["progress"] if t["progress"] is not None else progress) if self.dist.is_root else False
        self._session_t0 = self._last_save_t = time.perf_counter()
        stopped_early = False
        with self._stop.installed():
            try:
                while self.epoch < t["epochs"] and not stopped_early:
                    self.dist.agree(self._stop, False)  # a signal any rank saw stops all here
                    if self._stop:
                        raise StopRequested()
                    row = self._train_epoch(show)
                    self.history.append(row)
                    is_best, stopped_early = self._after_epoch(row)
                    self.save_checkpoint(best=is_best)
                    if self.dist.is_root:
                        with disk_full_as_error(f"{metrics.jsonl} (or metrics.csv)"):
                            metrics.append(row)
                    self.log(format_epoch(row, t["epochs"]))
                    for hook in self.epoch_end_hooks:
                        hook(row)
            except StopRequested:
                path = self.save_checkpoint()
                raise Interrupted(
                    f"{self._stop.reason} at epoch {self.epoch + 1}, step {self.global_step}; "
                    f"checkpoint saved to {path}; continue with: gpuml train --resume {self.run_dir}",
                    self._stop.exit_code,
                ) from None
        if stopped_early:
            self.log(f"early stopping after epoch {self.epoch}: "
                     f"{t['early_stopping']['monitor']} did not improve for {plural(self.es_wait, 'epoch')}")
            best = self.run_dir / "checkpoints" / "best.npz"
            restore = t["early_stopping"]["restore_best"]
            kept = self.dist.from_root(lambda: ckpt.load(best) if restore and best.exists() else None)
            if kept is not None:
                model, _, meta = kept
                self.model.load_state_dict(model, source=str(best))
                self.log(f"restored the best weights (epoch {meta['epoch']})")
        return self._finish(stopped_early)

    def _checkpoint_due(self) -> bool:
        """A mid-epoch checkpoint by trainer.checkpoint_every: at multiples of `steps` (so the
        same steps whether or not the run was resumed), or `minutes` after the last one."""
        every = self.cfg["trainer"]["checkpoint_every"]
        if every["steps"] and self.global_step % every["steps"] == 0:
            return True
        minutes = every["minutes"]
        return minutes is not None and time.perf_counter() - self._last_save_t >= 60.0 * minutes

    def _train_epoch(self, show: bool | None) -> dict[str, Any]:
        with self.steps.runner.stream():  # the CUDA steps' non-blocking stream
            return self._run_epoch(show)

    def _run_epoch(self, show: bool | None) -> dict[str, Any]:
        from tqdm import tqdm

        be, t = self.backend, self.cfg["trainer"]
        n_batches = len(self.train_iter)
        read_every = 1 if be.name == "cpu" else t["log_every"]
        p = self.partial
        be.fill_(self._acc, 0.0)
        t0 = self._epoch_t0 = time.perf_counter()
        bar = None  # made after the first step, whose JIT compile would inflate the bar's ETA
        steps_since_read = 0
        try:
            for rows in self.steps.begin_epoch():
                lr = self.schedule.lr(self.global_step)
                self.train_iter.advance()  # before the step: a checkpoint during it resumes past it
                self._step(rows, lr)
                self.global_step += 1
                p["seen"] += rows  # the global batch
                steps_since_read += 1
                if bar is None:
                    bar = tqdm(total=n_batches, initial=self.train_iter.cursor,
                               desc=f"epoch {self.epoch + 1}/{t['epochs']}", unit="batch",
                               disable=(not show) if show is not None else None, leave=False,
                               file=sys.stderr)
                else:
                    bar.update(1)
                mid_epoch = self.train_iter.cursor < n_batches
                save = self.dist.agree(self._stop, mid_epoch and self._checkpoint_due())
                if steps_since_read >= read_every or not mid_epoch or self._stop or save:
                    self._read_back(steps_since_read)  # the checkpoint's partial sums need it
                    steps_since_read = 0
                    if self.tensorboard is not None:
                        self.tensorboard.on_read_back(self.global_step, p, lr)
                    bar.set_postfix(loss=f"{p['loss_sum'] / p['seen']:.4f}",
                                    acc=f"{p['correct'] / p['seen']:.3f}", refresh=False)
                if save:
                    self.save_checkpoint()
                if self._stop and mid_epoch:
                    p["seconds"] += time.perf_counter() - t0
                    self._epoch_t0 = None
                    raise StopRequested()
        finally:
            if bar is not None:
                bar.close()
        train_seconds = p["seconds"] + time.perf_counter() - t0
        self._epoch_t0 = None
        row: dict[str, Any] = {
            "epoch": self.epoch + 1,
            "train_loss": p["loss_sum"] / p["seen"],
            "train_accuracy": p["correct"] / p["seen"],
        }
        if "val" in self.eval_iters:
            ev = self.evaluate("val")
            row["val_loss"], row["val_accuracy"] = ev["loss"], ev["accuracy"]
        row["lr"] = self.schedule.lr(self.global_step - 1)
        row["seconds"] = train_seconds
        row["samples_per_second"] = p["seen"] / train_seconds if train_seconds > 0 else 0.0
        self.epoch += 1
        self.partial = {"loss_sum": 0.0, "correct": 0.0, "seen": 0, "seconds": 0.0}
        return row

    def _step(self, rows: int, lr: float) -> None:
        """One training step on the next batch of `rows` (gpuml/train/step.py)."""
        self.steps.run(rows, lr)

    def _read_back(self, steps: int) -> None:
        """Move the device accumulators into `self.partial`; stop on a non-finite loss."""
        if steps == 0:
            return
        loss_sum, correct = (float(v) for v in self.dist.sum(self.backend.to_numpy(self._acc)))
        self.backend.fill_(self._acc, 0.0)
        if not math.isfinite(loss_sum):
            good = ckpt.list_checkpoints(self.run_dir / "checkpoints")
            where = f"last good checkpoint: {good[-1]}" if good else "no checkpoint was saved yet"
            first = self.global_step - steps + 1
            span = f"step {self.global_step}" if steps == 1 else f"steps {first}-{self.global_step}"
            raise TrainingDiverged(
                f"loss became {loss_sum} at {span} "
                f"(epoch {self.epoch + 1}); {where}. Try a lower optimizer.lr or trainer.grad_clip_norm"
            )
        self.partial["loss_sum"] += loss_sum
        self.partial["correct"] += correct

    def _after_epoch(self, row: dict[str, Any]) -> tuple[bool, bool]:
        """(is this the best epoch by trainer.monitor, should training stop early)."""
        self.best, self.es_wait, is_best, stop = judge_epoch(
            self.cfg["trainer"], self.monitor, row, self.history[:-1], self.best, self.es_wait)
        return is_best, stop

    def _finish(self, stopped_early: bool) -> dict[str, Any]:
        seconds = self.total_seconds()
        test = self.evaluate("test") if "test" in self.eval_iters else {"loss": None, "accuracy": None}
        summary = {
            "name": self.cfg["name"], "test_loss": test["loss"], "test_accuracy": test["accuracy"],
            "epochs": self.epoch, "device": self.backend.describe(), "seconds": seconds,
            "stopped_early": stopped_early, "best": self.best,
        }
        if self.dist.is_root:
            with atomic_write(self.run_dir / "weights.npz") as f:
                np.savez(f, **self.model.state_dict())
            with atomic_write(self.run_dir / "summary.json") as f:
                f.write(json.dumps(summary, indent=2).encode())
        n = self.test_label
        tested = "" if test["loss"] is None else f"{n}_loss {test['loss']:.4f}  {n}_accuracy {test['accuracy']:.4f}  "
        self.log(f"{tested}({plural(self.epoch, 'epoch')}, {seconds:.1f}s) -> {self.run_label}")
        return summary


def evaluate_batches(model: Sequential, loss_fn: Loss, it: BatchIterator, buffers: Buffers) -> dict[str, float]:
    """Mean loss and accuracy of `model` over every batch of `it` in eval mode (the Python
    API's evaluate)."""
    loss_sum, n_correct, n = evaluate_sums(model, loss_fn, it, buffers)
    return {"loss": loss_sum / n, "accuracy": n_correct / n}


def out_of_memory_message(exc: BaseException, batch_size: int | None) -> DeviceError | None:
    """Translate CuPy's OutOfMemoryError (matched by name: cupy is not imported here), whose
    text says how many bytes were asked for, or numpy's MemoryError (host memory, outside the
    layers' own allocations, which name the layer) into one line naming the batch size."""
    gpu = type(exc).__name__ == "OutOfMemoryError"
    if not gpu and not isinstance(exc, MemoryError):
        return None
    kind = "GPU" if gpu else "host"
    where = f"at trainer.batch_size {batch_size}" if batch_size else "while setting up the run"
    return DeviceError(f"{kind} out of memory {where}: {str(exc).strip()}; try a smaller trainer.batch_size")
