"""The run folder's description files: config.yaml (the resolved config) and run.json (what
predict and export need without loading the dataset). Of data-parallel ranks, rank 0 alone
writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuml.data.atomic import atomic_write
from gpuml.distributed import world
from gpuml.train.config import dump_config

if TYPE_CHECKING:
    from gpuml.train.trainer import Trainer


def write_config(run_dir: Path, cfg: dict[str, Any]) -> None:
    if not world().is_root:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(run_dir / "config.yaml") as f:
        f.write(dump_config(cfg).encode())


def write_run_info(run_dir: Path, trainer: Trainer) -> None:
    """run.json: what predict/export need without loading the dataset (normalisation, input
    shape, class names)."""
    from gpuml import __version__

    if not trainer.dist.is_root:
        return
    normalize = trainer.cfg["data"]["normalize"]
    info = {
        "gpuml_version": __version__,
        "dataset": trainer.data.spec.name,
        "data_files": dict(trainer.data.files),
        "classes": list(trainer.data.classes),
        "input_shape": list(trainer.model.input_shape),
        "mean": trainer.data.mean if normalize else 0.0,
        "std": trainer.data.std if normalize else 1.0,
        "world_size": trainer.dist.size,  # data-parallel ranks of the (latest) session
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(run_dir / "run.json") as f:
        f.write(json.dumps(info, indent=2).encode())
