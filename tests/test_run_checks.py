"""Misfits between the model and the data are one line before anything is trained or written
(a head narrower than the classes, an input_shape that is not the data's); read-only commands on
a fine-tuned run do not read its (perhaps deleted) init source; small CLI messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from gpuml.cli import main
from gpuml.data.user import save_npz_dataset
from gpuml.errors import DataError
from tests.test_finetune import config, npz_data, train


def _npz(tmp_path: Path, shape: tuple[int, ...], classes: int = 4) -> Path:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (48, *shape), dtype=np.uint8)
    xt = rng.integers(0, 256, (12, *shape), dtype=np.uint8)
    y = np.arange(48) % classes
    return save_npz_dataset(tmp_path / "d.npz", x, y, xt, np.arange(12) % classes)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


MODEL = """
name: t
device: cpu
data: {{dataset: npz, path: {path}, val_split: 0.25}}
model:
  {shape}
  layers:
    - {{type: flatten}}
    - {{type: dense, units: {units}}}
trainer: {{epochs: 1, batch_size: 8, progress: false}}
"""


def test_head_narrower_than_the_classes_is_one_line_before_the_run_folder(tmp_path: Path, capsys) -> None:
    cfg = _write(tmp_path, MODEL.format(path=_npz(tmp_path, (6, 6), classes=5), shape="", units=5))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--set", "model.layers.1.units=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("gpuml: error: --set model.layers.1.units: layer dense_1 has 3 outputs but the data has "
                       "5 classes (labels 0..4); give it 5 units")
    assert not run.exists()


def test_a_wider_head_than_the_classes_still_trains(tmp_path: Path) -> None:
    cfg = _write(tmp_path, MODEL.format(path=_npz(tmp_path, (6, 6), classes=3), shape="", units=5))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0


def test_input_shape_that_is_not_the_datas_is_one_line_before_the_run_folder(tmp_path: Path, capsys) -> None:
    path = _npz(tmp_path, (8, 6, 3))  # channels-last colour images -> (3, 8, 6)
    cfg = _write(tmp_path, MODEL.format(path=path, shape="input_shape: [1, 28, 28]", units=4))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"gpuml: error: {cfg}: model.input_shape: [1, 28, 28] does not match the data's samples "
                   "[3, 8, 6]; remove it to use the data's shape")
    assert not run.exists()


def test_read_only_commands_ignore_a_deleted_init_source(tmp_path: Path, capsys) -> None:
    data = npz_data(tmp_path)
    pre = tmp_path / "pre"
    train(config(data), pre)
    ft = tmp_path / "ft"
    train(config(data, init_from=str(pre), freeze=["conv2d_1"]), ft)
    shutil.rmtree(pre)
    capsys.readouterr()
    assert main(["eval", str(ft)]) == 0
    assert '"test_accuracy"' in capsys.readouterr().out
    np.save(tmp_path / "x.npy", np.zeros((3, 8, 8), np.uint8))
    assert main(["predict", str(ft), str(tmp_path / "x.npy")]) == 0
    assert main(["export", str(ft), "--format", "torch", "--out", str(tmp_path / "w.safetensors")]) == 0


def test_eval_of_an_empty_test_split_says_so(tmp_path: Path, capsys) -> None:
    import gpuml
    from gpuml import layers

    x, y = np.random.default_rng(0).integers(0, 256, (20, 4), dtype=np.uint8), np.arange(20) % 2
    model = gpuml.Sequential([layers.Dense(2)])
    model.compile(optimizer="sgd")
    model.fit(x, y, epochs=1, batch_size=5, run_dir=str(tmp_path / "run"), progress=False)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 8
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"gpuml: error: {tmp_path / 'run'}: this run has no test split (its test set is empty)")


def test_load_weights_of_an_unknown_users_home_is_one_line() -> None:
    import gpuml
    from gpuml import layers

    model = gpuml.Sequential([layers.Dense(2)])
    with pytest.raises(DataError, match=r"^~nosuchuser_gpuml/x.npz: cannot expand '~'"):
        model.load_weights("~nosuchuser_gpuml/x.npz")


def test_info_lists_the_optional_modules(capsys) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for mod in ("onnx", "onnxruntime", "tensorboard", "jsonschema", "mpi4py"):
        assert any(line.startswith(f"{mod} ") for line in out.splitlines()), mod


def test_helper_threads_keep_the_callers_errstate(monkeypatch) -> None:
    """The trainer silences NumPy's overflow warnings (its NaN check reports instead); the CPU
    backend's helper threads ran without that errstate and printed them anyway."""
    import warnings

    from gpuml.backend.cpu import loops

    monkeypatch.setattr(loops, "_WORKERS", 3)

    def overflow(worker: int, i: int) -> None:
        np.array([1e30], np.float32) * np.float32(1e30)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with np.errstate(all="ignore"):
            loops.run_tasks(overflow, 6)
    assert [str(w.message) for w in caught] == []


def test_resume_may_change_how_a_run_is_shown_or_kept_without_allow_config_change(tmp_path: Path, capsys) -> None:
    """cuda_graph, progress, tensorboard and checkpoint keeping change no trained number (graph and
    eager steps give the same bits), so a resume accepts them; a numeric change still needs the flag."""
    cfg = _write(tmp_path, MODEL.format(path=_npz(tmp_path, (6, 6)), shape="", units=4))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--set", "trainer.epochs=1"]) == 0
    capsys.readouterr()
    free = ["trainer.cuda_graph=off", "trainer.progress=false", "trainer.tensorboard=true",
            "trainer.keep_checkpoints=3", "trainer.checkpoint_every.steps=2"]
    args = ["train", "--resume", str(run)] + [a for kv in free for a in ("--set", kv)]
    assert main(args + ["--set", "optimizer.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("the config differs from the run's in optimizer.lr; pass --allow-config-change to accept")
    assert main(args) == 0  # finished already: nothing to do, and no config complaint
