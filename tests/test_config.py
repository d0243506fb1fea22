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
