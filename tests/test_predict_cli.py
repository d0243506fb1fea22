"""`gpuml predict` on a run folder made by hand (no training): what --help promises is what the
file holds, --out says where it wrote, bad output paths and batch sizes are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpuml.cli import build_parser, main
from gpuml.predict import CSV_COLUMNS


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run folder holding a 16-3 dense model for 4x4 images, as `gpuml train` leaves it."""
    from gpuml.backend import get_backend
    from gpuml.train.build import build_model
    from gpuml.train.config import dump_config, validate

    cfg = validate({"device": "cpu", "model": {"input_shape": [1, 4, 4],
                                               "layers": [{"type": "flatten"}, {"type": "dense", "units": 3}]}})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "run.json").write_text(json.dumps({"input_shape": [1, 4, 4], "mean": 0.5, "std": 0.25,
                                              "classes": ["a", "b", "c"]}))
    model = build_model(cfg, get_backend("cpu"), (1, 4, 4))
    np.savez(run / "weights.npz", **model.state_dict())
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (7, 4, 4), dtype=np.uint8))
    return run


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
