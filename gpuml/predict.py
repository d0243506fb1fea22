"""`gpuml predict`: class predictions for images in a .npy or IDX file, normalised the way the
run's training data was."""

from __future__ import annotations

import csv
import io
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gpuml.backend.base import Backend
from gpuml.data.atomic import atomic_write
from gpuml.data.user import channels_first
from gpuml.errors import DataError, GpumlError, ShapeError
from gpuml.nn.model import Sequential

#: The columns of `predict --out FILE.csv` (the --help text says the same).
CSV_COLUMNS = ("index", "class", "name", "probability")


def load_images(path: Path, input_shape: tuple[int, ...]) -> np.ndarray:
    """Images -> float64 in [0, 1] units, shaped (N, *input_shape). uint8 or any integer type
    holds 0..255, floats 0..1 (as in training data). Layouts as training reads them (channels
    last (N, H, W, C) is transposed, not reshaped), or flat (N, features) in the model's order."""
    try:
        x = _read_array(path)
    except PermissionError:  # the file, or a folder above it that cannot be searched
        raise DataError(f"{path}: permission denied (cannot read the input)") from None
    if x.dtype.kind in "iu":
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{path}: integer pixels must be in 0..255, got {x.min()}..{x.max()}")
        x = x.astype(np.float64) / 255.0
    elif x.dtype.kind == "f":
        x = x.astype(np.float64)
        # 0..255 floats would be read as 255x too bright: every prediction silently wrong
        if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise DataError(f"{path}: float images must be in [0, 1] (pixel / 255), "
                            f"got {np.nanmin(x):g}..{np.nanmax(x):g}")
    else:
        raise DataError(f"{path}: expected uint8 (0..255) or float (0..1) images, got {x.dtype}")
    return _fit_input(x, tuple(input_shape), path)


def _fit_input(x: np.ndarray, shape: tuple[int, ...], path: Path) -> np.ndarray:
    bad = ShapeError(f"{path}: images of shape {x.shape} do not fit the model input {shape}: give "
                     f"(N, {', '.join(map(str, shape))})"
                     + (f", (N, {shape[1]}, {shape[2]}, {shape[0]})" if len(shape) == 3 else "")
                     + f" or flat (N, {math.prod(shape)})")
    if x.ndim < 2 or math.prod(x.shape[1:]) != math.prod(shape):
        raise bad
    if x.ndim == 2 or len(shape) == 1:  # flat samples, or a model that takes flat ones
        return x.reshape((x.shape[0], *shape))
    try:  # read as training read its data; (N, 3, 3, 3) is channels last in both
        images = channels_first(x, str(path))
    except DataError:
        images = x
    if images.shape[1:] == shape:
        return images
    if x.shape[1:] == shape:  # (N, 3, 8, 3) for a (3, 8, 3) model: already channels first
        return x
    raise bad


def _read_array(path: Path) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: input file not found")
    if path.suffix.lower() == ".npz":  # e.g. the training data file itself
        raise DataError(f"{path}: an .npz archive; predict reads one array: a .npy file "
                        "(np.save('x.npy', x_test)) or an IDX file")
    if path.suffix.lower() == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as exc:  # EOFError: an empty file
            raise DataError(f"{path}: not a readable .npy file ({exc or 'empty'})") from None
        if not isinstance(x, np.ndarray):  # an .npz archive saved under a .npy name
            x.close()
            raise DataError(f"{path}: an .npz archive, not a .npy array")
        return x
    from gpuml.data.idx import read_idx

    return read_idx(path)


def predict_array(model: Sequential, backend: Backend, info: dict[str, Any], x01: np.ndarray,
                  batch_size: int = 1000) -> np.ndarray:
    """Softmax probabilities (N, classes) for images in [0, 1] units."""
    mean, std = info["mean"], info["std"]
    probs = []
    for i in range(0, len(x01), batch_size):
        xb = backend.asarray((x01[i:i + batch_size] - mean) / std)
        logits = backend.to_numpy(model.forward(xb, training=False)).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        probs.append(e / e.sum(axis=1, keepdims=True))
    return np.concatenate(probs) if probs else np.zeros((0, model.output_shape[0]))


def predict_file(model: Sequential, backend: Backend, info: dict[str, Any], path: Path,
                 out: Path | None, batch_size: int) -> np.ndarray:
    x = load_images(path, tuple(info["input_shape"]))
    probs = predict_array(model, backend, info, x, batch_size)
    # a model may have more outputs than the data had classes: those are named by their index
    names = list(info.get("classes") or [])
    classes = names + [str(i) for i in range(len(names), probs.shape[1])]
    pred = probs.argmax(axis=1)
    if out is None:
        try:
            for i, k in enumerate(pred):
                print(f"{i}\t{k}\t{classes[k]}\t{probs[i, k]:.4f}")
            sys.stdout.flush()
        except BrokenPipeError:
            # `gpuml predict ... | head`: the reader has what it wanted. Point stdout at
            # /dev/null so the interpreter's final flush does not raise again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return probs
    try:
        with atomic_write(out) as f:
            if out.suffix.lower() == ".npy":
                np.save(f, probs)
            else:
                text = io.StringIO(newline="")
                w = csv.writer(text)
                w.writerow(CSV_COLUMNS)
                for i, k in enumerate(pred):
                    w.writerow([i, int(k), classes[k], f"{probs[i, k]:.6f}"])
                f.write(text.getvalue().encode())
    except OSError as exc:
        raise GpumlError(f"{out}: cannot write predictions ({exc.strerror or exc})") from None
    return probs
