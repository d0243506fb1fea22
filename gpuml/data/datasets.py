"""The dataset registry: which files make up each dataset, where to look for them on disk, and
how to download and verify them when they are nowhere to be found.

Lookup order for the folder holding the four IDX files (`.gz` or uncompressed):
  1. `data.root` (the folder itself, its `<name>` / `<name-with-dashes>` subfolder, or
     torchvision's `<root>/FashionMNIST/raw`, `<root>/MNIST/raw`)
  2. `$GPUML_DATA/<name>` (or `<name-with-dashes>`, or the torchvision layout)
  3. the user cache: `$XDG_CACHE_HOME/gpuml/<name>` when XDG_CACHE_HOME is set, else
     `~/.cache/gpuml/<name>`
  4. Keras's cache, `$KERAS_HOME/datasets` (default `~/.keras/datasets`): `fashion-mnist/` with
     the IDX files, or `mnist.npz` (read as the npz layout, checked against the same hashes)
  5. `/usr/share/datasets/<name-with-dashes>` (Debian's dataset-fashion-mnist installs there)
If none holds all four files, they are downloaded into `$GPUML_DATA/<name>` when that variable is
set, else the user cache.

Checksums. `sha256` is the hash of the published `.gz` file, checked on every download.
`raw_sha256` is the hash of the decompressed IDX bytes, checked on load: it holds for any
compression of the same data (Debian, for one, ships the Fashion-MNIST archives with a rewritten
gzip header, so their `.gz` hash differs from the mirror's) and for uncompressed copies.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import http.client
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpuml import __version__
from gpuml.data.atomic import atomic_write
from gpuml.data.idx import idx_sha256, read_idx
from gpuml.data.search import keras_datasets_dir, torchvision_dirs, user_cache_dir
from gpuml.data.user import expand_user
from gpuml.errors import ConfigError, DataError

#: The four files of every dataset, in this order.
FILE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
#: Folders searched after data.root, $GPUML_DATA and the cache, each + <name-with-dashes>.
SYSTEM_DATASET_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)
DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 16


@dataclass(frozen=True)
class DataFile:
    """One published file: `name` as on the mirrors (gzip), its size and sha256 there, and the
    sha256 of its decompressed content."""

    name: str
    size: int
    sha256: str
    raw_sha256: str

    @property
    def raw_name(self) -> str:
        return self.name.removesuffix(".gz")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: Mapping[str, DataFile]
    mirrors: tuple[str, ...]
    classes: tuple[str, ...]
    shape: tuple[int, ...] = (1, 28, 28)
    debian_package: str | None = None
    #: torchvision's folder name (`<root>/<torchvision>/raw` holds the IDX files)
    torchvision: str | None = None
    #: under Keras's `datasets/` cache: a folder of the IDX files, or a `.npz` in mnist.npz layout
    keras: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def dashed_name(self) -> str:
        return self.name.replace("_", "-")


# Fashion-MNIST. sha256 (of the .gz files on the S3 mirror) from TensorFlow Datasets,
# tensorflow_datasets/url_checksums/fashion_mnist.txt. raw_sha256 computed from the Debian
# package's copies, whose deflate streams are byte-identical to the mirror's: restoring the
# original gzip header (name and 2017-08-31 mtime) reproduces the TFDS sha256 of all four.
FASHION_MNIST = DatasetSpec(
    name="fashion_mnist",
    files={
        "train_images": DataFile(
            "train-images-idx3-ubyte.gz", 26421880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        "train_labels": DataFile(
            "train-labels-idx1-ubyte.gz", 29515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        "test_images": DataFile(
            "t10k-images-idx3-ubyte.gz", 4422102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        "test_labels": DataFile(
            "t10k-labels-idx1-ubyte.gz", 5148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    },
    # The project's own two homes: its S3 website and the files committed to its GitHub
    # repository (data/fashion, whose md5s the project README lists next to the S3 links).
    mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
             "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    debian_package="dataset-fashion-mnist",
    torchvision="FashionMNIST",
    keras="fashion-mnist",
)

# MNIST. sha256 of the .gz files from TensorFlow Datasets, url_checksums/mnist.txt (the cvdf
# mirror); the same values are published for the ossci and yann.lecun.com copies, which also
# match torchvision's md5s (f68b3c2d..., d53e105e..., 9fb629c4..., ec29112d...). No official
# raw_sha256 exists: these are the hashes of the decompressed files as published, identically,
# by several independent projects; not yet checked here against a local copy.
MNIST = DatasetSpec(
    name="mnist",
    files={
        "train_images": DataFile(
            "train-images-idx3-ubyte.gz", 9912422,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        "train_labels": DataFile(
            "train-labels-idx1-ubyte.gz", 28881,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        "test_images": DataFile(
            "t10k-images-idx3-ubyte.gz", 1648877,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        "test_labels": DataFile(
            "t10k-labels-idx1-ubyte.gz", 4542,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ),
    },
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    classes=tuple(str(d) for d in range(10)),
    torchvision="MNIST",
    keras="mnist.npz",
)

DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (FASHION_MNIST, MNIST)}


def get_spec(name: str) -> DatasetSpec:
    """The registered dataset `name`; a ConfigError with the closest names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), DATASETS, n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}{hint}"
        ) from None


@dataclass(frozen=True)
class DatasetFiles:
    """Where a dataset's files were found: `paths[key]` for each of FILE_KEYS, or one Keras
    `npz` file (then `paths` is empty)."""

    spec: DatasetSpec
    folder: Path
    paths: Mapping[str, Path]
    npz: Path | None = None


def search_places(spec: DatasetSpec, root: str | os.PathLike[str] | None = None) -> list[tuple[Path, str]]:
    """(folder, why) in lookup order, duplicates removed; a `.npz` path is a Keras npz file."""
    names = (spec.name, spec.dashed_name)
    places: list[tuple[Path, str]] = []
    if root is not None:
        base = expand_user(root, "data.root")
        places += [(base, "data.root")] + [(base / n, "data.root") for n in names]
        places += [(p, "data.root, torchvision layout") for p in torchvision_dirs(spec, base)]
    env = os.environ.get("GPUML_DATA")
    if env:
        data_dir = expand_user(env, "$GPUML_DATA")
        places += [(data_dir / n, "$GPUML_DATA") for n in names]
        places += [(p, "$GPUML_DATA, torchvision layout") for p in torchvision_dirs(spec, data_dir)]
    places.append((_cache_dir(spec), "user cache"))
    if spec.keras:
        places.append((keras_datasets_dir() / spec.keras, "Keras cache"))
    places += [(d / spec.dashed_name, "system datasets") for d in SYSTEM_DATASET_DIRS]
    seen: set[Path] = set()
    unique = []
    for folder, why in places:
        if folder not in seen:
            seen.add(folder)
            unique.append((folder, why))
    return unique


def download_dir(spec: DatasetSpec) -> Path:
    """Where missing files are downloaded: $GPUML_DATA/<name> when set, else the user cache."""
    env = os.environ.get("GPUML_DATA")
    return expand_user(env, "$GPUML_DATA") / spec.name if env else _cache_dir(spec)


def _cache_dir(spec: DatasetSpec) -> Path:
    return user_cache_dir() / "gpuml" / spec.name


def _find_in(folder: Path, spec: DatasetSpec) -> tuple[dict[str, Path], list[str]]:
    """(found paths by key, names of the missing files); the .gz name wins over the raw one."""
    found, missing = {}, []
    for key in FILE_KEYS:
        f = spec.files[key]
        hit = next((p for p in (folder / f.name, folder / f.raw_name) if p.is_file()), None)
        if hit is None:
            missing.append(f.name)
        else:
            found[key] = hit
    return found, missing


def fetch_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    timeout: float = DOWNLOAD_TIMEOUT_S,
    progress: bool | None = None,
) -> DatasetFiles:
    """Find the dataset's four files (see the module docstring for the order), downloading the
    missing ones when no folder holds them all. `progress=None` shows a bar on a terminal only.
    Raises one DataError listing every place looked at and how to get the files."""
    spec = get_spec(name)
    places = search_places(spec, root)
    notes = []
    for folder, why in places:
        if folder.suffix == ".npz":
            if folder.is_file():
                return DatasetFiles(spec, folder.parent, {}, npz=folder)
            notes.append(f"{folder} ({why}: no such file)")
            continue
        if not folder.is_dir():
            notes.append(f"{folder} ({why}: no such folder)")
            continue
        found, missing = _find_in(folder, spec)
        if not missing:
            return DatasetFiles(spec, folder, found)
        notes.append(f"{folder} ({why}: missing {', '.join(missing)})")

    if not download:
        raise _not_found(spec, notes, "downloading is disabled")
    dest = download_dir(spec)
    created = not dest.exists()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _not_found(spec, notes, f"cannot create {dest} ({exc.strerror or exc})") from None
    try:
        _download_missing(spec, dest, timeout, progress, notes)
    except DataError:
        if created:
            with contextlib.suppress(OSError):
                dest.rmdir()  # only succeeds when empty: earlier files of this run stay
        raise
    found, missing = _find_in(dest, spec)
    if missing:  # another process removed them meanwhile
        raise _not_found(spec, notes, f"{dest} lost {', '.join(missing)} after download")
    return DatasetFiles(spec, dest, found)


def _download_missing(
    spec: DatasetSpec, dest: Path, timeout: float, progress: bool | None, notes: list[str]
) -> None:
    for key in FILE_KEYS:
        f = spec.files[key]
        if (dest / f.name).is_file() or (dest / f.raw_name).is_file():
            continue
        failures = []
        for mirror in spec.mirrors:
            url = mirror.rstrip("/") + "/" + f.name
            try:
                _download(url, dest / f.name, f, timeout, progress)
                break
            except _DownloadFailed as exc:
                failures.append(f"{url}: {exc}")
        else:
            raise _not_found(spec, notes, "download failed: " + "; ".join(failures))


class _DownloadFailed(Exception):
    pass


def _download(url: str, final: Path, f: DataFile, timeout: float, progress: bool | None) -> None:
    """Stream `url` into `final`, verifying length and sha256 before the file gets its name."""
    request = urllib.request.Request(url, headers={"User-Agent": f"gpuml/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            digest, got = hashlib.sha256(), 0
            bar = tqdm(
                total=expected or f.size, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f.name, leave=False, disable=None if progress is None else not progress,
            )
            with bar, atomic_write(final) as out:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                # http.client returns a short body without complaint when the server hangs up.
                if expected is not None and got != expected:
                    raise _DownloadFailed(f"connection closed after {got} of {expected} bytes")
                if digest.hexdigest() != f.sha256:
                    raise _DownloadFailed(
                        f"sha256 mismatch for {f.name}: expected {f.sha256}, got {digest.hexdigest()}"
                    )
    except _DownloadFailed:
        raise
    except urllib.error.HTTPError as exc:
        raise _DownloadFailed(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise _DownloadFailed(str(exc.reason)) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _DownloadFailed(f"{type(exc).__name__}: {exc}") from None


def _not_found(spec: DatasetSpec, notes: list[str], reason: str) -> DataError:
    files = ", ".join(spec.files[k].name for k in FILE_KEYS)
    how = [f"download {files} from {spec.mirrors[0]} into {download_dir(spec)}"]
    if spec.debian_package:
        pkg = spec.debian_package
        how.append(f"install the Debian/Ubuntu package {pkg} (apt install {pkg})")
    how.append("point data.root or $GPUML_DATA at a folder holding them")
    return DataError(
        f"dataset {spec.name!r} not found. Looked in: {'; '.join(notes)}. {reason[0].upper()}{reason[1:]}. "
        f"To get it: {', or '.join(how)}."
    )


def read_verified(path: Path, f: DataFile, *, verify: bool = True) -> np.ndarray:
    """The array in `path` (one file of a dataset), its decompressed content checked against
    the registry's raw_sha256 when `verify`."""
    array = read_idx(path)
    if verify:
        got = idx_sha256(array)
        if got != f.raw_sha256:
            raise DataError(
                f"{path}: checksum mismatch for {f.raw_name} (sha256 of the decompressed data): "
                f"expected {f.raw_sha256}, got {got}; delete the file to download it again"
            )
    return array
