"""A user's own data: a Keras-layout `.npz` (`data.dataset: npz`) or four IDX files
(`data.dataset: idx`), checked and converted to the layout every split has (see `Split`).

Images. (N, H, W) is one channel; (N, H, W, C) (channels last, Keras's layout) or (N, C, H, W)
with C 1 or 3 become (N, C, H, W); a 4-D array whose axes 1 and 3 could both be channels, such as
(N, 3, 8, 3), is read channels last. (N, features) stays flat, for dense-only models. gpuml
stores training inputs as 8-bit values: uint8 (or any integer type) holds 0..255; float arrays
must hold values in [0, 1] that are exact multiples of 1/255 (for example `x_uint8 / 255`), else
the loader refuses them rather than round them silently.

Labels. (N,) or (N, 1) integers (a float array of whole numbers is accepted), 0 <= label; with
class names given (`data.classes`, or a `classes` array in the npz) each label must be below
their number, else the number of classes is the largest label + 1 over train and test.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from gpuml.data.atomic import atomic_write
from gpuml.data.idx import read_idx
from gpuml.errors import DataError

#: Arrays of a Keras-layout npz file (keras.datasets.mnist.load_data's mnist.npz).
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
#: The four IDX files of `data.dataset: idx`, as keys of `data.paths`.
IDX_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
_CHANNELS = (1, 3)
#: Without class names the class count is the largest label + 1: bounded, so that one stray
#: label (say 10**9) is an error, not a billion-class output layer and name list.
MAX_INFERRED_CLASSES = 65536


def expand_user(path: str | os.PathLike[str], what: str = "") -> Path:
    """Path(path).expanduser(), with `~nobody/...` (an unknown user) or `~` without a home
    directory a DataError naming the path and `what` set it, not pathlib's RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise DataError(f"{path}: cannot expand '~' (no such user, or no home directory)"
                        + (f" ({what})" if what else "")) from None


def read_npz(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], tuple[str, ...] | None]:
    """(x_train, y_train, x_test, y_test arrays, class names or None) from a Keras-layout npz."""
    path = expand_user(path, "data.path")
    try:
        z = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (data.path)") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; data.path names a .npz file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        # np.load takes whatever is neither a zip nor .npy for a pickle, and says so: misleading
        why = "neither a zip archive nor a .npy array" if "pickle" in str(exc) else str(exc)
        raise DataError(f"{path}: not a readable .npz file ({why}; np.savez writes one)") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array, not an .npz archive with {', '.join(NPZ_KEYS)}")
    with z:
        missing = [k for k in NPZ_KEYS if k not in z.files]
        if missing:
            raise DataError(f"{path}: missing array{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                            f"(found {', '.join(z.files) or 'none'}; expected {', '.join(NPZ_KEYS)})")
        try:
            arrays = {k: z[k] for k in NPZ_KEYS}
            classes = z["classes"] if "classes" in z.files else None
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            # allow_pickle=False refuses object arrays with a ValueError
            raise DataError(f"{path}: cannot read its arrays ({exc})") from None
    if classes is not None:
        if classes.ndim != 1 or classes.dtype.kind not in "USiu":
            raise DataError(f"{path}: classes must be a 1-D array of names, got {classes.dtype} {classes.shape}")
        # np.array([b"cat", ...]) (dtype S) holds bytes: names, not "b'cat'"
        classes = tuple(c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c) for c in classes.tolist())
    return arrays, classes


def read_idx_files(paths: Mapping[str, str | os.PathLike[str] | None]) -> dict[str, np.ndarray]:
    """The four arrays of `data.paths` (IDX, raw or gzip), keyed like IDX_KEYS."""
    missing = [k for k in IDX_KEYS if not paths.get(k)]
    if missing:
        raise DataError(f"data.dataset idx needs data.paths.{', data.paths.'.join(missing)}")
    return {k: read_idx(expand_user(str(paths[k]), f"data.paths.{k}")) for k in IDX_KEYS}


def channels_first(x: np.ndarray, where: str) -> np.ndarray:
    """(N, C, H, W) or (N, features), a view of `x` in any accepted layout (module docstring).
    Training data and `gpuml predict` input both go through here, so an array laid out like
    the training data is read the same way in both."""
    x = np.asarray(x)
    if x.ndim == 2:
        out = x
    elif x.ndim == 3:
        out = x[:, None]
    elif x.ndim == 4 and x.shape[3] in _CHANNELS:
        out = x.transpose(0, 3, 1, 2)
    elif x.ndim == 4 and x.shape[1] in _CHANNELS:
        out = x
    elif x.ndim == 4:
        raise DataError(f"{where}: images of shape {x.shape} have neither 1 nor 3 channels first "
                        "(N, C, H, W) or last (N, H, W, C)")
    else:
        raise DataError(f"{where}: expected images (N, H, W), (N, H, W, C), (N, C, H, W) or "
                        f"features (N, F), got shape {x.shape}")
    if 0 in out.shape[1:]:
        raise DataError(f"{where}: samples of shape {out.shape[1:]} are empty")
    return out


def to_images(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 samples (N, C, H, W) or (N, features) from any accepted layout (module docstring)."""
    return np.ascontiguousarray(_as_uint8(channels_first(x, where), where))


def _as_uint8(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind in "iu":
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"{where}: integer pixels must be in 0..255, got {x.min()}..{x.max()}")
        return x.astype(np.uint8)
    if x.dtype.kind == "f":
        if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
            raise DataError(f"{where}: float values must be in [0, 1] (8-bit values / 255), "
                            f"got {np.nanmin(x):g}..{np.nanmax(x):g}")
        scaled = x.astype(np.float64) * 255.0
        steps = np.rint(scaled)
        # k / 255 rounded to the array's precision: float16 is off by up to 255 * eps / 2 (0.12)
        if np.abs(scaled - steps).max(initial=0.0) > max(1e-3, 255.0 * float(np.finfo(x.dtype).eps)):
            raise DataError(f"{where}: float values must be multiples of 1/255 (gpuml trains on 8-bit "
                            "inputs); convert with np.rint(x * 255).astype(np.uint8) if 8 bits suffice")
        return steps.astype(np.uint8)
    raise DataError(f"{where}: expected uint8, integer or float images, got dtype {x.dtype}")


def to_labels(y: np.ndarray, n: int, where: str, num_classes: int | None) -> np.ndarray:
    """int64 labels (N,), checked against the sample count `n` and `num_classes` when known."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:  # Keras's CIFAR layout
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where}: expected labels of shape (N,) or (N, 1), got {y.shape}")
    if len(y) != n:
        raise DataError(f"{where}: {len(y)} labels for {n} samples")
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if bad.size:
            raise DataError(f"{where}: labels must be integers, got {y[bad[0]].item()!r} at index {bad[0]}")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, got dtype {y.dtype}")
    # Range checks on the array as given: a uint64 label past 2**63 would wrap negative in int64.
    if y.size and y.min() < 0:
        i = int(np.argmin(y))
        raise DataError(f"{where}: labels must not be negative, got {y[i].item()} at index {i}")
    if num_classes is not None and y.size and y.max() >= num_classes:
        i = int(np.argmax(y))
        raise DataError(f"{where}: label {y[i].item()} at index {i} is out of range for the "
                        f"{num_classes} classes (0..{num_classes - 1})")
    if num_classes is None and y.size and y.max() >= MAX_INFERRED_CLASSES:
        i = int(np.argmax(y))
        raise DataError(f"{where}: label {y[i].item()} at index {i} would make {y[i].item() + 1} classes; "
                        f"without class names at most {MAX_INFERRED_CLASSES} are inferred: renumber the "
                        "labels 0..K-1 (np.unique(y, return_inverse=True)) or name the classes (data.classes)")
    return y.astype(np.int64)


def check_arrays(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
    classes: Sequence[str] | None, where: Mapping[str, str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """(train images, train labels, test images, test labels, class names), converted and
    checked; `where[k]` names array k (x_train, ...) in messages."""
    xtr, xte = to_images(x_train, where["x_train"]), to_images(x_test, where["x_test"])
    if len(xtr) == 0:
        raise DataError(f"{where['x_train']}: no training samples")
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"{where['x_test']}: test samples of shape {xte.shape[1:]} differ from the "
                        f"training samples' {xtr.shape[1:]}")
    k = len(classes) if classes is not None else None
    if k is not None and k < 1:
        raise DataError(f"{where['classes']}: the list of class names is empty")
    ytr = to_labels(y_train, len(xtr), where["y_train"], k)
    yte = to_labels(y_test, len(xte), where["y_test"], k)
    if classes is None:
        k = int(max(ytr.max(), yte.max(initial=0))) + 1
        classes = [str(i) for i in range(k)]
    return xtr, ytr, xte, yte, tuple(str(c) for c in classes)


def save_npz_dataset(
    path: str | os.PathLike[str],
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
    classes: Sequence[str] | None = None, *, compress: bool = False,
) -> Path:
    """Check the arrays as `data.dataset: npz` would read them (DataError naming x_train,
    y_train, ... otherwise), then write them in that layout: images uint8 (N, C, H, W) or
    (N, F), labels int64, `classes` as a unicode array. Atomic; returns the path."""
    path = Path(path)
    names = {k: k for k in (*NPZ_KEYS, "classes")}
    xtr, ytr, xte, yte, names_out = check_arrays(x_train, y_train, x_test, y_test, classes, names)
    arrays = {"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte,
              "classes": np.array(names_out, dtype=str)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        (np.savez_compressed if compress else np.savez)(f, **arrays)
    return path
