"""Datasets in memory (`load_dataset`: registered ones, or the user's npz/IDX files) and batches
on a device (`BatchIterator`)."""

from __future__ import annotations

import functools
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpuml.backend.base import Array, Backend
from gpuml.data.datasets import FILE_KEYS, DatasetSpec, fetch_dataset, read_verified
from gpuml.data.search import NPZ_TO_FILE_KEY, read_keras_npz
from gpuml.data.user import IDX_KEYS, NPZ_KEYS, check_arrays, expand_user, read_idx_files, read_npz
from gpuml.distributed.shard import shard_bounds
from gpuml.errors import ConfigError, DataError


@dataclass(frozen=True)
class Split:
    """images uint8 (N, C, H, W) or flat (N, features) in 0..255, labels int64 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset. `mean`/`std` are over every pixel of `train`, in [0, 1] units, for
    normalising x = (pixel / 255 - mean) / std. `val` is None when val_split is 0. `files` says
    where the data came from (key -> path), for run.json."""

    spec: DatasetSpec
    folder: Path
    train: Split
    val: Split | None
    test: Split
    mean: float
    std: float
    files: Mapping[str, str] = field(default_factory=dict)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.spec.classes

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes


#: `data.dataset` values that read the user's own files instead of a registered dataset.
USER_DATASETS = ("npz", "idx")


def _unreadable_is_data_error(load: Callable[..., Dataset]) -> Callable[..., Dataset]:
    """A folder or file without read permission becomes one DataError naming it, wherever the
    search or a reader trips on it (a stat in a folder without search permission raises
    PermissionError from Path.is_file, not False)."""

    @functools.wraps(load)
    def wrapper(*args: Any, **kwargs: Any) -> Dataset:
        try:
            return load(*args, **kwargs)
        except PermissionError as exc:
            what = exc.filename or "a dataset file or folder"
            raise DataError(f"{what}: permission denied; make it and the folders above it readable, "
                            f"or point data.root or $GPUML_DATA at a readable copy") from None

    return wrapper


@_unreadable_is_data_error
def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    val_split: int | float = 0,
    download: bool = True,
    *,
    verify: bool = True,
    progress: bool | None = None,
    path: str | os.PathLike[str] | None = None,
    paths: Mapping[str, str | os.PathLike[str] | None] | None = None,
    classes: Sequence[str] | None = None,
) -> Dataset:
    """Load `name` (finding or downloading its files, see gpuml.data.datasets), or the user's
    own data: name "npz" reads the Keras-layout file `path`, name "idx" the four IDX files in
    `paths` (keys train_images, train_labels, test_images, test_labels); see gpuml.data.user.

    limit: keep the first `limit` training samples (the test set is untouched).
    val_split: validation samples taken from the end of the (limited) training set: an int
    count, or a float fraction in (0, 1). verify: check each file's content hash.
    classes: class names of npz/idx data (default: a `classes` array in the npz, else "0".."k-1").
    """
    if name in USER_DATASETS:
        spec, folder, train, test, origin = _load_user(name, path, paths, classes)
    else:
        if path is not None or paths or classes is not None:
            raise ConfigError(f"data.path, data.paths and data.classes are for data.dataset npz or "
                              f"idx; {name!r} is a registered dataset (use data.root to point at it)")
        files = fetch_dataset(name, root, download=download, progress=progress)
        spec = files.spec
        if files.npz is not None:  # Keras's cached mnist.npz
            raw = {k: f.raw_sha256 for k, f in spec.files.items()}
            arrays = read_keras_npz(files.npz, raw, verify=verify)
            where = {k: f"{files.npz}: {n}" for n, k in NPZ_TO_FILE_KEY.items()}
            origin = {"path": str(files.npz)}
        else:
            arrays = {k: read_verified(files.paths[k], spec.files[k], verify=verify) for k in FILE_KEYS}
            where = dict(files.paths)
            origin = {k: str(p) for k, p in files.paths.items()}
        train = _as_split(spec, where, arrays["train_images"], arrays["train_labels"], "train")
        test = _as_split(spec, where, arrays["test_images"], arrays["test_labels"], "test")
        folder = files.folder

    n = len(train)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
            raise ConfigError(f"data.limit must be a positive integer, got {limit!r}")
        if limit > n:
            raise ConfigError(f"data.limit={limit} exceeds the {n} training samples of {spec.name}")
        n = int(limit)
    n_val = _val_count(val_split, n, limited=limit is not None)
    val = Split(train.images[n - n_val : n], train.labels[n - n_val : n]) if n_val else None
    train = Split(train.images[: n - n_val], train.labels[: n - n_val])
    mean, std = pixel_stats(train.images)
    return Dataset(spec, folder, train, val, test, mean, std, origin)


def load_dataset_config(data: Mapping[str, Any], *, progress: bool | None = None) -> Dataset:
    """load_dataset for a resolved config's `data` section."""
    paths = data.get("paths") or {}
    return load_dataset(
        data["dataset"], data["root"], data["limit"], data["val_split"], data["download"],
        progress=progress, path=data.get("path"), classes=data.get("classes"),
        paths={k: v for k, v in paths.items() if v is not None} or None,
    )


def _load_user(
    name: str, path: str | os.PathLike[str] | None,
    paths: Mapping[str, str | os.PathLike[str] | None] | None, classes: Sequence[str] | None,
) -> tuple[DatasetSpec, Path, Split, Split, dict[str, str]]:
    if name == "npz":
        if path is None:
            raise ConfigError("data.dataset npz needs data.path: a .npz file holding "
                              + ", ".join(NPZ_KEYS))
        file = expand_user(path, "data.path").resolve()
        arrays, npz_classes = read_npz(file)
        where = {k: f"{file}: {k}" for k in NPZ_KEYS} | {"classes": f"{file}: classes"}
        if classes is not None:
            where["classes"] = "data.classes"
        x = [arrays[k] for k in NPZ_KEYS]
        folder, origin = file.parent, {"path": str(file)}
        classes = classes if classes is not None else npz_classes
    else:
        files = {k: expand_user(str(v), f"data.paths.{k}").resolve() for k, v in (paths or {}).items() if v}
        unknown = sorted(set(files) - set(IDX_KEYS))
        if unknown:
            raise ConfigError(f"data.paths: unknown key {unknown[0]!r} (expected {', '.join(IDX_KEYS)})")
        arrays = read_idx_files(files)
        keys = dict(zip(NPZ_KEYS, IDX_KEYS))
        where = {k: str(files[keys[k]]) for k in NPZ_KEYS} | {"classes": "data.classes"}
        x = [arrays[k] for k in IDX_KEYS]
        folder, origin = files["train_images"].parent, {k: str(files[k]) for k in IDX_KEYS}
    xtr, ytr, xte, yte, names = check_arrays(*x, classes, where)
    spec = DatasetSpec(name=name, files={}, mirrors=(), classes=names, shape=tuple(xtr.shape[1:]))
    return spec, folder, Split(xtr, ytr), Split(xte, yte), origin


def _as_split(
    spec: DatasetSpec, paths: Mapping[str, Path | str], images: np.ndarray, labels: np.ndarray, which: str
) -> Split:
    """Check shapes, dtypes and label range (verify=False skips the hashes, not this)."""
    ipath, lpath = paths[f"{which}_images"], paths[f"{which}_labels"]
    if images.dtype != np.uint8 or images.ndim < 2 or math.prod(images.shape[1:]) != math.prod(spec.shape):
        raise DataError(
            f"{ipath}: expected uint8 images of {spec.shape}, got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{lpath}: expected a 1-D integer label array, got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
        raise DataError(f"{lpath}: {len(labels)} labels for the {len(images)} images in {ipath}")
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(
            f"{lpath}: labels span {labels.min()}..{labels.max()}, expected 0..{spec.num_classes - 1}"
        )
    return Split(images.reshape((len(images), *spec.shape)), labels.astype(np.int64))


def _val_count(val_split: int | float, n: int, limited: bool = False) -> int:
    if isinstance(val_split, bool) or not isinstance(val_split, numbers.Real):
        raise ConfigError(f"data.val_split must be a count or a fraction, got {val_split!r}")
    if isinstance(val_split, numbers.Integral):
        count = int(val_split)
        if count < 0:
            raise ConfigError(f"data.val_split must not be negative, got {count}")
    else:
        if not 0.0 <= val_split < 1.0:
            raise ConfigError(f"data.val_split as a fraction must be in [0, 1), got {val_split}")
        count = round(val_split * n)
        if val_split > 0 and count == 0:
            raise ConfigError(f"data.val_split={val_split} of {n} training samples is 0 samples; "
                              "set data.val_split: 0 for no validation split, or a count")
    if count >= n:
        of = f"the {n} training samples" + (f" (data.limit={n})" if limited else "")
        raise ConfigError(
            f"data.val_split={val_split} takes {count} of {of}, leaving none to train on; "
            f"set a fraction instead (e.g. --set data.val_split=0.1) or a count below {n}"
        )
    return count


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """(mean, std) of uint8 pixels in [0, 1] units, exact, from a 256-bin histogram."""
    if images.size == 0:
        raise DataError("cannot compute pixel statistics of an empty training set")
    flat = images.reshape(-1)
    counts = np.zeros(256, dtype=np.int64)
    # In chunks: bincount converts its input to intp, 8 bytes per pixel.
    for i in range(0, flat.size, 1 << 20):
        counts += np.bincount(flat[i : i + (1 << 20)], minlength=256)
    counts = counts.astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum()
    mean = float(counts @ values / total)
    var = float(counts @ (values - mean) ** 2 / total)
    return mean, math.sqrt(var)


class BatchIterator:
    """Batches of one split on a backend.

    The split is copied to the device once (images uint8, labels int32). Each epoch draws a
    permutation from `rng` (when shuffling) and sends it to the device once; each batch is then
    a slice of that index array gathered by `backend.gather_batch` into an output buffer kept per
    batch size, so the same (x, y) arrays come back every step: use them before the next one.

    Iterating yields the rest of the current epoch, starting a new one when it is complete.
    `state_dict()` / `load_state_dict()` capture the position exactly: the rng state before the
    epoch's permutation was drawn, and how many of its batches were handed out. The iterator
    owns `rng` from then on; drawing from it elsewhere changes the permutations.
    """

    def __init__(
        self,
        backend: Backend,
        split: Split,
        batch_size: int,
        *,
        mean: float,
        std: float,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """`shard` (rank, ranks): batch_size is the global batch, of which this iterator yields
        rank's contiguous part (gpuml.distributed.shard_bounds); the permutation is the same on
        every rank (same rng seed), so the ranks' parts tile each global batch."""
        n = len(split)
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if shuffle and rng is None:
            raise ValueError("shuffle=True needs rng, a numpy.random.Generator seeded from the run seed")
        if n == 0 or (drop_last and n < batch_size):
            raise ConfigError(f"batch_size {batch_size} with drop_last leaves no batch from {n} samples")
        if not std > 0:
            raise DataError(f"pixel std must be positive, got {std} (all training pixels equal?)")
        self.backend = backend
        self.batch_size = int(batch_size)
        self.mean, self.std = float(mean), float(std)
        self.shuffle, self.drop_last, self.rng = shuffle, drop_last, rng
        self.num_samples = n
        self.shard = shard
        #: rows of the last global batch handed out, and where this rank's part of it starts
        self.batch_rows, self.shard_start = 0, 0
        self.images = backend.asarray(np.ascontiguousarray(split.images), dtype=np.uint8)
        self.labels = backend.asarray(split.labels.astype(np.int32), dtype=np.int32)
        self._buffers: dict[int, tuple[Array, Array]] = {}
        self._sample_shape = tuple(split.images.shape[1:])
        self._epoch = 0
        self._cursor = 0
        self._epoch_rng_state: dict[str, Any] | None = None
        self._order: Array | None = None
        if not shuffle:
            self._order = backend.asarray(np.arange(n, dtype=np.int64), dtype=np.int64)

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    @property
    def epoch(self) -> int:
        """Epochs started so far (1 during the first)."""
        return self._epoch

    @property
    def cursor(self) -> int:
        """Batches of the current epoch already handed out."""
        return self._cursor

    def __iter__(self) -> Iterator[tuple[Array, Array]]:
        if self._epoch == 0 or self._cursor >= len(self):
            self._start_epoch()
        while self._cursor < len(self):
            start = self._cursor * self.batch_size
            stop = min(start + self.batch_size, self.num_samples)
            lo, hi = shard_bounds(stop - start, *self.shard)
            self.batch_rows, self.shard_start = stop - start, lo
            # Counted before the yield: a checkpoint taken while the caller holds batch k
            # resumes at batch k + 1.
            self._cursor += 1
            yield self._gather(start + lo, start + hi)

    def _start_epoch(self) -> None:
        if self.shuffle:
            assert self.rng is not None
            self._epoch_rng_state = self.rng.bit_generator.state
            self._set_order(self.rng.permutation(self.num_samples))
        self._epoch += 1
        self._cursor = 0

    def _set_order(self, perm: np.ndarray) -> None:
        # One device buffer for every epoch's permutation: a captured training step reads it by
        # its address, so later epochs are uploaded into it.
        if self._order is None:
            self._order = self.backend.asarray(perm, dtype=np.int64)
        else:
            self.backend.upload_(self._order, perm)

    def _batch_buffers(self, size: int) -> tuple[Array, Array]:
        if size not in self._buffers:
            self._buffers[size] = (
                self.backend.empty((size, *self._sample_shape)),
                self.backend.empty((size,), dtype=np.int32),
            )
        return self._buffers[size]

    def _gather(self, start: int, stop: int) -> tuple[Array, Array]:
        out_x, out_y = self._batch_buffers(stop - start)
        return self.backend.gather_batch(
            self.images, self.labels, self._order, start=start, count=stop - start,
            mean=self.mean, std=self.std, out_x=out_x, out_y=out_y,
        )

    # The training step's path (gpuml/train/step.py): the step gathers its own batch from a
    # device cursor, so that a captured CUDA graph of it walks the permutation by itself.
    def batch_sizes(self, *, rest_of_epoch: bool = True) -> list[int]:
        """Sizes of the batches left in the current epoch (the next epoch's when it is complete;
        its permutation is then drawn and uploaded), or of every batch when not `rest_of_epoch`."""
        first = 0
        if rest_of_epoch:
            if self._epoch == 0 or self._cursor >= len(self):
                self._start_epoch()
            first = self._cursor
        b = self.batch_size
        return [min(b, self.num_samples - k * b) for k in range(first, len(self))]

    def advance(self) -> None:
        """Count one batch of batch_sizes() as handed out (before its step: a checkpoint taken
        during it resumes at the next)."""
        self._cursor += 1

    def gather_at(self, start_counter: Array, size: int, start: int = 0) -> tuple[Array, Array]:
        """The batch of `size` rows at permutation position start + start_counter[0] (a device
        counter, read on the device), in the buffers kept for that size."""
        out_x, out_y = self._batch_buffers(size)
        return self.backend.gather_batch(
            self.images, self.labels, self._order, start=start, start_counter=start_counter,
            count=size, mean=self.mean, std=self.std, out_x=out_x, out_y=out_y,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints, strings, dicts) describing the position, for checkpoints."""
        return {
            "epoch": self._epoch,
            "cursor": self._cursor,
            "rng_state": self._epoch_rng_state,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Return to the position `state_dict()` recorded: the next batch is the one that would
        have come next, and later epochs draw the same permutations."""
        for key in ("num_samples", "batch_size", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume the data position: {key} was {state[key]!r}, now {getattr(self, key)!r}"
                )
        if not 0 <= state["cursor"] <= len(self) or state["epoch"] < 0:
            raise DataError(f"cannot resume the data position: invalid state {state!r}")
        self._epoch, self._cursor = int(state["epoch"]), int(state["cursor"])
        if self.shuffle and self._epoch > 0:
            if state["rng_state"] is None:
                raise DataError("cannot resume the data position: the rng state is missing")
            assert self.rng is not None
            # Redrawing the permutation also leaves the generator where the original run had it.
            self.rng.bit_generator.state = state["rng_state"]
            self._epoch_rng_state = state["rng_state"]
            self._set_order(self.rng.permutation(self.num_samples))
