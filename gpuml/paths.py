"""Where the CUDA sources and seed configs are: the repository checkout (editable install or
PYTHONPATH) or <prefix>/share/gpuml (a regular install, see pyproject's data-files)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _first_existing(sub: str, marker: str) -> Path:
    candidates = [_REPO_ROOT / sub, Path(sys.prefix) / "share" / "gpuml" / sub]
    for c in candidates:
        if (c / marker).exists():
            return c
    return candidates[0]


def kernel_dir() -> Path:
    """Folder holding kernels/*.cu; $GPUML_KERNELS overrides."""
    env = os.environ.get("GPUML_KERNELS")
    if env:
        return Path(env)
    return _first_existing("kernels", "common.cuh")


def config_dir() -> Path:
    """Folder holding the seed configs (mlp.yaml, cnn.yaml, ...)."""
    return _first_existing("configs", "mlp.yaml")
