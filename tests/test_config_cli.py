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


def test_config_show_reads_a_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((CONFIGS / "mlp.yaml").read_text())
    assert main(["config", "show", str(run), "--set", "trainer.epochs=2"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == load_config(CONFIGS / "mlp.yaml", ["trainer.epochs=2"])
    assert main(["config", "show", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a run folder" in err and "\n" not in err


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
        {**base, "optimizer": {"name": "adam", "beta1": 1.0}},
        {**base, "model": {"layers": [{"type": "dropout", "rate": 1.5}]}},
    ]
    for cfg in bad:
        assert list(validator.iter_errors(cfg)), cfg
    ok = {**base, "optimizer": {"name": "adam", "lr": "1e-3"}}  # PyYAML's string for 1e-3
    assert list(validator.iter_errors(ok)) == []


# ---------------------------------------------------------------------------- device: cuda:N


def test_config_accepts_cuda_n_and_keeps_the_old_errors():
    from gpuml.errors import ConfigError
    from gpuml.train.config import validate

    layers = {"layers": [{"type": "flatten"}]}
    assert validate({"device": "cuda:1", "model": layers})["device"] == "cuda:1"
    with pytest.raises(ConfigError, match=r"'cuda:x' is not one of auto, cuda, cpu"):
        validate({"device": "cuda:x", "model": layers})
    with pytest.raises(ConfigError, match=r"'gpu' is not one of auto, cuda, cpu \(did you mean 'cuda'\?\)"):
        validate({"device": "gpu", "model": layers})
    validator = _validator()
    assert not list(validator.iter_errors({"device": "cuda:3", "model": layers}))
    assert list(validator.iter_errors({"device": "cuda:", "model": layers}))


class _FakeCupy:
    """Just what get_backend touches: the GPU count and Device(i).use()."""

    def __init__(self, count: int) -> None:
        self.used: list[int] = []
        fake = self

        class Device:
            def __init__(self, i: int) -> None:
                self.i = i

            def use(self) -> None:
                fake.used.append(self.i)

        class runtime:
            @staticmethod
            def getDeviceCount() -> int:
                return count

        self.cuda = type("cuda", (), {"Device": Device, "runtime": runtime})


@pytest.fixture
def fake_gpus(monkeypatch):
    import sys
    import types

    import gpuml.backend as backends

    def install(count: int) -> _FakeCupy:
        cupy = _FakeCupy(count)
        monkeypatch.setitem(sys.modules, "cupy", cupy)
        fake_cuda = types.ModuleType("gpuml.backend.cuda")
        fake_cuda.CudaBackend = lambda dtype: ("cuda backend", dtype, list(cupy.used))
        monkeypatch.setitem(sys.modules, "gpuml.backend.cuda", fake_cuda)
        monkeypatch.setattr(backends, "cuda_status", lambda: (True, f"{count} GPU(s)"))
        return cupy

    return install


def test_cuda_n_selects_that_gpu_before_building_the_backend(fake_gpus):
    from gpuml.backend import get_backend

    cupy = fake_gpus(2)
    assert get_backend("cuda:1") == ("cuda backend", "float32", [1])
    assert get_backend("cuda") == ("cuda backend", "float32", [1])  # plain cuda: the current GPU
    assert cupy.used == [1]


def test_cuda_n_past_the_gpu_count_names_the_count(fake_gpus):
    from gpuml.backend import get_backend
    from gpuml.errors import DeviceError

    cupy = fake_gpus(1)
    with pytest.raises(DeviceError, match=r"device 'cuda:7' requested but this machine has 1 GPU \(cuda:0\)"):
        get_backend("cuda:7")
    assert cupy.used == []


def test_cuda_n_without_a_gpu_is_the_usual_error(monkeypatch):
    import gpuml.backend as backends
    from gpuml.errors import DeviceError

    monkeypatch.setattr(backends, "cuda_status", lambda: (False, "CuPy sees no GPU"))
    with pytest.raises(DeviceError, match="device 'cuda:0' requested but no GPU is usable: CuPy sees no GPU"):
        backends.get_backend("cuda:0")
    with pytest.raises(DeviceError, match="unknown device 'cuda:-1'"):
        backends.get_backend("cuda:-1")
    assert backends.get_backend("cpu").name == "cpu"
