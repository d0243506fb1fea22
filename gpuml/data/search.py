"""Where other tools keep the datasets gpuml knows: the XDG cache, Keras's cache and
torchvision's folder layout. Used by gpuml.data.datasets' search order; nothing here downloads.

Keras (keras.utils.get_file) caches under `$KERAS_HOME/datasets`, default `~/.keras/datasets`:
MNIST as one `mnist.npz` (x_train, y_train, x_test, y_test, uint8), Fashion-MNIST as the four
published `.gz` files in `fashion-mnist/`. torchvision keeps the IDX files, `.gz` and extracted,
in `<root>/<ClassName>/raw` (`MNIST`, `FashionMNIST`) under the root the user passes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpuml.data.idx import idx_sha256
from gpuml.data.user import NPZ_KEYS, expand_user, read_npz
from gpuml.errors import DataError

if TYPE_CHECKING:
    from gpuml.data.datasets import DatasetSpec

#: npz array -> registry file key
NPZ_TO_FILE_KEY = dict(zip(NPZ_KEYS, ("train_images", "train_labels", "test_images", "test_labels")))


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME when set to an absolute path (the XDG spec says to ignore relative
    ones), else ~/.cache."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"


def keras_datasets_dir() -> Path:
    """Keras's dataset cache: $KERAS_HOME/datasets, default ~/.keras/datasets."""
    home = os.environ.get("KERAS_HOME")
    return (expand_user(home, "$KERAS_HOME") if home else Path.home() / ".keras") / "datasets"


def torchvision_dirs(spec: DatasetSpec, root: Path) -> list[Path]:
    """`root/<Name>/raw` for a torchvision root, and `root/raw` when root is `<Name>` itself."""
    if not spec.torchvision:
        return []
    return [root / spec.torchvision / "raw", root / "raw"] if root.name == spec.torchvision else [
        root / spec.torchvision / "raw"]


def read_keras_npz(path: Path, raw_sha256: Mapping[str, str], *, verify: bool = True) -> dict[str, np.ndarray]:
    """The four arrays of a Keras-cache npz keyed like the registry's files. With `verify`,
    each must be the published data: its IDX encoding (labels as uint8) must hash to the
    registry's raw_sha256 of the matching file."""
    arrays, _ = read_npz(path)
    out = {}
    for name, key in NPZ_TO_FILE_KEY.items():
        a = arrays[name]
        if a.dtype.kind in "iu" and a.dtype != np.uint8 and a.size and 0 <= a.min() and a.max() <= 255:
            a = a.astype(np.uint8)  # Keras versions differ in the label dtype; the values are what count
        if verify and _idx_hash(a) != raw_sha256[key]:
            raise DataError(
                f"{path}: {name} is not the published data (its sha256 as IDX is not "
                f"{raw_sha256[key]}); move the file aside or set data.root to the IDX files"
            )
        out[key] = a
    return out


def _idx_hash(a: np.ndarray) -> str | None:
    try:
        return idx_sha256(a)
    except ValueError:  # a dtype IDX cannot hold: not the published data
        return None
