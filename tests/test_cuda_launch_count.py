"""Kernel launches per training step of the two seed models (configs/mlp.yaml, configs/cnn.yaml:
their real layers, optimizer and loss) on the CUDA backend, counted by the backend's launcher
(CudaBackend.launch_count) over one eager step after a first one. At batch 32 a step is
launch-bound, so these counts are a performance contract (issue 9: at most 12 and 20); the
fusions that reach them are checked against the CPU reference in tests/test_cuda_fusions.py.

The data is a few random 28x28 images (no dataset files): the count depends on the layer
shapes and the batch size only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.gpu_util import GPU

pytestmark = GPU

#: the issue-9 targets
MAX_LAUNCHES = {"mlp": 12, "cnn": 20}
#: what the step launches now (25 and 33 before the fusions of issue 9):
#: mlp: gather, 3 dense GEMMs (split-K reduced in-launch), softmax_xent (loss mean, metric sums),
#:      dW+db and dx+ReLU-mask GEMMs of dense 3 and 2, dW+db of dense 1, adam, counter bump
#: cnn: gather, conv, pool, conv, pool, 2 dense GEMMs, softmax_xent; 2 GEMMs per dense layer,
#:      pool bwd, conv2 dW+db (ReLU mask in its gathers) and dx, pool bwd, conv1 dW+db, adam,
#:      counter bump
LAUNCHES = {"mlp": 12, "cnn": 19}


def _dataset(n: int):
    from gpuml.data.datasets import DatasetSpec
    from gpuml.data.loader import Dataset, Split, pixel_stats

    rng = np.random.default_rng(0)
    train = Split(rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n))
    test = Split(train.images[:8], train.labels[:8])
    spec = DatasetSpec("random", {}, (), tuple(str(i) for i in range(10)), (1, 28, 28))
    return Dataset(spec, Path("."), train, None, test, *pixel_stats(train.images))


def _launches(model: str, tmp_path: Path) -> int:
    from gpuml.benchmark.train import bench_config, step_launches
    from gpuml.train.trainer import Trainer

    cfg = bench_config(model, "cuda", 32, 1, None)
    cfg["trainer"]["cuda_graph"] = "off"  # count what the step launches, not a graph replay
    trainer = Trainer(cfg, tmp_path / model, log=lambda msg: None, dataset=_dataset(96))
    count = step_launches(trainer)
    assert count is not None
    return count


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_seed_model_step_launch_count(model: str, tmp_path: Path) -> None:
    count = _launches(model, tmp_path)
    assert count <= MAX_LAUNCHES[model], f"{model}: {count} launches per step"
    assert count == LAUNCHES[model], f"{model}: {count} launches per step (update the breakdown above)"
