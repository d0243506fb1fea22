"""Where a CPU training step's time goes, and how it compares with PyTorch eager, step by step.

    python bench/step_profile.py mlp 32            # per-op wall time inside the step, Python calls
    python bench/step_profile.py cnn 32 --vs-torch # and interleaved per-step medians against PyTorch

The step is the model-level step (forward, loss, backward, the optimizer) on the seed config's
model, data (the first 6,000 training images) and optimizer, after 20 warm-up steps. Per-op
times come from wrapping each backend method with a timer (the wrapper adds about 1 us per op);
the Python call count from cProfile. With --vs-torch, blocks of 20 gpuml steps and 20 PyTorch
eager steps (the bench train twin: same weights, data, Adam) alternate, each block opened by one
untimed step, and the medians of the per-step wall times are compared; run it on an idle machine
(see bench/RESULTS.md): on a busy one, threads that sleep between hand-offs wait for a time slice.
`--threads 1` runs both sides on one thread (BLAS, torch, gpuml's helpers) and reports CPU time:
the work each side does, which other processes disturb much less than wall time.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GPUML_DATA", str(Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"))

import gpuml  # noqa: E402,F401 - sets OPENBLAS_THREAD_TIMEOUT before numpy loads OpenBLAS

OPS = ["gather_batch", "matmul", "bias_grad", "conv2d_fwd", "conv2d_bwd_data", "conv2d_bwd_weight", "maxpool2d_fwd",
       "maxpool2d_bwd", "avgpool2d_fwd", "avgpool2d_bwd", "activation_fwd", "activation_bwd", "softmax_xent",
       "count_correct", "add_", "adam_step"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=("mlp", "cnn"))
    ap.add_argument("batch", type=int)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--vs-torch", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="1: one thread everywhere, CPU time")
    args = ap.parse_args()
    from gpuml.backend.cpu import loops

    clock = time.perf_counter
    if args.threads == 1:
        loops._WORKERS = 1
        fns = loops.blas_thread_functions()
        if fns:
            fns[1](1)
        clock = time.thread_time
    from gpuml.benchmark.train import TorchRun, bench_config, load_data
    from gpuml.train.trainer import Trainer

    cfg = bench_config(args.model, "cpu", args.batch, 1, 6000)
    data = load_data(cfg)
    tr = Trainer(cfg, Path(tempfile.mkdtemp()) / "run", log=lambda m: None, dataset=data)
    be, batches = tr.backend, iter(tr.train_iter)

    def step() -> None:
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(tr.train_iter)
            x, y = next(batches)
        out = tr.model.forward_buffered(x, training=True)
        be.count_correct(out, y, out=tr._correct)
        _, dout = tr.loss_fn(out, y)
        tr.model.backward(dout)
        tr.optimizer.step(1e-3)

    for _ in range(20):
        step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        step()
    prof.disable()
    calls = sum(v[1] for v in pstats.Stats(prof).stats.values()) / 50
    spent: dict[str, float] = collections.defaultdict(float)
    for name in OPS:
        real = getattr(be, name)

        def timed(*a, _real=real, _name=name, **k):
            t0 = clock()
            r = _real(*a, **k)
            spent[_name] += clock() - t0
            return r

        setattr(be, name, timed)
    per_op: dict[str, list[float]] = collections.defaultdict(list)
    total = []
    for _ in range(args.steps):
        spent.clear()
        t0 = clock()
        step()
        total.append(clock() - t0)
        for name in OPS:
            per_op[name].append(spent.get(name, 0.0))
    for name in OPS:
        delattr(be, name)
    unit = "CPU us (1 thread)" if args.threads == 1 else "wall us"
    print(f"{args.model} B={args.batch}: {statistics.median(total) * 1e6:.0f} {unit} per step (median of "
          f"{args.steps}), {calls:.0f} Python calls per step")
    for name in OPS:
        m = statistics.median(per_op[name])
        if m:
            print(f"  {name:18s} {m * 1e6:9.0f}")
    if not args.vs_torch:
        return
    import numpy as np
    import torch

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    run = TorchRun(cfg, data, "cpu", False)
    run.prepare(20)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(len(data.train)))
    pos = 0

    def torch_step() -> None:
        nonlocal pos
        if pos + args.batch > len(perm):
            pos = 0
        run._eager_step(perm[pos:pos + args.batch])
        pos += args.batch

    times: dict[str, list[float]] = {"gpuml": [], "torch eager": []}
    sides = [("gpuml", step), ("torch eager", torch_step)]
    for r in range(max(2, args.steps // 20)):
        for name, fn in sides if r % 2 == 0 else sides[::-1]:
            fn()
            for _ in range(20):
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    g, t = statistics.median(times["gpuml"]), statistics.median(times["torch eager"])
    print(f"interleaved: gpuml {g * 1e6:.0f}, torch eager {t * 1e6:.0f} {unit} per step; torch/gpuml {t / g:.2f}x "
          f"({len(times['gpuml'])} steps each; load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
