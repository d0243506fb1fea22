"""The Keras-like Python API (gpuml.Sequential compile/fit/evaluate/predict/save, load_model) on
the CLI's Trainer: the README snippet as written, Keras history names, callbacks, run folders the
CLI continues, the config's one-line errors, and outputs the caller owns."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import gpuml
from gpuml import layers
from gpuml.errors import ConfigError, DataError, GpumlError
from tests.conftest import REPO
from tests.test_finetune import synthetic


def small_cnn() -> gpuml.Sequential:
    return gpuml.Sequential([layers.Conv2D(8, 3, activation="relu"), layers.MaxPool2D(2),
                             layers.Flatten(), layers.Dense(4)])


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, ...]:
    x, y = synthetic(300)
    return x[:240], y[:240].astype(np.uint8), x[240:], y[240:].astype(np.int32)


def test_snippet_runs_as_written(data, tmp_path: Path) -> None:
    x, y, xv, yv = data
    x_test, y_test = xv, yv
    model = gpuml.Sequential([layers.Conv2D(32, 3, activation="relu"), layers.MaxPool2D(2),
                              layers.Flatten(), layers.Dense(10)])
    model.compile(optimizer="adam", loss="softmax_cross_entropy")
    history = model.fit(x, y, epochs=2, batch_size=32, validation_data=(xv, yv), device="auto", verbose=0)
    assert len(history.history["loss"]) == len(history.history["val_accuracy"]) == 2
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
    assert history.epoch == [0, 1] and history.history["loss"][1] < history.history["loss"][0]
    ev = model.evaluate(x_test, y_test)
    assert set(ev) == {"loss", "accuracy"} and ev["accuracy"] > 0.5
    assert ev["loss"] == pytest.approx(history.history["val_loss"][-1], rel=1e-5)  # same data, same rule
    probs = model.predict(x_test)
    assert isinstance(probs, np.ndarray) and probs.shape == (60, 10)
    assert np.allclose(probs.sum(axis=1), 1.0) and (probs.argmax(1) == y_test).mean() == ev["accuracy"]
    model.save(tmp_path / "m")
    loaded = gpuml.load_model(tmp_path / "m")
    assert np.array_equal(loaded.predict(x_test), probs)
    assert loaded.evaluate(x_test, y_test) == ev


def test_gpuml_exposes_nn_and_layers_and_imports_light() -> None:
    assert gpuml.nn.Dense is layers.Dense and gpuml.layers is layers
    code = "import sys, gpuml; assert 'numpy' not in sys.modules and 'gpuml.api' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_forward_and_predict_return_arrays_the_caller_owns(data) -> None:
    x, y, _, _ = data
    model = small_cnn()
    model.compile()
    p1 = model.predict(x[:5])  # builds on first use
    p2 = model.predict(x[5:10])
    assert not np.array_equal(p1, p2)
    xb = model.backend.asarray(x[:5, None] / 255.0)
    a = model.forward(xb)
    keep = a.copy()
    b = model.forward(model.backend.asarray(x[5:10, None] / 255.0))
    assert a is not b and np.array_equal(a, keep)


def test_fit_run_folder_is_a_cli_run(data, tmp_path: Path) -> None:
    from gpuml.cli import main

    x, y, xv, yv = data
    model = small_cnn()
    model.compile(optimizer={"name": "adam", "lr": 3e-3})
    run = tmp_path / "run"
    model.fit(x, y, epochs=1, batch_size=32, validation_data=(xv, yv), device="cpu", verbose=0, run_dir=run)
    for name in ("config.yaml", "run.json", "data.npz", "metrics.jsonl", "summary.json", "weights.npz"):
        assert (run / name).is_file(), name
    assert main(["train", "--resume", str(run), "--set", "trainer.epochs=2", "--allow-config-change",
                 "--no-progress"]) == 0
    longer = small_cnn()
    longer.compile(optimizer={"name": "adam", "lr": 3e-3})
    hist = longer.fit(x, y, epochs=2, batch_size=32, validation_data=(xv, yv), device="cpu", verbose=0,
                      run_dir=tmp_path / "two")
    with np.load(run / "weights.npz") as a, np.load(tmp_path / "two" / "weights.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)  # resumed by the CLI == one fit
    assert json.loads((run / "summary.json").read_text())["test_loss"] == hist.summary["test_loss"]
    with pytest.raises(GpumlError, match="already holds a run"):
        model.fit(x, y, epochs=1, verbose=0, run_dir=run)


def test_callbacks_schedule_and_config_names(data, tmp_path: Path) -> None:
    x, y, _, _ = data
    seen = []

    class Log:
        def on_epoch_end(self, epoch: int, logs: dict) -> None:
            seen.append((epoch, sorted(logs)))

    model = small_cnn()
    model.compile(optimizer="sgd")
    model.fit(x, y, epochs=2, batch_size=40, validation_split=0.25, device="cpu", verbose=0,
              callbacks=[Log(), object()], schedule={"name": "cosine", "warmup_epochs": 1},
              early_stopping={"monitor": "val_loss", "patience": 3}, grad_clip_norm=1.0,
              augment={"shift": 1}, run_dir=tmp_path / "r", eval_batch_size=50)
    keys = ["accuracy", "loss", "lr", "val_accuracy", "val_loss"]
    assert seen == [(0, keys), (1, keys)]
    cfg = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert cfg["schedule"]["name"] == "cosine" and cfg["schedule"]["warmup_epochs"] == 1.0
    assert cfg["trainer"]["early_stopping"]["enabled"] and cfg["trainer"]["grad_clip_norm"] == 1.0
    assert cfg["data"]["augment"]["shift"] == 1 and cfg["data"]["val_split"] == 0.25
    assert cfg["trainer"]["eval_batch_size"] == 50 and cfg["optimizer"]["name"] == "sgd"


def test_float_inputs_follow_the_uint8_rule(data) -> None:
    x, y, _, _ = data
    runs = []
    for xin in (x, x / 255.0, x.astype(np.int64)[:, None]):
        model = small_cnn()
        model.compile()
        runs.append(model.fit(xin, y, epochs=1, device="cpu", verbose=0).history["loss"])
    assert runs[0] == runs[1] == runs[2]
    model = small_cnn()
    model.compile()
    with pytest.raises(DataError, match="fit: x: float values must be multiples of 1/255"):
        model.fit(x / 255.0 + 1e-3, y, verbose=0)


def test_errors_are_the_configs_one_line_errors(data) -> None:
    x, y, _, _ = data
    model = small_cnn()
    with pytest.raises(ConfigError, match="^compile: optimizer.name: 'adm' is not one of .*did you mean 'adam'"):
        model.compile(optimizer="adm")
    with pytest.raises(GpumlError, match="compile"):
        model.fit(x, y)
    model.compile(loss={"name": "softmax_cross_entropy", "label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="^fit: trainer.epohcs: unknown key"):
        model.fit(x, y, epohcs=2, verbose=0)
    with pytest.raises(ConfigError, match="^fit: trainer.batch_size: must be >= 1, got 0"):
        model.fit(x, y, batch_size=0, verbose=0)
    with pytest.raises(DataError, match="fit: y: label 7 .* out of range for the 4 classes"):
        model.fit(x, np.where(y == 3, 7, y), verbose=0)
    with pytest.raises(ConfigError, match=r"fit: model.layers.3: .*dense expects a flat input"):
        _compiled([layers.Conv2D(2, 3), layers.MaxPool2D(2), layers.Conv2D(2, 1), layers.Dense(4)]).fit(x, y)


def _compiled(stack: list) -> gpuml.Sequential:
    model = gpuml.Sequential(stack)
    model.compile()
    return model


def test_datasets_load_gives_keras_layout_arrays(fashion_root: Path) -> None:
    (x, y), (xt, yt) = gpuml.datasets.load("fashion_mnist", root=fashion_root, download=False)
    assert x.shape == (60000, 28, 28) and xt.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (60000,) and set(np.unique(yt)) == set(range(10))
    assert "fashion_mnist" in gpuml.datasets.names()


def test_a_second_fit_continues_from_the_trained_weights(data) -> None:
    x, y, _, _ = data
    model = small_cnn()
    model.compile(optimizer={"name": "adam", "lr": 3e-3})
    first = model.fit(x, y, epochs=1, device="cpu", verbose=0).history["loss"][0]
    trained = model.state_dict()
    probs = model.predict(x[:8])
    second = model.fit(x, y, epochs=1, device="cpu", verbose=0).history["loss"][0]
    assert second < 0.8 * first  # started from the trained weights, not a fresh draw
    assert not np.array_equal(model.predict(x[:8]), probs)
    assert any(not np.array_equal(model.state_dict()[k], v) for k, v in trained.items())


def test_load_model_reads_an_unfinished_run_and_summary_needs_a_build(data, tmp_path: Path) -> None:
    x, y, xv, yv = data
    model = small_cnn()
    with pytest.raises(GpumlError, match="not built yet"):
        model.summary()
    model.compile()
    model.fit(x, y, epochs=1, device="cpu", verbose=0, run_dir=tmp_path / "run", validation_data=(xv, yv))
    (tmp_path / "run" / "weights.npz").unlink()  # as if stopped before the end: the checkpoint is used
    loaded = gpuml.load_model(tmp_path / "run", device="cpu")
    assert np.array_equal(loaded.predict(xv), model.predict(xv))
    assert "conv2d_1" in loaded.summary()


def test_fit_final_line_names_what_exists_and_what_was_measured(data, tmp_path: Path, capsys) -> None:
    """Without run_dir the temporary folder is deleted: its path is not printed. The test
    split of a fit is its validation_data: the line says val_, not test_."""
    x, y, xv, yv = data
    model = gpuml.Sequential([layers.Flatten(), layers.Dense(4)])
    model.compile()
    capsys.readouterr()
    history = model.fit(x, y, device="cpu", verbose=2, validation_data=(xv, yv))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "gpuml-fit-" not in last and "(no run_dir: run folder not kept)" in last
    val = model.evaluate(xv, yv)
    assert last.startswith(f"val_loss {val['loss']:.4f}  val_accuracy {val['accuracy']:.4f}  "), last
    assert "test_" not in last and history.summary["test_loss"] == pytest.approx(val["loss"], rel=1e-5)
    model.fit(x, y, device="cpu", verbose=2, run_dir=tmp_path / "run")  # no validation data: no score
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("(1 epoch, ") and last.endswith(f"-> {tmp_path / 'run'}"), last
