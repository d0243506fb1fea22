"""Your own data: `data.dataset: npz` (Keras layout) and `idx` (four files), their layouts and
one-line errors, and a CLI run from a Keras-layout .npz through eval, predict and export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from gpuml.cli import main
from gpuml.data.idx import write_idx
from gpuml.data.loader import load_dataset, load_dataset_config
from gpuml.data.user import save_npz_dataset
from gpuml.errors import ConfigError, DataError
from gpuml.train.config import validate


def _arrays(n_train=40, n_test=12, shape=(6, 5), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
            rng.integers(0, classes, n_train, dtype=np.uint8),
            rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
            rng.integers(0, classes, n_test, dtype=np.uint8))


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _keras(tmp_path: Path, **over) -> Path:
    xtr, ytr, xte, yte = _arrays()
    arrays = dict(x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    arrays.update(over)
    return _npz(tmp_path / "data.npz", **{k: v for k, v in arrays.items() if v is not None})


# ---------------------------------------------------------------------------- layouts


def test_keras_layout_npz_loads_as_nchw(tmp_path):
    xtr, ytr, xte, yte = _arrays()
    path = _npz(tmp_path / "mnist.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    ds = load_dataset("npz", path=path, val_split=8)
    assert ds.train.images.shape == (32, 1, 6, 5) and ds.train.images.dtype == np.uint8
    assert ds.val.images.shape == (8, 1, 6, 5) and ds.test.images.shape == (12, 1, 6, 5)
    np.testing.assert_array_equal(ds.train.images[:, 0], xtr[:32])
    np.testing.assert_array_equal(ds.val.labels, ytr[32:])
    assert ds.train.labels.dtype == np.int64
    assert ds.classes == ("0", "1", "2") and ds.num_classes == 3
    assert ds.spec.name == "npz" and ds.files == {"path": str(path.resolve())}


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("channels", [1, 3])
def test_channels_first_or_last(tmp_path, layout, channels):
    rng = np.random.default_rng(1)
    nchw = rng.integers(0, 256, (10, channels, 7, 9), dtype=np.uint8)
    x = nchw.transpose(0, 2, 3, 1) if layout == "nhwc" else nchw
    path = _npz(tmp_path / "d.npz", x_train=x, y_train=np.arange(10) % 2, x_test=x[:4], y_test=np.zeros(4, int))
    ds = load_dataset("npz", path=path)
    np.testing.assert_array_equal(ds.train.images, nchw)
    assert ds.train.images.flags.c_contiguous


def test_flat_features_float_multiples_of_1_255_and_classes_array(tmp_path):
    x = np.arange(60, dtype=np.uint8).reshape(10, 6)
    path = _npz(tmp_path / "d.npz", x_train=x / 255.0, y_train=np.arange(10.0) % 2,
                x_test=x[:3].astype(np.int32), y_test=np.array([[0], [1], [1]]),
                classes=np.array(["cat", "dog"]))
    ds = load_dataset("npz", path=path)
    np.testing.assert_array_equal(ds.train.images, x)
    np.testing.assert_array_equal(ds.test.labels, [0, 1, 1])
    assert ds.classes == ("cat", "dog") and ds.spec.shape == (6,)


def test_config_classes_override_the_npz(tmp_path):
    path = _keras(tmp_path, classes=np.array(["a", "b", "c"]))
    ds = load_dataset("npz", path=path, classes=["x", "y", "z", "w"])
    assert ds.classes == ("x", "y", "z", "w")


def test_save_npz_dataset_round_trip(tmp_path):
    xtr, ytr, xte, yte = _arrays(shape=(4, 4, 3))
    out = save_npz_dataset(tmp_path / "sub" / "d.npz", xtr, ytr, xte, yte, classes=["a", "b", "c"])
    ds = load_dataset("npz", path=out)
    np.testing.assert_array_equal(ds.train.images, xtr.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(ds.test.labels, yte)
    assert ds.classes == ("a", "b", "c")
    with np.load(out, allow_pickle=False) as z:  # no pickled objects: loads without allow_pickle
        assert z["classes"].dtype.kind == "U"
    with pytest.raises(DataError, match="y_train: label 3 at index"):
        save_npz_dataset(tmp_path / "bad.npz", xtr, np.full(len(xtr), 3), xte, yte, classes=["a", "b", "c"])
    assert not (tmp_path / "bad.npz").exists()


def test_idx_dataset_from_four_paths(tmp_path):
    xtr, ytr, xte, yte = _arrays(shape=(5, 5, 3))
    paths = {}
    for key, arr in zip(("train_images", "train_labels", "test_images", "test_labels"), (xtr, ytr, xte, yte)):
        paths[key] = str(write_idx(tmp_path / f"{key}.idx.gz", arr))
    cfg = validate({"data": {"dataset": "idx", "paths": paths, "val_split": 0, "classes": ["p", "q", "r"]},
                    "model": {"layers": [{"type": "flatten"}, {"type": "dense", "units": 3}]}})
    ds = load_dataset_config(cfg["data"])
    np.testing.assert_array_equal(ds.train.images, xtr.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(ds.test.labels, yte)
    assert ds.classes == ("p", "q", "r") and ds.files["test_labels"].endswith("test_labels.idx.gz")


def test_bytes_class_names_and_float16_pixels(tmp_path):
    xtr, ytr, xte, yte = _arrays()
    # float16 cannot hold k/255 exactly (off by up to 0.12 of a step) but still means pixel k
    path = _keras(tmp_path, x_train=(xtr / 255).astype(np.float16), classes=np.array([b"cat", b"dog", b"eel"]))
    ds = load_dataset("npz", path=path)
    assert ds.classes == ("cat", "dog", "eel")
    np.testing.assert_array_equal(ds.train.images[:, 0], xtr)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("over, message", [
    (dict(y_test=None, x_test=None), r"missing arrays x_test, y_test \(found x_train, y_train"),
    (dict(y_train=np.zeros(39, int)), r"y_train: 39 labels for 40 samples"),
    (dict(y_train=np.full(40, 0.5)), r"y_train: labels must be integers, got 0.5 at index 0"),
    (dict(y_train=np.array(["a"] * 40)), r"y_train: labels must be integers, got dtype <U1"),
    (dict(y_test=-np.ones(12, int)), r"y_test: labels must not be negative, got -1 at index 0"),
    (dict(x_train=np.zeros((40, 2, 3, 4, 5), np.uint8)), r"x_train: expected images .* got shape \(40, 2, 3, 4, 5\)"),
    (dict(x_train=np.zeros(40, np.uint8)), r"x_train: expected images"),
    (dict(x_train=np.zeros((40, 5, 6, 7), np.uint8)), r"x_train: images of shape \(40, 5, 6, 7\) have neither 1 nor 3"),
    (dict(x_test=np.zeros((12, 6, 6), np.uint8)),
     r"x_test: test samples of shape \(1, 6, 6\) differ from the training samples' \(1, 6, 5\)"),
    (dict(x_train=np.full((40, 6, 5), 0.3)), r"x_train: float values must be multiples of 1/255"),
    (dict(x_train=np.full((40, 6, 5), 3.0)), r"x_train: float values must be in \[0, 1\]"),
    (dict(x_train=np.full((40, 6, 5), 300)), r"x_train: integer pixels must be in 0..255, got 300..300"),
    (dict(classes=np.array(["a", "b"])), r"y_train: label 2 at index \d+ is out of range for the 2 classes \(0..1\)"),
    # one stray label must not make a 70,001-class dataset (10**9 exhausted memory)
    (dict(y_test=np.r_[np.zeros(11, int), 70000]), r"y_test: label 70000 at index 11 would make 70001 classes"),
    # a uint64 past 2**63 is not "negative" (it wrapped in int64)
    (dict(y_train=np.full(40, 2**63 + 5, np.uint64)), r"y_train: label 9223372036854775813 at index 0 would make"),
])
def test_bad_npz_is_one_line_data_error(tmp_path, over, message):
    path = _keras(tmp_path, **over)
    with pytest.raises(DataError, match=message) as info:
        load_dataset("npz", path=path)
    assert "\n" not in str(info.value) and str(path.resolve()) in str(info.value)


def test_unreadable_npz_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset("npz", path=tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(DataError, match="not a readable .npz file") as info:
        load_dataset("npz", path=tmp_path / "junk.npz")
    assert "pickle" not in str(info.value)  # numpy's guess for a file that is neither zip nor .npy
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(DataError, match="single array"):
        load_dataset("npz", path=tmp_path / "one.npy")
    np.savez(tmp_path / "obj.npz", x_train=np.array([{}], dtype=object), y_train=[0], x_test=[0], y_test=[0])
    with pytest.raises(DataError, match="cannot read its arrays"):
        load_dataset("npz", path=tmp_path / "obj.npz")


def test_config_checks_the_data_source():
    base = {"model": {"layers": [{"type": "flatten"}]}}
    with pytest.raises(ConfigError, match="data.path: is required with data.dataset npz"):
        validate({**base, "data": {"dataset": "npz"}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"data.paths.test_images: is required .*missing: test_images, test_labels"):
        validate({**base, "data": {"dataset": "idx", "paths": {"train_images": "a", "train_labels": "b"}}})
    with pytest.raises(ConfigError, match="data.path: is only read with data.dataset npz, not 'mnist'"):
        validate({**base, "data": {"dataset": "mnist", "path": "x.npz"}})
    with pytest.raises(ConfigError, match="data.classes: is only read"):
        validate({**base, "data": {"dataset": "fashion_mnist", "classes": ["a"]}})
    with pytest.raises(ConfigError, match="data.paths.train_imgs: unknown key .did you mean 'train_images'"):
        validate({**base, "data": {"dataset": "idx", "paths": {"train_imgs": "a"}}})
    with pytest.raises(ConfigError, match="data.classes: expected list.str. or null"):
        validate({**base, "data": {"dataset": "npz", "path": "x.npz", "classes": [1, 2]}})


# ---------------------------------------------------------------------------- CLI end to end


def test_cli_trains_from_a_keras_npz_then_eval_predict_export(tmp_path, capsys):
    rng = np.random.default_rng(0)
    # Two separable classes of 8x8 images: bright top half or bright bottom half.
    def make(n):
        y = rng.integers(0, 2, n)
        x = rng.integers(0, 60, (n, 8, 8)).astype(np.uint8)
        for i, label in enumerate(y):
            x[i, :4] += 150 if label == 0 else 0
            x[i, 4:] += 150 if label == 1 else 0
        return x, y.astype(np.uint8)
    (xtr, ytr), (xte, yte) = make(96), make(32)
    data = _npz(tmp_path / "mine.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte,
                classes=np.array(["top", "bottom"]))
    cfg = {"name": "npz-run", "device": "cpu",
           "data": {"dataset": "npz", "path": str(data), "val_split": 16},
           "model": {"layers": [{"type": "conv2d", "filters": 4, "kernel": 3, "activation": "relu"},
                                {"type": "maxpool2d", "size": 2}, {"type": "flatten"},
                                {"type": "dense", "units": 2}]},
           "optimizer": {"name": "adam", "lr": 0.01}, "trainer": {"epochs": 3, "batch_size": 16}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(run), "--no-progress"]) == 0
    info = json.loads((run / "run.json").read_text())
    assert info["dataset"] == "npz" and info["data_files"] == {"path": str(data.resolve())}
    assert info["classes"] == ["top", "bottom"] and info["input_shape"] == [1, 8, 8]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.8

    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    np.save(tmp_path / "x.npy", xte)
    assert main(["predict", str(run), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.csv")]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()[1:]
    assert {r.split(",")[2] for r in rows} <= {"top", "bottom"} and len(rows) == 32
    assert main(["export", str(run), "--format", "npz", "--out", str(tmp_path / "w.npz")]) == 0
    with np.load(tmp_path / "w.npz") as z:
        assert sorted(z.files) == ["conv2d_1.W", "conv2d_1.b", "dense_1.W", "dense_1.b"]


def test_cli_bad_npz_exits_3_with_one_line(tmp_path, capsys):
    bad = _keras(tmp_path, y_train=np.full(40, 7), classes=np.array(["a", "b", "c"]))
    cfg = {"device": "cpu", "data": {"dataset": "npz", "path": str(bad), "val_split": 0},
           "model": {"layers": [{"type": "flatten"}, {"type": "dense", "units": 3}]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("gpuml: error: ") and "y_train: label 7" in err[0]


def test_relative_data_path_is_found_from_another_directory(tmp_path, monkeypatch, capsys):
    """A relative data.path was saved as given in RUN/config.yaml, so `gpuml eval RUN` (or
    --resume) from any other directory looked for the data there: exit 3."""
    work = tmp_path / "work"
    work.mkdir()
    xtr, ytr, xte, yte = _arrays()
    _npz(work / "mine.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    (work / "c.yaml").write_text(yaml.safe_dump({
        "device": "cpu", "data": {"dataset": "npz", "path": "mine.npz", "val_split": 0},
        "model": {"layers": [{"type": "flatten"}, {"type": "dense", "units": 3}]},
        "trainer": {"epochs": 1, "batch_size": 20}}))
    monkeypatch.chdir(work)
    assert main(["train", "c.yaml", "--out", "run", "--no-progress"]) == 0
    assert yaml.safe_load((work / "run" / "config.yaml").read_text())["data"]["path"] == str(work / "mine.npz")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", str(work / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "test"
