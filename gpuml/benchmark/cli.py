"""`gpuml bench kernels` and `gpuml bench train` (wired into gpuml.cli by `add_bench_parser`)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from gpuml.errors import ConfigError


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _csv(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="kernel and training benchmarks against PyTorch/cuBLAS/NumPy",
                           description="Benchmarks measured next to their anchors in the same run.")
    bsub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")

    k = bsub.add_parser("kernels", help="per-op microbenchmarks: ours vs cuBLAS/cuDNN/PyTorch/NumPy/copy")
    k.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    k.add_argument("--quick", action="store_true", help="a small subset (small sizes on CPU)")
    k.add_argument("--families", type=_csv, metavar="LIST",
                   help="only these families: matmul,conv2d,maxpool2d,avgpool2d,softmax_xent,adam "
                        "(and on a GPU matmul_tf32,matmul_bf16)")
    k.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    k.add_argument("--markdown", type=Path, metavar="FILE", help="write the tables as Markdown")
    k.add_argument("--plot", type=Path, metavar="FILE.png", help="one PNG with a panel per family")
    k.add_argument("--plot-dir", type=Path, metavar="DIR", help="one PNG per family in DIR")
    k.set_defaults(func=cmd_bench_kernels)

    t = bsub.add_parser("train", help="training throughput and accuracy: gpuml vs PyTorch")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    t.add_argument("--models", type=_csv, default=["mlp", "cnn"], metavar="LIST",
                   help="seed models (mlp, cnn) or config paths (default mlp,cnn)")
    t.add_argument("--batch-sizes", type=_csv_ints, default=[32, 128, 512], metavar="LIST",
                   help="default 32,128,512")
    t.add_argument("--epochs", type=int, default=1, help="measured epochs (default 1)")
    t.add_argument("--limit", type=int, metavar="N", help="train on the first N training images")
    t.add_argument("--warmup-steps", type=int, default=20, help="untimed steps before measuring")
    t.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    t.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    t.add_argument("--markdown", type=Path, metavar="FILE", help="write the table as Markdown")
    t.add_argument("--ranks", type=int, default=1, metavar="N",
                   help="data-parallel ranks: start N ranks under mpiexec (the mpi extra), each on its "
                        "share of the cores; reports the all-reduce time per step (same as running "
                        "mpiexec -n N gpuml bench train ...)")
    t.set_defaults(func=cmd_bench_train)


def _command_line() -> str:
    return "gpuml " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _write(path: Path | None, text: str) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        _log(f"wrote {path}")


def _resolve_device(device: str) -> str:
    from gpuml.backend import get_backend

    return get_backend(device).name  # "auto" -> cpu/cuda; "cuda" without a GPU is a DeviceError


def cmd_bench_kernels(args: argparse.Namespace) -> int:
    from gpuml.benchmark.kernel_cases import full_sweep
    from gpuml.benchmark.kernels import problems, run_kernels
    from gpuml.benchmark.precision_cases import PRECISION_FAMILIES
    from gpuml.benchmark.report import kernels_markdown

    known = {c.family for c in full_sweep("cpu")} | set(PRECISION_FAMILIES.values())  # those: GPU only
    unknown = sorted(set(args.families or []) - known)
    if unknown:
        raise ConfigError(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(sorted(known))}")
    device = _resolve_device(args.device)
    result = run_kernels(device, args.quick, log=_log, only=args.families, command=_command_line())
    _finish(args, result, kernels_markdown(result))
    if args.plot or args.plot_dir:
        from gpuml.benchmark.plots import plot_families, plot_overview

        if args.plot:
            _log(f"wrote {plot_overview(result, args.plot)}")
        if args.plot_dir:
            for p in plot_families(result, args.plot_dir, f"kernels-{device}"):
                _log(f"wrote {p}")
    bad = problems(result["rows"])
    for line in bad:
        _log(f"gpuml bench: {line}")
    return 1 if bad else 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from gpuml.benchmark.report import train_markdown
    from gpuml.benchmark.train import run_train

    if args.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1, got {args.epochs}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be positive, got {args.limit}")
    from gpuml import distributed

    if args.ranks < 1:
        raise ConfigError(f"--ranks must be at least 1, got {args.ranks}")
    if args.ranks > 1 and distributed.launcher_size() is None:  # not under mpiexec yet: start it
        from gpuml.distributed.bench import relaunch

        return relaunch(args.ranks, sys.argv[1:])
    dist = distributed.world()
    if dist.size > 1 and not args.no_torch:
        _log("bench train: several ranks: no PyTorch comparison (run it with one process)")
    # Under mpiexec: this rank's device (its GPU, or its share of the cores, taken before the CPU
    # backend sizes its threads).
    device = dist.device(args.device) if dist.size > 1 else args.device
    result = run_train(device, args.models, args.batch_sizes, args.epochs, args.limit,
                       warmup_steps=args.warmup_steps, log=_log if dist.is_root else _quiet,
                       command=_command_line(), with_torch=not args.no_torch and dist.size == 1)
    if dist.is_root:  # rank 0 speaks and writes for all
        _finish(args, result, train_markdown(result))
    return 0


def _quiet(msg: str) -> None:
    pass


def _finish(args: argparse.Namespace, result: dict[str, Any], markdown: str) -> None:
    print(markdown)
    _write(args.markdown, markdown)
    _write(args.json, json.dumps(result, indent=1) + "\n")
