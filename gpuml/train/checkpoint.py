"""Checkpoints: one .npz per save holding model weights ("model/<param>"), optimizer state
("optim/<state>.<i>") and a JSON "meta" record (epoch, step, batch cursor, the resolved config,
the metrics history, best-metric and early-stopping state, partial-epoch accumulators).

Randomness needs no saved generator state: shuffling draws from a generator seeded by
(seed, epoch), dropout and augmentation from the counter-based generator keyed by (seed, step).
So (seed, epoch, step) in meta *is* every RNG state, and a resumed run replays the same numbers.

Writes are atomic (temporary file, fsync, rename): a crash leaves the previous checkpoint intact.
A file damaged anyway (a disk error, a copy cut short) is skipped by `load_latest`, which resumes
from the newest checkpoint that loads.
"""

from __future__ import annotations

import contextlib
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gpuml.data.atomic import atomic_write, remove_stale_temp_files
from gpuml.errors import DiskFullError, RunError

State = tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]

FORMAT = 1
_NAME = re.compile(r"^step-(\d{9})\.npz$")


def save(path: Path, model_state: dict[str, np.ndarray], optim_state: dict[str, Any],
         meta: dict[str, Any]) -> Path:
    arrays: dict[str, np.ndarray] = {f"model/{k}": v for k, v in model_state.items()}
    scalars = {}
    for k, v in optim_state.items():
        if isinstance(v, np.ndarray):
            arrays[f"optim/{k}"] = v
        else:
            scalars[k] = v
    record = dict(meta, format=FORMAT, optim_scalars=scalars)
    arrays["meta"] = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return path


def load(path: Path) -> State:
    """(model_state, optim_state, meta); a missing or damaged file is a one-line error."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            model = {k[6:]: z[k] for k in z.files if k.startswith("model/")}
            optim: dict[str, Any] = {k[6:]: z[k] for k in z.files if k.startswith("optim/")}
    except FileNotFoundError:
        raise RunError(f"{path}: checkpoint not found") from None
    except (PermissionError, IsADirectoryError):
        raise  # not damage (nothing to skip or rename): the CLI names the file and the reason
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        # np.load of an empty file raises EOFError; a truncated zip BadZipFile or OSError.
        raise RunError(f"{path}: checkpoint is damaged ({type(exc).__name__}: {exc})") from None
    if meta.get("format") != FORMAT:
        raise RunError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT}")
    optim.update(meta.pop("optim_scalars", {}))
    return model, optim, meta


def step_path(folder: Path, global_step: int) -> Path:
    return folder / f"step-{global_step:09d}.npz"


def list_checkpoints(folder: Path) -> list[Path]:
    """Rolling checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name))


def prune(folder: Path, keep: int) -> None:
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)


def load_latest(run_dir: Path, log: Callable[[str], None], rename: bool = True) -> tuple[Path, State] | None:
    """The newest rolling checkpoint that loads, with its state; None when there is none.
    Each newer one that does not load is reported in one log line and, with `rename` (only
    `--resume`, which owns the locked folder; read-only commands change nothing), renamed to
    `<name>.damaged` (kept for inspection, out of the way of pruning and later resumes)."""
    for path in reversed(list_checkpoints(run_dir / "checkpoints")):
        try:
            return path, load(path)
        except RunError as exc:
            if not rename:
                log(f"skipped {exc}")
                continue
            aside = path.with_name(path.name + ".damaged")
            path.replace(aside)
            log(f"skipped {exc}; renamed to {aside.name}")
    return None


def resume_point(run_dir: Path, log: Callable[[str], None]) -> tuple[Path, State] | None:
    """What `--resume` continues from (load_latest), after removing the temporary files a
    killed run left behind; call it only with the run folder locked."""
    for folder in (run_dir, run_dir / "checkpoints"):
        remove_stale_temp_files(folder)
    return load_latest(run_dir, log)


def find(run_dir: Path, which: str = "last") -> Path:
    """The checkpoint file for 'last', 'best', or a path."""
    folder = run_dir / "checkpoints"
    if which == "last":
        ckpts = list_checkpoints(folder)
        if not ckpts:
            raise RunError(f"{run_dir}: no checkpoint (looked in {folder})")
        return ckpts[-1]
    if which == "best":
        p = folder / "best.npz"
        if not p.exists():
            raise RunError(f"{run_dir}: no best checkpoint ({p} is missing)")
        return p
    p = Path(which)
    if not p.exists():
        raise RunError(f"checkpoint {which!r} not found (use best, last or a path)")
    return p


@contextlib.contextmanager
def disk_full_keeps_last(run_dir: Path) -> Iterator[None]:
    """Add to a DiskFullError what was kept and how to go on: the newest rolling checkpoint
    (only complete files carry that name: writes go through a temporary file)."""
    try:
        yield
    except DiskFullError as exc:
        good = list_checkpoints(run_dir / "checkpoints")
        kept = f"kept the last good checkpoint {good[-1]}" if good else "no checkpoint was saved yet"
        raise DiskFullError(f"{exc}; {kept}; free some space, then: gpuml train --resume {run_dir}") from None


def finished_summary(run_dir: Path, epoch: int, epochs: int) -> dict[str, Any] | None:
    """The run's summary.json when it already reached its end at `epoch` (all `epochs`, or
    stopped early there); None when training is left to do (or the summary is unreadable,
    so finishing again rewrites it)."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    done = epoch >= epochs or summary.get("stopped_early")
    return summary if done and summary.get("epochs") == epoch else None
