"""Datasets found where users already have them: $XDG_CACHE_HOME, Keras's cache (an IDX folder
or mnist.npz), torchvision's <root>/<Name>/raw. A fake HOME in tmp_path; never the real one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gpuml.data import datasets
from gpuml.data.datasets import DATASETS, FILE_KEYS, DataFile, DatasetSpec, download_dir, fetch_dataset, get_spec
from gpuml.data.idx import idx_sha256, write_idx
from gpuml.data.loader import load_dataset
from gpuml.errors import DataError

NAMES = dict(zip(FILE_KEYS, ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")))


@pytest.fixture
def home(tmp_path, monkeypatch):
    """HOME in tmp_path, no GPUML_DATA / XDG_CACHE_HOME / KERAS_HOME, system folder in tmp_path,
    and a registered 4x4 dataset 'tiny_set' (torchvision name Tiny, Keras folder tiny-set)."""
    for var in ("GPUML_DATA", "XDG_CACHE_HOME", "KERAS_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(datasets, "SYSTEM_DATASET_DIRS", (tmp_path / "sys",))
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 256, (20, 4, 4), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, 20, dtype=np.uint8),
              "test_images": rng.integers(0, 256, (6, 4, 4), dtype=np.uint8),
              "test_labels": rng.integers(0, 10, 6, dtype=np.uint8)}
    files = {k: DataFile(NAMES[k], 0, "0" * 64, idx_sha256(a)) for k, a in arrays.items()}
    spec = DatasetSpec("tiny_set", files, ("http://127.0.0.1:9/",), tuple("abcdefghij"), (1, 4, 4),
                       torchvision="Tiny", keras="tiny-set")
    monkeypatch.setitem(DATASETS, "tiny_set", spec)
    return tmp_path, arrays


def _place(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for k, a in arrays.items():
        write_idx(folder / NAMES[k], a)
    return folder


def _keras_npz(path, arrays, **over):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"x_train": arrays["train_images"], "y_train": arrays["train_labels"],
            "x_test": arrays["test_images"], "y_test": arrays["test_labels"], **over}
    np.savez(path, **data)
    return path


def test_xdg_cache_home_replaces_dot_cache(home, monkeypatch):
    tmp, arrays = home
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "xdg"))
    spec = get_spec("tiny_set")
    assert download_dir(spec) == tmp / "xdg" / "gpuml" / "tiny_set"
    _place(tmp / "home" / ".cache" / "gpuml" / "tiny_set", arrays)  # not looked at any more
    with pytest.raises(DataError) as info:
        fetch_dataset("tiny_set", download=False)
    assert str(tmp / "xdg" / "gpuml" / "tiny_set") in str(info.value)
    folder = _place(tmp / "xdg" / "gpuml" / "tiny_set", arrays)
    assert fetch_dataset("tiny_set", download=False).folder == folder
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec: ignore relative paths
    assert download_dir(spec) == tmp / "home" / ".cache" / "gpuml" / "tiny_set"


def test_keras_cache_folder_and_keras_home(home, monkeypatch):
    tmp, arrays = home
    folder = _place(tmp / "home" / ".keras" / "datasets" / "tiny-set", arrays)
    ds = load_dataset("tiny_set", download=False)
    assert ds.folder == folder
    np.testing.assert_array_equal(ds.test.images[:, 0], arrays["test_images"])
    monkeypatch.setenv("KERAS_HOME", str(tmp / "kh"))
    moved = _place(tmp / "kh" / "datasets" / "tiny-set", arrays)
    assert fetch_dataset("tiny_set", download=False).folder == moved


def test_user_cache_comes_before_keras_and_keras_before_system(home):
    tmp, arrays = home
    cache = _place(tmp / "home" / ".cache" / "gpuml" / "tiny_set", arrays)
    keras = _place(tmp / "home" / ".keras" / "datasets" / "tiny-set", arrays)
    _place(tmp / "sys" / "tiny-set", arrays)
    assert fetch_dataset("tiny_set", download=False).folder == cache
    for f in cache.iterdir():
        f.unlink()
    assert fetch_dataset("tiny_set", download=False).folder == keras


def test_keras_mnist_npz_is_read_and_verified(home, monkeypatch):
    tmp, arrays = home
    monkeypatch.setitem(DATASETS, "tiny_set", dataclasses.replace(get_spec("tiny_set"), keras="tiny.npz"))
    path = _keras_npz(tmp / "home" / ".keras" / "datasets" / "tiny.npz", arrays,
                      y_train=arrays["train_labels"].astype(np.int64))  # label dtype differs by Keras version
    ds = load_dataset("tiny_set", download=False, val_split=4)
    assert ds.train.images.shape == (16, 1, 4, 4) and ds.files == {"path": str(path)}
    np.testing.assert_array_equal(ds.val.labels, arrays["train_labels"][16:])
    assert ds.classes[0] == "a"

    changed = arrays["test_labels"].copy()
    changed[0] = (changed[0] + 1) % 10
    _keras_npz(path, arrays, y_test=changed)
    with pytest.raises(DataError, match=r"tiny.npz: y_test is not the published data") as info:
        load_dataset("tiny_set", download=False)
    assert "\n" not in str(info.value)
    assert load_dataset("tiny_set", download=False, verify=False).test.labels[0] == changed[0]


def test_torchvision_root_layout(home):
    tmp, arrays = home
    raw = _place(tmp / "tv" / "Tiny" / "raw", arrays)
    assert fetch_dataset("tiny_set", tmp / "tv", download=False).folder == raw
    assert fetch_dataset("tiny_set", tmp / "tv" / "Tiny", download=False).folder == raw


def test_torchvision_layout_under_gpuml_data(home, monkeypatch):
    tmp, arrays = home
    monkeypatch.setenv("GPUML_DATA", str(tmp / "env"))
    raw = _place(tmp / "env" / "Tiny" / "raw", arrays)
    assert fetch_dataset("tiny_set", download=False).folder == raw


def test_not_found_lists_keras_and_torchvision_places(home):
    tmp, _ = home
    with pytest.raises(DataError) as info:
        fetch_dataset("mnist", tmp / "root", download=False)
    msg = str(info.value)
    for place in (tmp / "root" / "MNIST" / "raw", tmp / "home" / ".keras" / "datasets" / "mnist.npz",
                  tmp / "home" / ".cache" / "gpuml" / "mnist"):
        assert str(place) in msg
    assert "\n" not in msg


def test_registry_names_other_tools_layouts_and_fashion_mirrors():
    fashion, mnist = get_spec("fashion_mnist"), get_spec("mnist")
    assert (fashion.torchvision, fashion.keras) == ("FashionMNIST", "fashion-mnist")
    assert (mnist.torchvision, mnist.keras) == ("MNIST", "mnist.npz")
    assert fashion.mirrors[1] == \
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"


@pytest.mark.parametrize("where", ["GPUML_DATA", "KERAS_HOME", "data.root", "data.path", "data.paths"])
def test_tilde_of_an_unknown_user_is_one_line(home, monkeypatch, where):
    """`~nosuchuser/...` made pathlib raise RuntimeError (a traceback); now a DataError naming
    the path and the setting it came from."""
    bad = "~gpuml_no_such_user_x/data"
    kw = {}
    if where in ("GPUML_DATA", "KERAS_HOME"):
        monkeypatch.setenv(where, bad)
        name, label = "tiny_set", f"${where}"
    elif where == "data.root":
        name, kw, label = "tiny_set", {"root": bad}, "data.root"
    elif where == "data.path":
        name, kw, label = "npz", {"path": bad}, "data.path"
    else:
        name, label = "idx", "data.paths.train_images"
        kw = {"paths": dict.fromkeys(("train_images", "train_labels", "test_images", "test_labels"), bad)}
    with pytest.raises(DataError) as info:
        load_dataset(name, download=False, **kw)
    assert str(info.value) == f"{bad}: cannot expand '~' (no such user, or no home directory) ({label})"
