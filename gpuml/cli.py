"""The `gpuml` command: train, eval, predict, export, plot, info, bench.

Every user error (GpumlError) is printed as one line `gpuml: error: ...` with the error's exit
code (2 for config errors); tracebacks are only for bugs.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from gpuml import __version__
from gpuml.errors import ConfigError, DiskFullError, GpumlError, RunError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train from CONFIG, or continue a run with --resume RUN_DIR.")
    p.add_argument("config", nargs="?", help="YAML config (optional with --resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set trainer.epochs=3 (repeatable)")
    p.add_argument("--out", type=Path, help="run folder (default runs/<name>-<time>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept a config that differs from the run's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


# npz is not weights.npz: that is the run's own final weights (an export of best would replace them).
EXPORT_FILES = {"safetensors": "weights.safetensors", "npz": "weights.export.npz",
                "torch": "weights.torch.safetensors", "onnx": "model.onnx"}


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a run's weights on the test (or val) split")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", default="final", help="final (weights.npz), best, last or a path")
    p.add_argument("--split", default="test", choices=("test", "val"))
    p.add_argument("--device", help="override the run's device (auto, cpu, cuda)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="predict classes for images in a .npy or IDX file")
    p.add_argument("run_dir", type=Path)
    p.add_argument("input", type=Path, help=".npy (N,H,W)/(N,C,H,W) uint8 0..255 or IDX images")
    p.add_argument("--checkpoint", default="final", help="final, best, last or a path")
    p.add_argument("--out", type=Path, help="write predictions (.npy: the (N, classes) probabilities; "
                   "any other name: CSV with columns index,class,name,probability)")
    p.add_argument("--device", help="override the run's device (auto, cpu, cuda)")
    p.add_argument("--batch-size", type=_positive_int, default=1000)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export weights (.npz, .safetensors), a PyTorch state_dict or ONNX")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--checkpoint", default="final", help="final, best, last or a path")
    p.add_argument("--format", default="safetensors", choices=tuple(EXPORT_FILES),
                   help="safetensors/npz: gpuml names and layouts; torch: a safetensors state_dict for "
                        "the matching torch.nn.Sequential; onnx: the model, inputs normalised, outputs logits")
    p.add_argument("--out", type=Path, help="output file (default RUN_DIR/" + ", ".join(EXPORT_FILES.values()) + ")")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plot", help="PNG learning curves of one or more runs")
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, help="PNG file (default RUN_DIR/curves.png of the first run)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("info", help="versions, backends and the GPU seen")
    p.set_defaults(func=cmd_info)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpuml", description="gpuml: small-model GPU training")
    parser.add_argument("--version", action="version", version=f"gpuml {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_run_commands(sub)
    from gpuml.train.config_tools import add_config_parser

    add_config_parser(sub)
    try:
        from gpuml.benchmark.cli import add_bench_parser
    except ImportError:
        pass
    else:
        add_bench_parser(sub)
    return parser


# ---------------------------------------------------------------------------------- train
def _default_run_dir(name: str) -> Path:
    base = Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def cmd_train(args: argparse.Namespace) -> int:
    from gpuml.distributed import world
    from gpuml.train import checkpoint as ckpt
    from gpuml.train.config import command_line_source, load_config
    from gpuml.train.runlock import hold_run_lock
    from gpuml.train.trainer import Trainer, out_of_memory_message, write_config, write_run_info

    dist = world()  # under mpiexec: MPI starts here (one process: nothing happens)
    if args.resume:
        run_dir = args.resume
        if not run_dir.is_dir():
            raise RunError(f"--resume {run_dir}: no such run folder")
    else:
        if not args.config:
            raise ConfigError("gpuml train: give a CONFIG file, or --resume RUN_DIR")
        source = resolve_config(args.config)
        cfg = load_config(source, args.overrides)
        run_dir = dist.from_root(lambda: args.out or _default_run_dir(cfg["name"]))  # one name, by the clock of rank 0
    args.run_dir = run_dir  # main() gives errors about files in it the run folder's exit code
    # Locked before anything is read or written there: a second process stops here.
    with hold_run_lock(run_dir):
        if args.resume:
            cfg, source = _resume_config(args, run_dir)
        elif ckpt.list_checkpoints(run_dir / "checkpoints") or (run_dir / "summary.json").exists():
            raise RunError(f"{run_dir} already holds a run: use --resume {run_dir} or another --out")
        try:
            trainer = Trainer(cfg, run_dir, source=command_line_source(source, args.overrides),
                              resume=bool(args.resume), allow_world_change=args.allow_config_change)
            resumed = args.resume and trainer.resume_latest()
            if not (resumed and trainer.finished_summary()):  # fit() says a finished run is; no writes
                with ckpt.disk_full_keeps_last(run_dir):
                    write_config(run_dir, cfg)
                    write_run_info(run_dir, trainer)
            trainer.fit(progress=False if args.no_progress else None)
        except Exception as exc:
            oom = out_of_memory_message(exc, cfg["trainer"]["batch_size"])
            if oom is not None:
                raise oom from None
            raise
    return 0


# Keys a resume may change without --allow-config-change: they change how a run is shown, kept
# or launched, never the numbers it trains to (graph and eager steps give the same bits).
RESUME_FREE_KEYS = frozenset({
    "name", "trainer.cuda_graph", "trainer.progress", "trainer.tensorboard", "trainer.keep_checkpoints",
    "trainer.checkpoint_every.steps", "trainer.checkpoint_every.minutes",
})


def _resume_config(args: argparse.Namespace, run_dir: Path) -> tuple[dict[str, Any], str]:
    """The config to continue with (the run's own, or CONFIG / --set when given) and its
    source; a change from the run's needs --allow-config-change."""
    from gpuml.train.config import config_diff, load_config

    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        raise RunError(f"--resume {run_dir}: not a run folder ({saved_path} is missing)")
    source = str(args.config or saved_path)
    cfg = load_config(source, args.overrides)
    changed = [k for k in config_diff(load_config(saved_path), cfg) if k not in RESUME_FREE_KEYS]
    if changed and not args.allow_config_change:
        raise ConfigError(f"--resume {run_dir}: the config differs from the run's in "
                          f"{', '.join(changed)}; pass --allow-config-change to accept")
    return cfg, source


def resolve_config(name: str) -> str:
    """A config path as given, else a seed config by name (`gpuml train mlp` finds the
    installed configs/mlp.yaml)."""
    from gpuml.paths import config_dir

    if Path(name).exists():
        return name
    for candidate in (config_dir() / name, config_dir() / f"{name}.yaml"):
        if candidate.exists():
            return str(candidate)
    return name  # load_config reports it missing


# ---------------------------------------------------------------------------------- runs
def _run_config(run_dir: Path, device: str | None) -> tuple[dict[str, Any], Path]:
    """A run folder's resolved config (optionally on another device) and its path."""
    from gpuml.train.config import load_config

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.exists():
        raise RunError(f"{run_dir}: not a run folder ({cfg_path} is missing)")
    cfg = load_config(cfg_path, options={"--device": f"device={device}"} if device else None)
    # The run has its own weights, which every caller loads: a fine-tune's source (perhaps gone
    # since) is not read.
    cfg["model"]["init_from"] = None
    return cfg, cfg_path


def _load_weights(run_dir: Path, checkpoint: str) -> dict[str, Any]:
    """Host arrays of the chosen weights: final (weights.npz), best, last or a checkpoint path."""
    import numpy as np

    from gpuml.train import checkpoint as ckpt

    if checkpoint == "last":  # the newest that loads, as --resume picks, but nothing renamed
        ckpt.find(run_dir, "last")  # none at all: its one-line error
        found = ckpt.load_latest(run_dir, _note, rename=False)
        if found is None:
            raise RunError(f"{run_dir}: no checkpoint that loads (each is named above)")
        return found[1][0]
    if checkpoint != "final":
        return ckpt.load(ckpt.find(run_dir, checkpoint))[0]
    path = run_dir / "weights.npz"
    if not path.exists():
        raise RunError(f"{run_dir}: no final weights ({path} is missing); use --checkpoint last")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# What the trainer writes in a run folder; an output file of eval/predict/export must not be one.
RUN_FILES = ("weights.npz", "config.yaml", "run.json", "summary.json", "metrics.jsonl", "metrics.csv")


def _refuse_run_file(run_dir: Path, out: Path) -> None:
    """A RunError when `out` would overwrite one of the run's own files or checkpoints."""
    target = out.resolve()
    if target.parent == (run_dir / "checkpoints").resolve():
        what = "checkpoint"
    elif target.parent == run_dir.resolve() and target.name in RUN_FILES:
        what = "final weights" if target.name == "weights.npz" else "file"
    else:
        return
    raise RunError(f"--out {out}: that is the run's own {what}; write to another file")


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    if not path.exists():
        raise RunError(f"{run_dir}: {path.name} is missing (not a gpuml run folder?)")
    return json.loads(path.read_text())


def cmd_eval(args: argparse.Namespace) -> int:
    from gpuml.train.trainer import Trainer

    cfg, cfg_path = _run_config(args.run_dir, args.device)
    weights = _load_weights(args.run_dir, args.checkpoint)
    trainer = Trainer(cfg, args.run_dir, source=str(cfg_path))
    trainer.model.load_state_dict(weights, source=args.checkpoint)
    if args.split not in trainer.eval_iters:
        why = "data.val_split is 0" if args.split == "val" else "its test set is empty"
        raise RunError(f"{args.run_dir}: this run has no {args.split} split ({why})")
    result = trainer.evaluate(args.split)
    print(json.dumps({"split": args.split, "checkpoint": args.checkpoint,
                      f"{args.split}_loss": result["loss"], f"{args.split}_accuracy": result["accuracy"]}))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from gpuml.backend import get_backend
    from gpuml.predict import predict_file
    from gpuml.train.build import build_model

    cfg, cfg_path = _run_config(args.run_dir, args.device)
    if args.out is not None:
        _refuse_run_file(args.run_dir, args.out)
    weights = _load_weights(args.run_dir, args.checkpoint)
    info = read_run_info(args.run_dir)
    backend = get_backend(cfg["device"], dtype=cfg["dtype"])
    backend.set_precision(cfg["precision"])  # predict as the run trained and evaluated
    model = build_model(cfg, backend, tuple(info["input_shape"]), str(cfg_path))
    model.load_state_dict(weights, source=args.checkpoint)
    probs = predict_file(model, backend, info, args.input, args.out, args.batch_size)
    if args.out is not None:
        print(f"wrote {len(probs)} predictions to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gpuml.export import export_weights

    cfg, cfg_path = _run_config(args.run_dir, "cpu")  # a clear error when run_dir is not a run folder
    out = args.out or args.run_dir / EXPORT_FILES[args.format]
    _refuse_run_file(args.run_dir, out)
    weights = _load_weights(args.run_dir, args.checkpoint)
    if args.format in ("torch", "onnx"):  # these need the architecture: build it on the CPU
        from gpuml.backend import get_backend
        from gpuml.train.build import build_model

        info = read_run_info(args.run_dir)
        model = build_model(cfg, get_backend("cpu", dtype=cfg["dtype"]), tuple(info["input_shape"]), str(cfg_path))
        model.load_state_dict(weights, source=args.checkpoint)
        if args.format == "torch":
            from gpuml.export import export_torch

            export_torch(model, weights, out)
        else:
            from gpuml.export_onnx import export_onnx

            export_onnx(model, weights, out, info)
    else:
        export_weights(weights, out, args.format)
    print(out)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from gpuml.train.plot import plot_runs

    out = args.out or args.run_dirs[0] / "curves.png"
    plot_runs(args.run_dirs, out)
    print(out)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import numpy as np

    from gpuml.backend import cuda_status

    lines = [f"gpuml {__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"numpy {np.__version__}"]
    for mod in ("numba", "yaml", "tqdm", "cupy", "torch", "matplotlib", "safetensors", "onnx", "onnxruntime",
                "tensorboard", "jsonschema", "mpi4py"):
        try:
            m = __import__(mod)
            lines.append(f"{mod} {_dist_version(mod) or getattr(m, '__version__', '?')}")
        except Exception as exc:  # a broken optional install must not break `info`
            lines.append(f"{mod} not available ({type(exc).__name__})")
    ok, why = cuda_status()
    lines.append("backends: cpu" + (", cuda" if ok else ""))
    if ok:
        from gpuml.backend import get_backend

        lines.append(f"gpu: {get_backend('cuda').describe()}")
    else:
        lines.append(f"gpu: none ({why})")
    print("\n".join(lines))
    return 0


_TEMP_NAME = re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.part$")  # atomic_write's temporary file for NAME


def file_error(exc: OSError, args: argparse.Namespace) -> GpumlError:
    """An OSError about a file that no command turned into a GpumlError (no permission, a
    folder where a file should be): one line naming the file, exit 8 when it is in the run
    folder the command works on, 6 when the disk is full, else 1."""
    path = Path(os.fsdecode(exc.filename))
    match = _TEMP_NAME.match(path.name)
    if match:  # the file being written, not its temporary name
        path = path.with_name(match.group(1))
    reason = (exc.strerror or str(exc)).lower()
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # as gpuml.data.atomic.disk_full_as_error says it
        return DiskFullError(f"{path}: {reason}")
    runs = [Path(d).resolve() for d in (getattr(args, "run_dir", None), *getattr(args, "run_dirs", ())) if d]
    in_run = any(path.resolve().is_relative_to(d) for d in runs)
    return (RunError if in_run else GpumlError)(f"{path}: {reason}")


def _dist_version(module: str) -> str | None:
    from importlib import metadata

    name = {"yaml": "pyyaml"}.get(module, module)
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        try:
            return int(args.func(args) or 0)
        except OSError as exc:
            if not isinstance(exc.filename, (str, bytes, os.PathLike)):  # not about a file: a bug
                raise
            raise file_error(exc, args) from None
    except GpumlError as exc:
        return _exit(exc.exit_code, f"gpuml: error: {exc}", exc)
    except KeyboardInterrupt:
        return _exit(130, "gpuml: aborted")


def _exit(code: int, message: str, exc: BaseException | None = None) -> int:
    """Print `message` and return `code`; of data-parallel ranks, through the exit protocol
    (gpuml.distributed.mpi: the same error on every rank is printed once, one rank's own
    error names it and ends every rank)."""
    from gpuml.distributed import launcher

    dist = launcher.started()
    if dist is not None:
        return dist.exit_code(code, message)
    if isinstance(exc, launcher.MpiMissing) and (launcher.launcher_rank() or 0) != 0:
        return code  # every rank has it: rank 0 says it
    print(message, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
