"""`gpuml predict` on a run folder made by hand (no training): what --help promises is what the
file holds, --out says where it wrote, bad output paths and batch sizes are one-line errors."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from gpuml.cli import build_parser, main
from gpuml.predict import CSV_COLUMNS


def _make_run(run: Path, input_shape: list[int], layers: list[dict], classes: list[str]) -> Path:
    """A run folder as `gpuml train` leaves it (config.yaml, run.json, weights.npz), untrained."""
    from gpuml.backend import get_backend
    from gpuml.train.build import build_model
    from gpuml.train.config import dump_config, validate

    cfg = validate({"device": "cpu", "model": {"input_shape": input_shape, "layers": layers}})
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "run.json").write_text(json.dumps({"input_shape": input_shape, "mean": 0.5, "std": 0.25,
                                              "classes": classes}))
    model = build_model(cfg, get_backend("cpu"), tuple(input_shape))
    np.savez(run / "weights.npz", **model.state_dict())
    return run


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run folder holding a 16-3 dense model for 4x4 images, as `gpuml train` leaves it."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (7, 4, 4), dtype=np.uint8))
    return _make_run(tmp_path / "run", [1, 4, 4], [{"type": "flatten"}, {"type": "dense", "units": 3}],
                     ["a", "b", "c"])


def test_help_names_the_csv_columns_the_file_has(run: Path, tmp_path: Path, capsys) -> None:
    sub = build_parser()._subparsers._group_actions[0].choices["predict"]  # type: ignore[union-attr]
    assert ",".join(CSV_COLUMNS) in " ".join(sub.format_help().split())
    assert main(["predict", str(run), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.csv")]) == 0
    assert (tmp_path / "p.csv").read_text().splitlines()[0] == ",".join(CSV_COLUMNS)


@pytest.mark.parametrize("name", ["p.csv", "p.npy"])
def test_out_says_where_and_how_many(run: Path, tmp_path: Path, capsys, name: str) -> None:
    out = tmp_path / name
    assert main(["predict", str(run), str(tmp_path / "x.npy"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 7 predictions to {out}"
    rows = np.load(out).shape[0] if name.endswith(".npy") else len(out.read_text().splitlines()) - 1
    assert rows == 7


def test_out_in_a_missing_folder_is_one_line(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "nowhere" / "p.csv"
    assert main(["predict", str(run), str(tmp_path / "x.npy"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"gpuml: error: {out}: cannot write predictions")


def test_batch_size_must_be_positive(run: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run), str(tmp_path / "x.npy"), "--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size: expected a positive integer, got '0'" in capsys.readouterr().err


def test_predict_device_names_the_option(run: Path, tmp_path: Path, capsys) -> None:
    assert main(["predict", str(run), str(tmp_path / "x.npy"), "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gpuml: error: --device: 'gpu' is not one of auto, cuda, cpu (did you mean 'cuda'?)"


def _predict_npy(run: Path, tmp_path: Path, x: np.ndarray) -> np.ndarray:
    np.save(tmp_path / "in.npy", x)
    assert main(["predict", str(run), str(tmp_path / "in.npy"), "--out", str(tmp_path / "out.npy")]) == 0
    return np.load(tmp_path / "out.npy")


def test_input_laid_out_like_the_training_data(tmp_path: Path) -> None:
    """Keras-layout (N, H, W, C) images, as an npz run was trained on, are transposed to the
    model's (C, H, W), not reshaped into it (which scrambled pixels silently); any integer
    dtype holds 0..255 as in training data."""
    run = _make_run(tmp_path / "rgb", [3, 4, 2], [{"type": "conv2d", "filters": 2, "kernel": 2},
                                                  {"type": "flatten"}, {"type": "dense", "units": 3}],
                    ["a", "b", "c"])
    nchw = np.random.default_rng(0).integers(0, 256, (6, 3, 4, 2), dtype=np.uint8)
    expected = _predict_npy(run, tmp_path, nchw)
    np.testing.assert_allclose(_predict_npy(run, tmp_path, nchw.transpose(0, 2, 3, 1)), expected)
    np.testing.assert_allclose(_predict_npy(run, tmp_path, nchw.astype(np.int64)), expected)
    np.testing.assert_allclose(_predict_npy(run, tmp_path, nchw.reshape(6, -1)), expected)


@pytest.mark.parametrize("x, message", [
    (np.full((2, 4, 4), 200.0), r"float images must be in \[0, 1\] \(pixel / 255\), got 200..200"),
    (np.full((2, 4, 4), 300), r"integer pixels must be in 0..255"),
    (np.zeros((2, 2, 8), np.uint8), r"images of shape \(2, 2, 8\) do not fit the model input \(1, 4, 4\)"),
])
def test_bad_input_values_are_one_line(run: Path, tmp_path: Path, capsys, x: np.ndarray, message: str) -> None:
    np.save(tmp_path / "bad.npy", x)
    assert main(["predict", str(run), str(tmp_path / "bad.npy")]) in (2, 3)
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(message, err), err


def test_more_outputs_than_class_names(tmp_path: Path, capsys) -> None:
    """An output beyond the run's class names (a head wider than the data's classes) is named
    by its index instead of an IndexError traceback."""
    run = _make_run(tmp_path / "wide", [1, 4, 4], [{"type": "flatten"}, {"type": "dense", "units": 5}], ["a", "b"])
    w = dict(np.load(run / "weights.npz"))
    w["dense_1.b"][4] = 100.0  # every sample predicts class 4
    np.savez(run / "weights.npz", **w)
    np.save(tmp_path / "x.npy", np.zeros((2, 4, 4), np.uint8))
    assert main(["predict", str(run), str(tmp_path / "x.npy")]) == 0
    assert capsys.readouterr().out.splitlines()[0].split("\t")[:3] == ["0", "4", "4"]


def test_out_never_replaces_a_non_file(run: Path, tmp_path: Path, capsys) -> None:
    """--out naming a pipe or device is refused, not renamed over (as root, /dev/null was)."""
    os.mkfifo(tmp_path / "pipe")
    assert main(["predict", str(run), str(tmp_path / "x.npy"), "--out", str(tmp_path / "pipe")]) == 1
    assert "not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO((tmp_path / "pipe").stat().st_mode)


def test_unreadable_inputs_are_one_line(run: Path, tmp_path: Path, capsys) -> None:
    """An empty .npy (EOFError traceback before), an .npz (the training file, say) under either
    name: one line each, exit 3."""
    (tmp_path / "empty.npy").write_bytes(b"")
    np.savez(tmp_path / "data.npz", x_test=np.zeros((2, 4, 4), np.uint8))
    (tmp_path / "zip.npy").write_bytes((tmp_path / "data.npz").read_bytes())
    for name, message in [("empty.npy", "not a readable .npy file"), ("data.npz", "an .npz archive"),
                          ("zip.npy", "an .npz archive")]:
        assert main(["predict", str(run), str(tmp_path / name)]) == 3, name
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"gpuml: error: {tmp_path / name}: ") and message in err and "\n" not in err


def test_output_piped_into_head_is_not_a_traceback(run: Path, tmp_path: Path) -> None:
    """`gpuml predict RUN x.npy | head -1`: the closed pipe ends the listing quietly."""
    import subprocess
    import sys

    np.save(tmp_path / "many.npy", np.zeros((30000, 4, 4), np.uint8))  # ~0.4 MB of lines: past any pipe buffer
    proc = subprocess.Popen([sys.executable, "-m", "gpuml.cli", "predict", str(run), str(tmp_path / "many.npy")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"0\t")
    proc.stdout.close()  # what head does after its line
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_upper_case_extensions(run: Path, tmp_path: Path) -> None:
    """X.NPY in and P.NPY out are .npy files (the input went to the IDX reader, the output
    was written as CSV text under a .NPY name)."""
    x = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "X.npy", x)
    (tmp_path / "X.npy").rename(tmp_path / "X.NPY")
    assert main(["predict", str(run), str(tmp_path / "X.NPY"), "--out", str(tmp_path / "P.NPY")]) == 0
    assert np.load(tmp_path / "P.NPY").shape == (3, 3)
