"""Per-epoch training time and the share of subnormal floats in every tensor a training step
keeps: optimizer state, parameters, gradients, layer activations and loss buffers.

Subnormal floats (0 < |x| < the dtype's smallest normal, 1.18e-38 in float32) take a slow
microcode path in x86 arithmetic, so a run whose state drifts into them gets slower epoch by
epoch (issue 15). The CPU backend flushes them to zero where they arise; this script shows
whether any remain and whether epoch times stay flat. Run it on a quiet machine:

    GPUML_DATA=/work/shared/datasets .venv/bin/python bench/subnormal_check.py \
        configs/mlp.yaml --epochs 10 [--set data.limit=12000] [--set optimizer.name=rmsprop]

Prints one line per epoch (seconds, and each tensor with any subnormal value) and, at the end,
the slowest epoch against the first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gpuml.train.config import load_config
from gpuml.train.trainer import Trainer


def subnormal_fraction(a: np.ndarray) -> float:
    """Share of the elements of a float array that are subnormal (nonzero, below the smallest normal)."""
    if a.dtype.kind != "f" or a.size == 0:
        return 0.0
    mag = np.abs(a)
    return float(np.count_nonzero((mag < np.finfo(a.dtype).tiny) & (mag != 0))) / a.size


def step_tensors(trainer: Trainer) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every float tensor a training step keeps between steps."""
    be = trainer.backend
    opt = trainer.optimizer
    names = [n for n, _, _ in trainer.model.trainable_parameters()]
    for state, arrays in opt.state.items():
        for name, a in zip(names, arrays, strict=True):
            yield f"state {state} {name}", be.to_numpy(a)
    for name, p, g in trainer.model.named_parameters():
        yield f"param {name}", be.to_numpy(p)
        yield f"grad {name}", be.to_numpy(g)
    for layer in trainer.model.layers:
        bufs = layer._buffers._arrays if layer._buffers is not None else {}  # a bench may look inside
        for (key, _shape, _dt), a in bufs.items():
            yield f"buffer {layer.name}.{key}", be.to_numpy(a)
    loss_bufs = trainer.loss_fn._buf.__self__._arrays  # type: ignore[attr-defined]
    for (key, _shape, _dt), a in loss_bufs.items():
        yield f"loss {key}", be.to_numpy(a)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="configs/mlp.yaml")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    overrides = ["device=cpu", f"trainer.epochs={args.epochs}", "trainer.progress=false", *args.overrides]
    cfg = load_config(args.config, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", log=lambda msg: print(msg, file=sys.stderr))
        seconds: list[float] = []

        def report(row: dict) -> None:
            seconds.append(row["seconds"])
            found = [(n, f) for n, a in step_tensors(trainer) if (f := subnormal_fraction(a)) > 0]
            worst = ", ".join(f"{n} {100 * f:.2f}%" for n, f in sorted(found, key=lambda t: -t[1]))
            print(
                f"epoch {row['epoch']}: {row['seconds']:.2f} s, loss {row['train_loss']:.4f}; "
                f"subnormal: {worst or 'none'}",
                flush=True,
            )

        trainer.epoch_end_hooks.append(report)
        trainer.fit(progress=False)
    if seconds:
        slowest = max(seconds)
        print(f"slowest epoch {slowest:.2f} s = {slowest / seconds[0]:.2f}x the first ({seconds[0]:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
