"""Shared fixtures: where Fashion-MNIST is, and the `gpu` marker's clean skip."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def _fashion_dirs() -> list[Path]:
    env = os.environ.get("GPUML_DATA")
    dirs = [Path(env) / "fashion-mnist", Path(env) / "fashion_mnist", Path(env)] if env else []
    return dirs + [REPO.parent / "shared" / "datasets" / "fashion-mnist",
                   Path("/usr/share/datasets/fashion-mnist")]


@pytest.fixture(scope="session")
def fashion_root() -> Path:
    """Folder holding the real Fashion-MNIST IDX files; the test skips when there is none."""
    for d in _fashion_dirs():
        if (d / "train-images-idx3-ubyte.gz").exists() or (d / "train-images-idx3-ubyte").exists():
            return d
    pytest.skip("Fashion-MNIST not found (set GPUML_DATA to a folder holding fashion-mnist/)")


@pytest.fixture(scope="session")
def fashion_small(fashion_root: Path):
    """Fashion-MNIST limited to 1,200 training images (200 for validation), loaded once."""
    from gpuml.data.loader import load_dataset

    return load_dataset("fashion_mnist", root=fashion_root, limit=1200, val_split=200, download=False)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cuda-emulator", action="store_true",
                     help="run on tests/cuda_emulator: CuPy emulated on the CPU, kernels built with g++ (not a GPU)")


def required_modules() -> list[str]:
    """CI sets GPUML_REQUIRE=torch,onnx,... (.ci/run installs them): there the tests that need
    those optional modules (the PyTorch comparisons, ONNX export, TensorBoard files, the JSON
    Schema) must run, so a missing one is an error instead of a silent skip."""
    return [m.strip() for m in os.environ.get("GPUML_REQUIRE", "").split(",") if m.strip()]


def pytest_configure(config: pytest.Config) -> None:
    import importlib

    for name in required_modules():
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise pytest.UsageError(f"GPUML_REQUIRE names {name}, which does not import ({exc}); "
                                    "see .ci/run for how CI installs it") from exc
    if config.getoption("--cuda-emulator"):
        sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emulator"))
        config.pluginmanager.import_plugin("cuda_emulator_plugin")


def _cuda_ok() -> bool:
    from gpuml.backend import cuda_status

    return cuda_status()[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not any("gpu" in item.keywords for item in items):
        return
    if _cuda_ok():
        return
    skip = pytest.mark.skip(reason="needs CuPy and a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
