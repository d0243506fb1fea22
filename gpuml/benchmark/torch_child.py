"""`gpuml bench train` on CPU: the PyTorch eager rows, each trained in a child process of its own:
"torch eager" (PyTorch as it comes) and "torch eager FTZ" (subnormal floats flushed to zero).

Why FTZ: gpuml's CPU backend flushes subnormal floats to zero where it writes them (issue 15),
while PyTorch keeps them by default, and its seed MLP step at batch 32 slows from 3.0 to 7.2 ms
within one epoch as Adam's state drifts into them (bench/RESULTS.md). Against the default PyTorch
row alone gpuml would be credited with PyTorch's subnormal slowdown; this row gives PyTorch the
same advantage, through its own switch, torch.set_flush_denormal(True). The switch sets the
FTZ/DAZ bits of the calling thread only, and a thread inherits them when it is created, so it is
thrown before PyTorch starts its thread pool.

Why child processes: each row's PyTorch runs as in a user's own script, on the OpenMP runtime it
ships (GNU libgomp) with its thread pool to itself. In the benchmark's process gpuml's CPU backend
may have loaded Intel's OpenMP first, for MKL (gpuml/backend/cpu/mkl.py), and a PyTorch imported
after it would resolve its OpenMP calls into that runtime instead; and the FTZ switch could not
reach an in-process pool already serving the other row. A child sits blocked on its pipe while
the other sides run, so the epochs still alternate on an otherwise quiet machine; it trains the
same model, data, order and optimizer as the in-process PyTorch side does on CUDA (TorchRun).

Why the children's malloc settings (CHILD_ENV): gpuml allocates its step's buffers once, PyTorch
allocates its tensors every step, and with glibc's defaults each large one (above the dynamic mmap
threshold) is a fresh mmap whose pages fault in again: PyTorch's seed CNN step at batch 128 took
27.8 ms in a fresh process and 20.7-21.0 ms with these two settings, which keep freed memory in
the heap (the benchmark's own process, with gpuml's arrays come and gone, had got there by
accident: 21-22 ms in earlier tables). The MLP and the batch-32 CNN did not change. A setting
already in the environment is kept.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

import numpy as np

from gpuml.errors import GpumlError

#: glibc malloc tunables for the PyTorch children: no mmap below 64 MiB, trim above 256 MiB
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
IMPL = "torch eager"
FTZ_IMPL = "torch eager FTZ"


def _child(conn: Any, cfg: dict[str, Any], warmup_steps: int, threads: int, flush: bool) -> None:
    try:
        import torch

        if flush and not torch.set_flush_denormal(True):  # first: every thread PyTorch starts inherits it
            raise GpumlError("bench train: torch.set_flush_denormal is not supported on this CPU")
        from gpuml.benchmark.torch_models import import_torch
        from gpuml.benchmark.train import TorchRun, load_data

        import_torch("cpu")  # the parent's anchor settings (it sets the core count: ours follows)
        torch.set_num_threads(threads)
        run = TorchRun(cfg, load_data(cfg), "cpu", graph=False)
        run.prepare(warmup_steps)
        conn.send(("ok", None))
        while True:
            msg = conn.recv()
            if msg[0] == "epoch":
                cpu, wall = time.process_time(), time.perf_counter()
                seconds, samples, steps, train = run.epoch(msg[1])
                busy = (time.process_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
                conn.send(("ok", (seconds, samples, steps, train, busy)))
            elif msg[0] == "test":
                conn.send(("ok", run.test_accuracy()))
            elif msg[0] == "flushes":  # for the tests: does this process's PyTorch flush subnormals?
                conn.send(("ok", (torch.tensor([1e-39]) * 1.0).item() == 0.0))
            elif msg[0] == "environ":  # for the tests: the child's environment
                conn.send(("ok", {k: os.environ.get(k) for k in msg[1]}))
            else:
                conn.send(("ok", None))
                return
    except BaseException as exc:  # reported to the parent as one line
        msg = str(exc) if isinstance(exc, GpumlError) else f"{type(exc).__name__}: {exc}"
        conn.send(("error", msg, traceback.format_exc()))


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` added where unset while a child starts (it inherits the
    environment then; glibc reads its tunables when the child's process begins)."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def _main_hidden() -> Iterator[None]:
    """Starts a spawned child without re-running the parent's __main__ (multiprocessing would
    import it again in the child, by path or module name; a script calling run_train without an
    `if __name__ == "__main__"` guard would then start itself over). The child's target lives in
    this module, so it needs nothing from __main__."""
    main = sys.modules["__main__"]
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


class TorchChildSide:
    """A PyTorch eager side of one comparison in a child process (subnormals flushed with
    `flush`), one epoch per `epoch()` call, over the permutations the other sides draw from the
    same seed (as TorchSide)."""

    def __init__(self, cfg: dict[str, Any], n_train: int, warmup_steps: int, threads: int, *, flush: bool) -> None:
        self.cfg = cfg
        self.impl = FTZ_IMPL if flush else IMPL
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no PyTorch threads yet
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child, cfg, warmup_steps, threads, flush), daemon=True)
        with _main_hidden(), _environ(CHILD_ENV):
            self._proc.start()
        child.close()
        self.rng = np.random.default_rng(cfg["seed"])
        self.n = n_train
        self.times: list[float] = []
        self._cpu = self._wall = 0.0
        self._call()  # ready: data loaded, model built, warmed up

    def _call(self, *msg: Any) -> Any:
        if msg:
            self._conn.send(msg)
        try:
            reply = self._conn.recv()
        except EOFError:
            raise GpumlError(f"bench train: the {self.impl} process ended (exit code {self._proc.exitcode})") from None
        if reply[0] != "ok":
            self.close()
            raise GpumlError(f"bench train: {self.impl}: {reply[1]}")
        return reply[1]

    def epoch(self) -> None:
        seconds, self.samples, self.steps, self.train, busy = self._call("epoch", self.rng.permutation(self.n))
        self.times.append(seconds)
        self._cpu += busy * seconds
        self._wall += seconds

    def flushes(self) -> bool:
        return bool(self._call("flushes"))

    def environ(self, names: list[str]) -> dict[str, str | None]:
        return dict(self._call("environ", names))

    def result(self) -> dict[str, Any]:
        from gpuml.benchmark.train import _result

        accuracy = self._call("test")
        self.close()
        return _result(self.cfg, self.impl, self.times, self.samples, self.steps, self.train, accuracy,
                       self._cpu / self._wall if self._wall else 0.0)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
        self._conn.close()
