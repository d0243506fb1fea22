"""`gpuml config show` (the resolved config) and `gpuml config schema` (JSON Schema generated
from gpuml.train.schema, checked against the seed configs)."""

from __future__ import annotations

import json

import pytest
import yaml

from gpuml.cli import main
from gpuml.train.config import load_config
from gpuml.train.config_tools import config_json_schema
from gpuml.train.schema import DATA, LAYERS, ROOT
from tests.conftest import CONFIGS

SEEDS = sorted(CONFIGS.glob("*.yaml"))


def test_config_show_prints_the_resolved_config_with_overrides(capsys):
    assert main(["config", "show", str(CONFIGS / "mlp.yaml"), "--set", "trainer.epochs=3",
                 "--set", "optimizer.lr=0.01"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(CONFIGS / "mlp.yaml", ["trainer.epochs=3", "optimizer.lr=0.01"])
    assert shown == expected
    assert shown["trainer"]["epochs"] == 3 and shown["trainer"]["eval_batch_size"] == 1000  # a default


def test_config_show_finds_seed_configs_by_name_and_reports_errors(capsys):
    assert main(["config", "show", "mlp"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "mlp-fashion"
    assert main(["config", "show", "mlp", "--set", "trainer.epoch=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpuml: error: ") and "trainer.epoch" in err and "\n" not in err


def test_config_schema_is_json_with_descriptions(capsys):
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["properties"]) == set(ROOT)
    data = schema["properties"]["data"]["properties"]
    assert data["root"]["description"] == DATA["root"].doc
    assert data["dataset"]["enum"] == list(DATA["dataset"].choices)
    assert data["paths"]["properties"]["train_images"]["description"]
    layers = schema["properties"]["model"]["properties"]["layers"]["items"]["oneOf"]
    assert [s["properties"]["type"]["const"] for s in layers] == list(LAYERS)
    dense = layers[list(LAYERS).index("dense")]
    assert dense["required"] == ["type", "units"] and dense["additionalProperties"] is False


def _validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = config_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("seed", SEEDS, ids=lambda p: p.name)
def test_seed_configs_validate_against_the_schema(seed):
    validator = _validator()
    errors = [e.message for e in validator.iter_errors(yaml.safe_load(seed.read_text()))]
    assert errors == []


def test_schema_rejects_what_the_loader_rejects():
    validator = _validator()
    base = yaml.safe_load((CONFIGS / "mlp.yaml").read_text())
    bad = [
        {**base, "trainer": {"epochs": 0}},
        {**base, "trainer": {"epoch": 3}},
        {**base, "optimizer": "adamm"},
        {**base, "model": {"layers": [{"type": "dense"}]}},  # units is required
        {**base, "model": {"layers": [{"type": "conv2d", "filters": 2, "kernel": [3, 3, 3]}]}},
        {**base, "data": {"dataset": "cifar"}},
    ]
    for cfg in bad:
        assert list(validator.iter_errors(cfg)), cfg
    ok = {**base, "optimizer": {"name": "adam", "lr": "1e-3"}}  # PyYAML's string for 1e-3
    assert list(validator.iter_errors(ok)) == []
