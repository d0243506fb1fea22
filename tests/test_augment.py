"""Augmentation: the CPU implementation against an independent NumPy reference of the contract
in gpuml/backend/augment.py, exact special cases (identity, flips), reproducibility, and the
trainer using it (labels and shapes kept, run reproducible from the seed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpuml.backend.augment import sample_params
from gpuml.backend.cpu import CpuBackend
from gpuml.backend.rng import uniform

BE = CpuBackend(dtype="float64")
KW = dict(max_shift=3.0, max_rotate=20.0, max_scale=0.15, hflip=True)


def reference(x: np.ndarray, seed: int, offset: int, max_shift: float, max_rotate: float, max_scale: float,
              hflip: bool, fill: float) -> np.ndarray:
    """Straight from the contract, vectorised per sample (no numba)."""
    n, c, h, w = x.shape
    out = np.empty_like(x)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    oy, ox = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for b in range(n):
        u = uniform(seed, np.arange(offset + 5 * b, offset + 5 * b + 5, dtype=np.uint64))
        ang = np.pi * (2 * u[0] - 1) * (max_rotate / 180)
        s = 1 + (2 * u[1] - 1) * max_scale
        tx, ty = (2 * u[2] - 1) * max_shift, (2 * u[3] - 1) * max_shift
        px, py = ox - cx - tx, oy - cy - ty
        qx = (np.cos(ang) * px + np.sin(ang) * py) / s
        qy = (-np.sin(ang) * px + np.cos(ang) * py) / s
        if hflip and u[4] < 0.5:
            qx = -qx
        sx, sy = qx + cx, qy + cy
        x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
        fx, fy = sx - x0, sy - y0
        padded = np.full((c, h + 4 + 2 * h, w + 4 + 2 * w), fill)  # generous border of `fill`
        padded[:, h + 2:2 * h + 2, w + 2:2 * w + 2] = x[b]

        def at(yy, xx, padded=padded):
            yy = np.clip(yy + h + 2, 0, padded.shape[1] - 1)
            xx = np.clip(xx + w + 2, 0, padded.shape[2] - 1)
            return padded[:, yy, xx]

        out[b] = ((1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1))
                  + fy * ((1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)))
    return out


def test_matches_reference_on_odd_shapes() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 11, 8))
    got = BE.augment_images(x, seed=7, offset=123, fill=-0.5, out=np.full_like(x, np.nan), **KW)
    assert np.allclose(got, reference(x, 7, 123, fill=-0.5, **KW), rtol=1e-12, atol=1e-12)


def test_identity_and_flip_are_exact() -> None:
    x = np.random.default_rng(1).standard_normal((6, 1, 9, 7))
    same = BE.augment_images(x, seed=1, offset=0, max_shift=0, max_rotate=0, max_scale=0, hflip=False, fill=0.0)
    assert np.array_equal(same, x)
    flipped = BE.augment_images(x, seed=1, offset=0, max_shift=0, max_rotate=0, max_scale=0, hflip=True, fill=0.0)
    flips = sample_params(1, 0, 6, 0, 0, 0, True)[:, 4] > 0.5
    assert 0 < flips.sum() < 6  # this seed flips some and keeps some
    for b in range(6):
        assert np.array_equal(flipped[b], x[b, :, :, ::-1] if flips[b] else x[b])


def test_reproducible_from_seed_and_offset() -> None:
    x = np.random.default_rng(2).standard_normal((4, 1, 10, 10))
    a = BE.augment_images(x, seed=3, offset=5 << 32, fill=0.0, **KW)
    b = BE.augment_images(x, seed=3, offset=5 << 32, fill=0.0, **KW)
    c = BE.augment_images(x, seed=3, offset=6 << 32, fill=0.0, **KW)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_rejects_aliasing_and_wrong_rank() -> None:
    from gpuml.errors import ShapeError

    x = np.zeros((2, 1, 4, 4))
    with pytest.raises(ShapeError, match="augment_images"):
        BE.augment_images(x, seed=0, offset=0, fill=0.0, out=x, **KW)
    with pytest.raises(ShapeError, match="augment_images"):
        BE.augment_images(np.zeros((2, 16)), seed=0, offset=0, fill=0.0, **KW)


def test_trainer_with_augmentation_is_reproducible(tmp_path: Path, fashion_root: Path) -> None:
    from tests.test_trainer import gpuml, metrics, tiny_config

    layers = [{"type": "conv2d", "filters": 4, "kernel": 3, "activation": "relu"}, {"type": "maxpool2d", "size": 2},
              {"type": "flatten"}, {"type": "dense", "units": 10}]
    aug = {"dataset": "fashion_mnist", "root": str(fashion_root), "limit": 1000, "val_split": 200,
           "augment": {"shift": 2, "rotate": 10.0, "scale": 0.1}}
    cfg = tiny_config(tmp_path, fashion_root, trainer__epochs=2, model={"layers": layers}, data=aug)
    gpuml("train", cfg, "--out", tmp_path / "a", "--no-progress")
    gpuml("train", cfg, "--out", tmp_path / "b", "--no-progress")
    ma, mb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert ma == mb and ma[-1]["train_loss"] < ma[0]["train_loss"]
    plain = tiny_config(tmp_path, fashion_root, trainer__epochs=2, model={"layers": layers},
                        data={**aug, "augment": {}})
    gpuml("train", plain, "--out", tmp_path / "c", "--no-progress")
    assert metrics(tmp_path / "c")[0]["train_loss"] != ma[0]["train_loss"]  # augmentation changed the inputs
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["test_accuracy"] > 0.5
