"""`gpuml bench train`: training throughput and accuracy of the seed models, gpuml next to PyTorch.

gpuml's side is gpuml's own Trainer (built from the config, batches from BatchIterator), running
the same epoch loop `gpuml train` runs (`Trainer._train_epoch`, whose time excludes evaluation and
checkpoints). PyTorch's side is the same model (same layers and initial weights, see
torch_models.py), optimizer and hyperparameters, loss, data (the same normalised images, visited in
the same shuffled order), batch size and device, in the same process: eager, and on CUDA also the
whole step (gather, forward, loss, backward, fused Adam, metric accumulation) captured as one CUDA
graph, replayed per step. Both sides accumulate the loss and accuracy on the device each step,
as gpuml's trainer does.

Steady state: before the measured run, each side trains `warmup_steps` steps (gpuml on a throwaway
Trainer: numba compilation, kernel compilation and allocator growth happen there; PyTorch on the
same model, whose weights and optimizer state are then reset). Every measured epoch is a full
epoch; the reported epoch time is the median over epochs. The sides' epochs alternate (A B, B A,
A B, ...; the next model or batch size starts the other way round), so neither always runs first,
on a cache the other warmed or through the same slow spell of a shared machine. The validation split is off: training
uses every training image (or the first --limit), test accuracy is on the whole test set.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gpuml.benchmark import hardware
from gpuml.benchmark.torch_child import FTZ_IMPL, TorchChildSide
from gpuml.benchmark.torch_models import check_supported, import_torch, torch_optimizer, torch_twin
from gpuml.data.loader import Dataset, Split, load_dataset
from gpuml.distributed.bench import allreduce_stats
from gpuml.errors import GpumlError
from gpuml.paths import config_dir
from gpuml.train.config import load_config

SEED_MODELS = ("mlp", "cnn")
Log = Callable[[str], None]


def bench_config(model: str, device: str, batch_size: int, epochs: int, limit: int | None) -> dict[str, Any]:
    """The seed config (mlp, cnn) or a YAML path, set up for a benchmark run."""
    path = config_dir() / f"{model}.yaml" if model in SEED_MODELS else Path(model)
    overrides = [f"device={device}", f"trainer.batch_size={batch_size}", f"trainer.epochs={epochs}",
                 "data.val_split=0", "trainer.monitor=auto", "trainer.progress=false"]
    if limit:
        overrides.append(f"data.limit={limit}")
    return load_config(path, overrides)


def load_data(cfg: dict[str, Any]) -> Dataset:
    d = cfg["data"]
    return load_dataset(d["dataset"], d["root"], d["limit"], 0, d["download"])


def _result(cfg: dict[str, Any], impl: str, epoch_s: list[float], samples: int, steps: int,
            train: dict[str, float], test_accuracy: float, busy: float) -> dict[str, Any]:
    median_s = statistics.median(epoch_s)
    return {
        "model": cfg["name"], "batch_size": cfg["trainer"]["batch_size"], "impl": impl,
        "device": cfg["device"], "epochs": len(epoch_s), "samples_per_epoch": samples,
        "steps_per_epoch": steps, "epoch_seconds": epoch_s, "median_epoch_s": median_s,
        "samples_per_s": samples / median_s, "us_per_step": median_s / steps * 1e6,
        "train_loss": train["loss"], "train_accuracy": train["accuracy"], "test_accuracy": test_accuracy,
        # process CPU seconds per wall second over the measured epochs: about the core count when
        # the run had the machine to itself, less when other processes took cores from it
        "cpu_busy": busy if cfg["device"] == "cpu" else None,
    }


class _BusyMeter:
    """CPU time of this process (all threads) over wall time, summed over start()/stop() spans
    (a side's epochs, which alternate with the other side's)."""

    def __init__(self) -> None:
        self._cpu_total = self._wall_total = 0.0

    def start(self) -> None:
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def stop(self) -> float:
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        self._cpu_total += cpu
        self._wall_total += wall
        return cpu / wall if wall > 0 else 0.0

    def busy(self) -> float:
        return self._cpu_total / self._wall_total if self._wall_total > 0 else 0.0


# ------------------------------------------------------------------------------------- gpuml
def step_launches(trainer: Any) -> int | None:
    """Kernel launches of one training step (batch gather included), issued eagerly, after a
    first step has compiled kernels and built launch plans; None on a backend that launches no
    kernels (CPU). Trains two steps of `trainer`, which must run with trainer.cuda_graph off (a
    replayed graph launches nothing through the backend): use a throwaway one."""
    be = trainer.backend
    if not hasattr(be, "launch_count"):
        return None
    counts = []
    with trainer.steps.runner.stream():  # the step function of gpuml/train/step.py
        for rows in trainer.steps.begin_epoch()[:2]:
            before = be.launch_count
            trainer.train_iter.advance()
            trainer._step(rows, trainer.schedule.lr(trainer.global_step))
            trainer.global_step += 1
            counts.append(be.launch_count - before)
    be.synchronize()
    return counts[-1]


class GpumlSide:
    """gpuml's side of one comparison: warmed up on a throwaway Trainer, then one measured
    Trainer whose epochs `epoch()` runs one at a time (so they can alternate with PyTorch's)."""

    def __init__(self, cfg: dict[str, Any], data: Dataset, warmup_steps: int) -> None:
        from gpuml.train.trainer import Trainer

        def quiet(msg: str) -> None:
            pass

        self.cfg, self.impl = cfg, "gpuml"
        batch = cfg["trainer"]["batch_size"]
        n_warm = min(len(data.train), warmup_steps * batch)
        warm_data = dataclasses.replace(data, train=Split(data.train.images[:n_warm], data.train.labels[:n_warm]))
        self._tmp = tempfile.TemporaryDirectory()
        tmp = Path(self._tmp.name)
        Trainer(cfg, tmp / "warmup", log=quiet, dataset=warm_data)._train_epoch(False)
        eager = {**cfg, "trainer": {**cfg["trainer"], "cuda_graph": "off"}}
        self.launches = step_launches(Trainer(eager, tmp / "launches", log=quiet, dataset=warm_data))
        self.trainer = Trainer(cfg, tmp / "run", log=quiet, dataset=data)
        self.rows: list[dict[str, Any]] = []
        self.meter = _BusyMeter()

    def epoch(self) -> None:
        self.meter.start()
        self.rows.append(self.trainer._train_epoch(False))
        self.meter.stop()

    def result(self) -> dict[str, Any]:
        test = self.trainer.evaluate("test")
        last, it = self.rows[-1], self.trainer.train_iter
        result = _result(self.cfg, "gpuml", [r["seconds"] for r in self.rows], it.num_samples, len(it),
                         {"loss": last["train_loss"], "accuracy": last["train_accuracy"]}, test["accuracy"],
                         self.meter.busy())
        result["launches_per_step"] = self.launches
        result.update(allreduce_stats(self.trainer))  # data-parallel ranks (gpuml bench train --ranks)
        self._tmp.cleanup()
        return result


# ------------------------------------------------------------------------------------- torch
class TorchRun:
    """One PyTorch training run (eager or CUDA graph) on the same data and initial weights."""

    def __init__(self, cfg: dict[str, Any], data: Dataset, device: str, graph: bool) -> None:
        import torch

        from gpuml.backend import get_backend
        from gpuml.train.build import build_model

        self.torch, self.cfg, self.device, self.graph = torch, cfg, device, graph
        self.batch = cfg["trainer"]["batch_size"]
        shape = tuple(cfg["model"]["input_shape"] or data.train.images.shape[1:])
        # The same initial weights as gpuml's Trainer: the same build, seed and host-side draw.
        self.net = torch_twin(build_model(cfg, get_backend("cpu"), shape), device)
        self.opt = torch_optimizer(cfg, self.net.parameters(), device, capturable=graph)
        self.smoothing = cfg["loss"]["label_smoothing"]
        self.x, self.y = self._normalised(data.train, data)
        self.test_x, self.test_y = self._normalised(data.test, data)
        self.seed = cfg["seed"]
        self.acc = torch.zeros(2, device=device)  # loss sum, correct count
        self.init = [p.detach().clone() for p in self.net.parameters()]

    def _normalised(self, split: Split, data: Dataset) -> tuple[Any, Any]:
        """(x, y) on the device: x = (pixel / 255 - mean) / std in float64, rounded once (as
        gpuml's gather_batch lookup table does)."""
        mean, std = (data.mean, data.std) if self.cfg["data"]["normalize"] else (0.0, 1.0)
        x = ((split.images.astype(np.float64) / 255.0 - mean) / std).astype(np.float32)
        t = self.torch
        return t.from_numpy(x).to(self.device), t.from_numpy(split.labels.astype(np.int64)).to(self.device)

    def _step_body(self, idx: Any) -> None:
        """Gather, forward, loss, backward, optimizer step, metric accumulation (no host sync)."""
        t = self.torch
        x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
        out = self.net(x)
        loss = t.nn.functional.cross_entropy(out, y, label_smoothing=self.smoothing)
        loss.backward()
        self.opt.step()
        self.acc[0].add_(loss.detach() * x.shape[0])
        self.acc[1].add_((out.argmax(1) == y).sum())

    def _eager_step(self, idx: Any) -> None:
        self.opt.zero_grad(set_to_none=True)
        self._step_body(idx)

    def _reset(self) -> None:
        """Back to the initial weights, zero optimizer state (in place: a captured graph keeps
        pointing at these tensors)."""
        with self.torch.no_grad():
            for p, p0 in zip(self.net.parameters(), self.init):
                p.copy_(p0)
            for state in self.opt.state.values():
                for v in state.values():
                    if isinstance(v, self.torch.Tensor):
                        v.zero_()
            if not self.graph:  # eager: let Adam re-create its state, as on a first step
                self.opt.state.clear()
            self.acc.zero_()

    def prepare(self, warmup_steps: int) -> None:
        t = self.torch
        warm = t.arange(self.batch, device=self.device) % self.x.shape[0]
        if not self.graph:
            for _ in range(warmup_steps):
                self._eager_step(warm)
            self._reset()
            return
        # The PyTorch whole-network capture recipe: warm up on a side stream, capture with the
        # grads unset (backward then writes fresh grad buffers in the graph's pool), replay.
        self.static_idx = warm.clone()
        side = t.cuda.Stream()
        side.wait_stream(t.cuda.current_stream())
        with t.cuda.stream(side):
            for _ in range(max(warmup_steps, 3)):
                self._eager_step(self.static_idx)
        t.cuda.current_stream().wait_stream(side)
        self.cuda_graph = t.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        with t.cuda.graph(self.cuda_graph):
            self._step_body(self.static_idx)
        self._reset()

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def epoch(self, order: np.ndarray) -> tuple[float, int, int, dict[str, float]]:
        """One epoch over `order`; (seconds, samples, steps, train metrics). The CUDA graph has
        static shapes, so in graph mode a last partial batch is dropped."""
        t = self.torch
        self.acc.zero_()
        self._sync()
        t0 = time.perf_counter()
        perm = t.from_numpy(order).to(self.device)
        n = len(order) - (len(order) % self.batch if self.graph else 0)
        steps = 0
        for start in range(0, n, self.batch):
            idx = perm[start:start + self.batch]
            if self.graph:
                self.static_idx.copy_(idx)
                self.cuda_graph.replay()
            else:
                self._eager_step(idx)
            steps += 1
        loss_sum, correct = (float(v) for v in self.acc.cpu())
        seconds = time.perf_counter() - t0
        return seconds, n, steps, {"loss": loss_sum / n, "accuracy": correct / n}

    def test_accuracy(self) -> float:
        t, bs = self.torch, self.cfg["trainer"]["eval_batch_size"]
        self.net.eval()
        correct = t.zeros((), device=self.device)
        with t.no_grad():
            for s in range(0, self.test_x.shape[0], bs):
                correct += (self.net(self.test_x[s:s + bs]).argmax(1) == self.test_y[s:s + bs]).sum()
        self.net.train()
        return float(correct) / self.test_x.shape[0]


class TorchSide:
    """PyTorch's side of one comparison (eager or CUDA graph), one epoch per `epoch()` call, over
    the permutations gpuml's BatchIterator draws from the same seed (PyTorch with subnormals
    flushed: torch_child.py)."""

    def __init__(self, cfg: dict[str, Any], data: Dataset, device: str, graph: bool, warmup_steps: int) -> None:
        self.cfg, self.impl = cfg, "torch cuda-graph" if graph else "torch eager"
        self.run = TorchRun(cfg, data, device, graph)
        self.run.prepare(warmup_steps)
        self.rng = np.random.default_rng(cfg["seed"])
        self.n = len(data.train)
        self.times: list[float] = []
        self.meter = _BusyMeter()

    def epoch(self) -> None:
        self.meter.start()
        seconds, self.samples, self.steps, self.train = self.run.epoch(self.rng.permutation(self.n))
        self.meter.stop()
        self.times.append(seconds)

    def result(self) -> dict[str, Any]:
        return _result(self.cfg, self.impl, self.times, self.samples, self.steps, self.train,
                       self.run.test_accuracy(), self.meter.busy())


def interleaved_epochs(sides: list[Any], epochs: int, reverse_first: bool = False) -> list[str]:
    """Each side's epochs, alternating sides so that a slow spell of the machine or a warm cache
    favours none: A B, B A, A B, ... (every epoch reverses the order; `reverse_first` starts with
    B A). Returns the order run, as side names."""
    order = []
    for e in range(epochs):
        seq = sides[::-1] if (e % 2 == 1) != reverse_first else sides
        for side in seq:
            side.epoch()
            order.append(side.impl)
    return order


# ------------------------------------------------------------------------------------- driver
def _release(device: str, torch: Any) -> None:
    """Return cached GPU memory between runs, so one run's pool does not crowd the next."""
    import gc

    gc.collect()
    if device == "cuda":
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
        if torch is not None:
            torch.cuda.empty_cache()


def run_train(device: str, models: list[str], batch_sizes: list[int], epochs: int, limit: int | None,
              warmup_steps: int = 20, log: Log = print, command: str = "", with_torch: bool = True) -> dict[str, Any]:
    from gpuml.backend import get_backend

    backend = get_backend(device)  # a clear DeviceError before any data is loaded
    device = backend.name
    torch = import_torch(device) if with_torch else None
    log(f"bench train: {backend.describe()}; PyTorch: {torch.__version__ if torch else 'not available'}")
    idle_before = hardware.busy_warning(log, device)
    rows: list[dict[str, Any]] = []
    orders: list[str] = []
    started, load_before = time.time(), hardware.load_average()
    for model in models:
        data: Dataset | None = None
        for batch in batch_sizes:
            cfg = bench_config(model, device, batch, epochs, limit)
            if torch is not None:
                check_supported(cfg)
            data = data or load_data(cfg)
            modes = [False, True] if (torch is not None and device == "cuda") else [False]
            sides: list[Any] = [GpumlSide(cfg, data, warmup_steps)]
            if torch is not None:
                if device == "cpu":  # in child processes, as it comes and with gpuml's subnormal flush
                    sides += [TorchChildSide(cfg, len(data.train), warmup_steps, torch.get_num_threads(), flush=flush)
                              for flush in (False, True)]
                else:
                    sides += [TorchSide(cfg, data, device, graph, warmup_steps) for graph in modes]
            # alternate within a run (A B, B A, ...) and between runs (the next starts the other way)
            order = interleaved_epochs(sides, epochs, reverse_first=len(orders) % 2 == 1)
            orders.append(f"{cfg['name']} B={batch}: {', '.join(order)}")
            new = [side.result() for side in sides]
            eager = next((r for r in new if r["impl"] == "torch eager"), None)
            ftz = next((r for r in new if r["impl"] == FTZ_IMPL), None)
            for r in new:
                r["speedup_vs_torch_eager"] = eager["median_epoch_s"] / r["median_epoch_s"] if eager else None
                if ftz:
                    r["speedup_vs_torch_eager_ftz"] = ftz["median_epoch_s"] / r["median_epoch_s"]
                launches = f"  {r['launches_per_step']} launches/step" if r.get("launches_per_step") else ""
                if r.get("allreduce_us_per_step") is not None:
                    launches += (f"  {r['ranks']} ranks, all-reduce {r['allreduce_us_per_step']:.0f} us/step "
                                 f"({r['allreduce_bytes'] / 1e6:.2f} MB)")
                log(f"  {r['model']:12s} B={batch:<5d} {r['impl']:17s} {r['samples_per_s']:10.0f} samples/s "
                    f"{r['us_per_step']:9.0f} us/step  test acc {r['test_accuracy']:.4f}{launches}")
            rows += new
            _release(device, torch)
    if not rows:
        raise GpumlError("bench train: no models or batch sizes given")
    meta = {
        "kind": "train", "device": device, "backend": backend.describe(),
        "hardware": hardware.gpu_info() if device == "cuda" else hardware.cpu_info(),
        "versions": hardware.versions(), "commit": hardware.git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "load_average": hardware.load_average(),
        "load_average_before": load_before, "cpu_idle_before": idle_before,
        "seconds": time.time() - started, "command": command,
        "epochs": epochs, "limit": limit, "epoch_order": orders,
        "warmup_steps": warmup_steps, "torch_threads": torch.get_num_threads() if torch and device == "cpu" else None,
    }
    return {"meta": meta, "rows": rows}
