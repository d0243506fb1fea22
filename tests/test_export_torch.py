"""`gpuml export --format torch`: a state_dict that loads strictly into a hand-built
torch.nn.Sequential and gives gpuml's logits; the reader that brings it back to gpuml names."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml

from gpuml.backend import get_backend
from gpuml.cli import main
from gpuml.data.user import save_npz_dataset
from gpuml.errors import DataError
from gpuml.export import export_torch, read_safetensors, read_torch_safetensors, safetensors_bytes, torch_sequential
from gpuml.train.build import build_model
from gpuml.train.config import validate

INPUT = (2, 10, 12)
LAYERS = [
    {"type": "conv2d", "filters": 4, "kernel": 3, "padding": 1, "activation": "relu"},
    {"type": "maxpool2d", "size": 2},
    {"type": "conv2d", "filters": 5, "kernel": [3, 2], "stride": [1, 2], "activation": "tanh"},
    {"type": "avgpool2d", "size": 2, "padding": 1},
    {"type": "dropout", "rate": 0.3},
    {"type": "flatten"},
    {"type": "dense", "units": 7, "activation": "sigmoid"},
    {"type": "relu"},
    {"type": "dense", "units": 3, "use_bias": False},
]


def gpuml_model(seed: int = 0):
    """A float32 CPU model using every layer type, its weights, an input and its logits."""
    cfg = validate({"seed": seed, "model": {"layers": LAYERS}})
    backend = get_backend("cpu")
    model = build_model(cfg, backend, INPUT)
    x = np.random.default_rng(seed).normal(size=(6, *INPUT)).astype(np.float32)
    logits = backend.to_numpy(model.forward(backend.asarray(x), training=False))
    return model, model.state_dict(), x, logits


def _hand_built_torch():
    """The same network written by hand the way a PyTorch user would."""
    nn = pytest.importorskip("torch").nn
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, (3, 2), stride=(1, 2)), nn.Tanh(), nn.AvgPool2d(2, padding=1), nn.Dropout(0.3),
        nn.Flatten(), nn.Linear(20, 7), nn.Sigmoid(), nn.ReLU(), nn.Linear(7, 3, bias=False),
    ).eval()


def _load_for_torch(path: Path) -> dict:
    torch = pytest.importorskip("torch")
    try:
        from safetensors.torch import load_file  # the library PyTorch users load it with
    except ImportError:
        return {k: torch.from_numpy(v.copy()) for k, v in read_safetensors(path)[0].items()}
    return load_file(str(path))


def test_torch_state_dict_loads_strictly_and_matches_logits(tmp_path):
    torch = pytest.importorskip("torch")
    model, weights, x, logits = gpuml_model()
    path = export_torch(model, weights, tmp_path / "w.safetensors")
    net = _hand_built_torch()
    net.load_state_dict(_load_for_torch(path), strict=True)
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5)
    # Linear weights are (out, in): the transpose of gpuml's (in, out)
    np.testing.assert_array_equal(net[8].weight.detach().numpy(), weights["dense_1.W"].T)


def test_metadata_describes_the_network(tmp_path):
    torch = pytest.importorskip("torch")
    model, weights, x, logits = gpuml_model(seed=1)
    path = export_torch(model, weights, tmp_path / "w.safetensors")
    _, meta = read_safetensors(path)
    layers = json.loads(meta["gpuml_layers"])
    assert [m["type"] for m in layers] == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "Tanh", "AvgPool2d",
                                           "Dropout", "Flatten", "Linear", "Sigmoid", "ReLU", "Linear"]
    assert layers[0]["gpuml"] == "conv2d_1" and layers[11] == {
        "type": "Linear", "in_features": 7, "out_features": 3, "bias": False, "gpuml": "dense_2"}
    assert json.loads(meta["gpuml_names"])["8.weight"] == "dense_1.W"
    assert json.loads(meta["input_shape"]) == list(INPUT)
    with torch.no_grad():
        out = torch_sequential(path)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-5)


def test_read_torch_safetensors_gives_back_gpuml_names_and_layouts(tmp_path):
    model, weights, _, _ = gpuml_model()
    back = read_torch_safetensors(export_torch(model, weights, tmp_path / "w.safetensors"))
    assert sorted(back) == sorted(weights)
    for k in weights:
        assert back[k].dtype == weights[k].dtype
        np.testing.assert_array_equal(back[k], weights[k])
    model.load_state_dict(back)  # the shapes fit the gpuml model again


def test_read_torch_safetensors_refuses_other_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(safetensors_bytes({"0.weight": np.zeros((2, 3), np.float32)}))
    with pytest.raises(DataError, match="no gpuml_names in its metadata") as info:
        read_torch_safetensors(plain)
    assert "\n" not in str(info.value)
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(DataError, match="not a safetensors file"):
        read_torch_safetensors(tmp_path / "junk.safetensors")
    with pytest.raises(DataError, match="cannot read"):
        read_torch_safetensors(tmp_path / "missing.safetensors")
    # hostile headers: TypeError / JSONDecodeError tracebacks before
    for i, (header, message) in enumerate([
            ({"__metadata__": 5}, "not a safetensors file"),
            ({"__metadata__": {"gpuml_names": "not json"}}, "gpuml_names metadata is not a JSON object"),
            ({"__metadata__": {"gpuml_names": "[1, 2]"}}, "gpuml_names metadata is not a JSON object"),
            ({"__metadata__": {"gpuml_names": '{"0.weight": 5}'}}, "gpuml_names metadata is not a JSON object")]):
        text = json.dumps(header).encode()
        (tmp_path / f"h{i}.safetensors").write_bytes(struct.pack("<Q", len(text)) + text)
        with pytest.raises(DataError, match=message):
            read_torch_safetensors(tmp_path / f"h{i}.safetensors")


def tiny_run(tmp_path: Path) -> Path:
    """A one-epoch CPU run on a synthetic 3-channel npz (CNN with a fused ReLU and a head)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (48, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 48)
    data = save_npz_dataset(tmp_path / "d.npz", x[:40], y[:40], x[40:], y[40:], classes=["a", "b", "c"])
    cfg = {"device": "cpu", "data": {"dataset": "npz", "path": str(data), "val_split": 0},
           "model": {"layers": [{"type": "conv2d", "filters": 3, "kernel": 3, "activation": "relu"},
                                {"type": "maxpool2d", "size": 2}, {"type": "flatten"},
                                {"type": "dense", "units": 3}]},
           "trainer": {"epochs": 1, "batch_size": 16}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    return tmp_path / "run"


def run_logits(run: Path, x01: np.ndarray) -> np.ndarray:
    """gpuml's logits for images in [0, 1], normalised the way the run was."""
    info = json.loads((run / "run.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    backend = get_backend("cpu")
    model = build_model(validate(cfg), backend, tuple(info["input_shape"]))
    with np.load(run / "weights.npz") as z:
        model.load_state_dict({k: z[k] for k in z.files})
    xn = ((x01 - info["mean"]) / info["std"]).astype(np.float32)
    return backend.to_numpy(model.forward(backend.asarray(xn), training=False)), xn


def test_cli_export_torch(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    run = tiny_run(tmp_path)
    capsys.readouterr()
    assert main(["export", str(run), "--format", "torch"]) == 0
    out = run / "weights.torch.safetensors"
    assert capsys.readouterr().out.strip() == str(out)
    x01 = np.random.default_rng(1).random((5, 3, 8, 8))
    logits, xn = run_logits(run, x01)
    with torch.no_grad():
        got = torch_sequential(out)(torch.from_numpy(xn)).numpy()
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)
    with np.load(run / "weights.npz") as z:
        assert all(np.array_equal(read_torch_safetensors(out)[k], z[k]) for k in z.files)


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "torch", "onnx"])
def test_export_to_a_path_that_is_not_a_file_is_one_line(tmp_path, fmt):
    """--out naming a folder, a path under a file, or a device/pipe: one GpumlError naming it,
    and nothing replaced (atomic_write renamed over a fifo, and as root over /dev/null)."""
    from gpuml.errors import GpumlError
    from gpuml.export import export_weights

    if fmt == "onnx":
        pytest.importorskip("onnx")
    model, weights, _, _ = gpuml_model()
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("keep")
    os.mkfifo(tmp_path / "pipe")
    for out, message in [(tmp_path / "folder", "is a folder"), (tmp_path / "file" / "w.out", "is a file"),
                         (tmp_path / "pipe", "not a regular file")]:
        with pytest.raises(GpumlError, match=message) as info:
            if fmt == "torch":
                export_torch(model, weights, out)
            elif fmt == "onnx":
                from gpuml.export_onnx import export_onnx

                export_onnx(model, weights, out)
            else:
                export_weights(weights, out, fmt)
        assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert (tmp_path / "folder").is_dir() and (tmp_path / "file").read_text() == "keep"
    assert stat.S_ISFIFO((tmp_path / "pipe").stat().st_mode)
