"""Config loading: the seed configs validate; typos, wrong types and bad values are one-line
errors naming the key, the file and a suggestion; --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuml.errors import ConfigError
from gpuml.train.config import config_diff, load_config, validate
from tests.conftest import CONFIGS


@pytest.mark.parametrize("name", ["mlp", "cnn", "smoke", "mnist_mlp", "mnist_cnn"])
def test_seed_configs_validate(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg["trainer"]["epochs"] >= 1 and cfg["model"]["layers"]
    assert cfg["data"]["dataset"] == ("mnist" if name.startswith("mnist") else "fashion_mnist")


def test_seed_models_are_the_specified_ones() -> None:
    mlp = load_config(CONFIGS / "mlp.yaml")
    assert [ly.get("units") for ly in mlp["model"]["layers"]] == [None, 1024, 1024, 10]
    assert (mlp["optimizer"]["name"], mlp["optimizer"]["lr"], mlp["trainer"]["batch_size"],
            mlp["trainer"]["epochs"]) == ("adam", 0.001, 32, 5)
    cnn = load_config(CONFIGS / "cnn.yaml")
    assert [ly["type"] for ly in cnn["model"]["layers"]] == [
        "conv2d", "maxpool2d", "conv2d", "maxpool2d", "flatten", "dense", "dense"]
    assert cnn["trainer"]["epochs"] == 10


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_typo_names_key_file_and_suggestion(tmp_path: Path) -> None:
    p = _write(tmp_path, (CONFIGS / "mlp.yaml").read_text().replace("epochs: 5", "epochz: 5"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "epochz" in msg and "did you mean 'epochs'" in msg and str(p) in msg and "\n" not in msg


@pytest.mark.parametrize("override,fragment", [
    ("optimizer.lr=-1", "optimizer.lr: must be > 0"),
    ("optimizer.lr=fast", "expected float"),
    ("trainer.batch_size=2.5", "expected int"),
    ("trainer.epochs=true", "expected int"),
    ("device=gpu", "did you mean"),
    ("model.layers.1.units=abc", "model.layers.1.units"),
    ("model.layers.1.activaton=relu", "did you mean 'activation'"),
    ("model.layers.1.type=dense2", "unknown layer type"),
    ("optimizer.name=adamm", "did you mean 'adam'"),
    ("data.val_split=1.5", "data.val_split"),
    ("model.layers.7.units=3", "not an index"),
    ("trainer", "expected key.path=value"),
    # bounds checked where the value enters: beta1=1 was a ZeroDivisionError traceback in the
    # first step, beta2=1.5 a "loss became nan", dropout 1.0 / label smoothing 1.0 build errors
    ("optimizer.beta1=1.0", "--set optimizer.beta1: must be < 1, got 1.0"),
    ("optimizer.beta2=1.5", "--set optimizer.beta2: must be < 1, got 1.5"),
    ("optimizer.alpha=1.5", "--set optimizer.alpha: must be <= 1, got 1.5"),
    ("model.layers.1={type: dropout, rate: 1.0}", "--set model.layers.1.rate: must be < 1, got 1.0"),
    ("loss.label_smoothing=1.0", "--set loss.label_smoothing: must be < 1, got 1.0"),
    ("schedule.pct_start=2", "--set schedule.pct_start: must be <= 1, got 2"),
    ("optimizer.lr=.nan", "--set optimizer.lr: must be a finite number, got nan"),
    ("optimizer.lr=.inf", "--set optimizer.lr: must be a finite number, got inf"),
    ("data.augment.scale=1.0", "--set data.augment.scale: must be < 1, got 1.0"),
    # the item is named, not the whole layer list printed
    ("model.layers.2=null", "--set model.layers.2: expected a mapping such as {type: dense, units: 10}, got null"),
])
def test_override_errors(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "mlp.yaml", [override])
    assert fragment in str(e.value)


def test_overrides_apply_and_coerce() -> None:
    cfg = load_config(CONFIGS / "mlp.yaml", ["optimizer.lr=1e-2", "trainer.epochs=2", "model.layers.1.units=64",
                                             "loss.label_smoothing=0.1", "device=cpu"])
    assert cfg["optimizer"]["lr"] == 0.01 and cfg["trainer"]["epochs"] == 2
    assert cfg["model"]["layers"][1]["units"] == 64 and cfg["loss"]["label_smoothing"] == 0.1
    assert cfg["device"] == "cpu"


def test_defaults_filled_and_shorthands() -> None:
    cfg = validate({"model": {"layers": [{"type": "dense", "units": 3}]}, "optimizer": "sgd", "loss": "mse"})
    assert cfg["optimizer"] == {**cfg["optimizer"], "name": "sgd", "lr": 1e-3}
    assert cfg["loss"]["name"] == "mse" and cfg["trainer"]["batch_size"] == 32
    assert cfg["model"]["layers"][0]["activation"] is None


def test_required_and_structure_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.layers: is required"):
        validate({"model": {}})
    with pytest.raises(ConfigError, match="model.layers.0.units: is required"):
        validate({"model": {"layers": [{"type": "dense"}]}})
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(_write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        validate({"data": 3, "model": {"layers": [{"type": "flatten"}]}})


def test_config_diff_lists_changed_keys() -> None:
    a = load_config(CONFIGS / "mlp.yaml")
    b = load_config(CONFIGS / "mlp.yaml", ["optimizer.lr=0.01", "model.layers.2.units=8"])
    assert sorted(config_diff(a, b)) == ["model.layers.2.units", "optimizer.lr"]
    assert config_diff(a, a) == []


@pytest.mark.parametrize("text,key,lines", [
    ("optimizer: {name: adam}\ntrainer: {epochs: 1}\noptimizer: {name: sgd}\n", "optimizer", "lines 1 and 3"),
    ("trainer:\n  epochs: 1\n  batch_size: 8\n  epochs: 2\n", "epochs", "lines 2 and 4"),
    ("model:\n  layers:\n    - {type: dense, units: 3, units: 4}\n", "units", "twice on line 3"),
    # two duplicates: the first in the file is named (the nested one was reported second)
    ("model:\n  layers:\n    - type: dense\n      units: 3\n      units: 4\ntrainer:\n  early_stopping:\n"
     "    enabled: true\n    enabled: false\n", "units", "lines 4 and 5"),
])
def test_duplicate_yaml_keys_name_key_and_lines(tmp_path: Path, text: str, key: str, lines: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}: duplicate key '{key}' ({lines})"


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    p = _write(tmp_path, "model:\n  layers:\n    - &d {type: dense, units: 3}\n"
                         "    - {<<: *d, units: 4}\n")
    assert [ly["units"] for ly in load_config(p)["model"]["layers"]] == [3, 4]


def test_duplicate_key_in_set_value() -> None:
    with pytest.raises(ConfigError, match=r"^--set optimizer=\{lr: 1, lr: 2\}: duplicate key 'lr'"):
        load_config(CONFIGS / "mlp.yaml", ["optimizer={lr: 1, lr: 2}"])


@pytest.mark.parametrize("override,message", [
    # an unknown section made by --set is the override's fault, not the file's
    ("trainr.epochs=1", "--set trainr.epochs: trainr: unknown key (did you mean 'trainer'?)"),
    ("model.layers.0.kernel=40", "--set model.layers.0.kernel: unknown key (known keys: name)"),
    # difflib alone suggests 'cpu' for 'gpu'
    ("device=gpu", "--set device: 'gpu' is not one of auto, cuda, cpu (did you mean 'cuda'?)"),
    ("dtype=double", "--set dtype: 'double' is not one of float32, float64 (did you mean 'float64'?)"),
    ("device=gpu1", "--set device: 'gpu1' is not one of auto, cuda, cpu (did you mean 'cuda:1'?)"),
])
def test_set_errors_blame_set(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "mlp.yaml", [override])
    assert str(e.value) == message


def test_options_are_named_in_errors() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "mlp.yaml", options={"--device": "device=tpu"})
    assert str(e.value).startswith("--device: 'tpu' is not one of auto, cuda, cpu")
    assert load_config(CONFIGS / "mlp.yaml", options={"--device": "device=cpu"})["device"] == "cpu"


def test_layer_build_errors_blame_set() -> None:
    from gpuml.backend import get_backend
    from gpuml.train.build import build_model
    from gpuml.train.config import command_line_source

    overrides = ["model.layers.0.kernel=40"]
    cfg = load_config(CONFIGS / "cnn.yaml", overrides)
    with pytest.raises(ConfigError) as e:
        build_model(cfg, get_backend("cpu"), (1, 28, 28), command_line_source(CONFIGS / "cnn.yaml", overrides))
    assert str(e.value).startswith("--set model.layers.0.kernel: model.layers.0: ")
    assert "kernel 40x40" in str(e.value)
    # without the override in play, the file is named
    cfg = load_config(CONFIGS / "cnn.yaml", overrides)
    with pytest.raises(ConfigError, match=f"^{CONFIGS / 'cnn.yaml'}: model.layers.0: "):
        build_model(cfg, get_backend("cpu"), (1, 28, 28), str(CONFIGS / "cnn.yaml"))


def test_default_val_split_fits_small_datasets(tmp_path: Path) -> None:
    """Without data.val_split a small npz, or a data.limit under 5,001, still trains: the default
    is the seeds' 1/12 (it was a count of 5000), which is still 5,000 of Fashion-MNIST's 60,000."""
    import numpy as np

    from gpuml.data.loader import _val_count, load_dataset_config

    cfg = validate({"model": {"layers": [{"type": "flatten"}]}})
    assert _val_count(cfg["data"]["val_split"], 60000) == 5000
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 256, (48, 4, 4), dtype=np.uint8), y_train=np.arange(48) % 3,
             x_test=np.zeros((2, 4, 4), np.uint8), y_test=np.zeros(2, int))
    cfg = validate({"data": {"dataset": "npz", "path": str(tmp_path / "d.npz")},
                    "model": {"layers": [{"type": "flatten"}]}})
    ds = load_dataset_config(cfg["data"])
    assert (len(ds.train), len(ds.val)) == (44, 4)


@pytest.mark.parametrize("key,value,by_set,by_file", [
    ("trainer.monitor", "val_los", "--set trainer.monitor: unknown metric 'val_los'",
     "ft.yaml: trainer.monitor: unknown metric 'val_los'"),
    ("trainer.early_stopping.monitor", "val_los", "--set trainer.early_stopping.monitor: unknown metric 'val_los'",
     "ft.yaml: trainer.early_stopping.monitor: unknown metric 'val_los'"),
    ("data.augment.shift", 1, "--set data.augment.shift: data.augment: needs image input",
     "ft.yaml: data.augment: needs image input"),
])
def test_trainer_config_errors_blame_set(tmp_path: Path, key: str, value: object, by_set: str, by_file: str) -> None:
    """Errors the Trainer finds (not the validator) name `--set` when it set the key, else the file."""
    from gpuml.train.config import command_line_source
    from gpuml.train.trainer import Trainer
    from tests.test_finetune import config, npz_data

    cfg = config(npz_data(tmp_path))
    if key.startswith("data."):  # image augmentation for a model taking a flat vector
        cfg["model"].update(input_shape=[64], layers=[{"type": "dense", "units": 4, "name": "dense_1"}])
    if key.endswith("early_stopping.monitor"):
        cfg["trainer"]["early_stopping"]["enabled"] = True
    section = cfg
    *parents, last = key.split(".")
    for part in parents:
        section = section[part]
    section[last] = value
    overrides = [f"{key}={value}"]
    for source, prefix in ((command_line_source("ft.yaml", overrides), by_set), ("ft.yaml", by_file)):
        with pytest.raises(ConfigError) as e:
            Trainer(cfg, tmp_path / "run", source=source, log=lambda _: None)
        assert str(e.value).startswith(prefix), str(e.value)


def test_paths_are_absolute_in_the_resolved_config(tmp_path: Path, monkeypatch) -> None:
    """The run saves the resolved config; a relative init_from in it made eval/predict/export
    of a fine-tune run from another directory fail ('no such weights file')."""
    monkeypatch.chdir(tmp_path)
    cfg = validate({"data": {"dataset": "npz", "path": "d.npz"},
                    "model": {"layers": [{"type": "flatten"}], "init_from": "runs/pre"}})
    assert cfg["model"]["init_from"] == str(tmp_path / "runs" / "pre")
    assert cfg["data"]["path"] == str(tmp_path / "d.npz") and cfg["data"]["root"] is None
