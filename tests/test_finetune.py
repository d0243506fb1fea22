"""Fine-tuning: model.init_from / init_skip load weights by layer name with shape checks,
model.freeze keeps layers fixed (bit-identical, no weight-gradient work, left out of the
optimizer), checkpoints and resume stay exact; the same from Python (load_weights, trainable).
Small synthetic data on CPU, so every test takes about a second."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gpuml.data.user import save_npz_dataset
from gpuml.errors import ConfigError, GpumlError
from gpuml.export import export_weights
from gpuml.nn import layers as L
from gpuml.train import checkpoint as ckpt
from gpuml.train.config import validate
from gpuml.train.trainer import Trainer, write_config, write_run_info
from tests.gpu_util import cuda_available


def synthetic(n: int, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 8, 8): noise plus one bright quadrant per class (learnable in an epoch)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.integers(0, 60, (n, 8, 8))
    for i, c in enumerate(y):
        r, col = divmod(int(c) % 4, 2)
        x[i, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 150 + 20 * (int(c) // 4)
    return x.astype(np.uint8), y


def npz_data(tmp_path: Path, classes: int = 4, name: str = "data.npz") -> Path:
    x, y = synthetic(240, classes)
    xt, yt = synthetic(60, classes, seed=1)
    return save_npz_dataset(tmp_path / name, x, y, xt, yt)


def config(data: Path, head: int = 4, epochs: int = 1, **model: object) -> dict:
    return validate({
        "name": "ft", "device": "cpu", "seed": 1,
        "data": {"dataset": "npz", "path": str(data), "val_split": 40},
        "model": {"layers": [
            {"type": "conv2d", "filters": 4, "kernel": 3, "activation": "relu"},
            {"type": "maxpool2d", "size": 2},
            {"type": "conv2d", "filters": 4, "kernel": 2, "activation": "relu"},
            {"type": "flatten"},
            {"type": "dense", "units": 16, "activation": "relu"},
            {"type": "dense", "units": head}], **model},
        "optimizer": {"name": "adam", "lr": 0.01},
        "trainer": {"epochs": epochs, "batch_size": 20, "progress": False},
    }, "ft.yaml")


def train(cfg: dict, run: Path) -> Trainer:
    """A run as `gpuml train` makes it (config.yaml and run.json included)."""
    trainer = Trainer(cfg, run, source="ft.yaml", log=lambda _: None)
    write_config(run, cfg)
    write_run_info(run, trainer)
    trainer.fit(progress=False)
    return trainer


def weights(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "weights.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture
def pretrained(tmp_path: Path) -> Path:
    run = tmp_path / "pre"
    train(config(npz_data(tmp_path)), run)
    return run


def test_frozen_layer_stays_bit_identical_while_the_rest_trains(tmp_path: Path, pretrained: Path) -> None:
    cfg = config(npz_data(tmp_path), epochs=2, init_from=str(pretrained), freeze=["conv2d_1"])
    trainer = Trainer(cfg, tmp_path / "ft", source="ft.yaml", log=lambda _: None)
    pre = weights(pretrained)
    start = trainer.model.state_dict()
    assert all(np.array_equal(start[k], pre[k]) for k in pre)  # init_from loaded every layer
    assert len(trainer.optimizer.params) == len(pre) - 2  # conv2d_1.W and .b left out
    trainer.fit(progress=False)
    after = weights(tmp_path / "ft")
    for k in ("conv2d_1.W", "conv2d_1.b"):
        assert np.array_equal(after[k], pre[k]), k
    for k in ("conv2d_2.W", "dense_1.W", "dense_2.W", "dense_2.b"):
        assert not np.allclose(after[k], pre[k]), k
    assert "frozen" in trainer.model.summary() and "total parameters: 448 (408 trainable)" in trainer.model.summary()


def test_frozen_layer_skips_its_weight_gradient_and_input_gradients_below(tmp_path: Path,
                                                                          monkeypatch) -> None:
    cfg = config(npz_data(tmp_path), freeze=["conv2d_1", "conv2d_2"])
    trainer = Trainer(cfg, tmp_path / "run", source="ft.yaml", log=lambda _: None)
    m = trainer.model
    assert [layer.need_input_grad for layer in m.layers] == [False, False, False, False, False, True]

    def no_grad(*args: object) -> None:
        raise AssertionError("a frozen layer computed its weight gradient")

    for layer in m.layers[:3:2]:
        monkeypatch.setattr(layer, "_weight_grad", no_grad)
    trainer.fit(progress=False)
    assert not np.any(m.layers[0].grads["W"]) and not np.any(m.layers[2].grads["b"])


def test_init_skip_replaces_the_head_with_another_number_of_classes(tmp_path: Path, pretrained: Path) -> None:
    data = npz_data(tmp_path, classes=6, name="six.npz")
    cfg = config(data, head=6, epochs=3, init_from=str(pretrained), init_skip=["dense_2"])
    trainer = Trainer(cfg, tmp_path / "ft", source="ft.yaml", log=lambda _: None)
    pre, start = weights(pretrained), trainer.model.state_dict()
    assert np.array_equal(start["dense_1.W"], pre["dense_1.W"])
    assert start["dense_2.W"].shape == (16, 6)
    trainer.fit(progress=False)
    losses = [row["train_loss"] for row in trainer.history]
    assert losses[-1] < 0.8 * losses[0]  # it learns the 6 classes with the new head


def test_head_of_another_size_without_init_skip_names_layer_shapes_and_layers(tmp_path: Path,
                                                                             pretrained: Path) -> None:
    cfg = config(npz_data(tmp_path, classes=6, name="six.npz"), head=6, init_from=str(pretrained))
    with pytest.raises(ConfigError) as err:
        Trainer(cfg, tmp_path / "ft", source="ft.yaml", log=lambda _: None)
    msg = str(err.value)
    assert msg.startswith("ft.yaml: model.init_from: ") and "\n" not in msg
    assert "dense_2.W has shape (16, 4) in the file, the model wants (16, 6)" in msg
    assert "init_skip" in msg and "conv2d_1, maxpool2d_1, conv2d_2, flatten_1, dense_1, dense_2" in msg


@pytest.mark.parametrize("key", ["freeze", "init_skip"])
def test_unknown_layer_name_lists_the_layers(tmp_path: Path, pretrained: Path, key: str) -> None:
    cfg = config(npz_data(tmp_path), init_from=str(pretrained), **{key: ["conv2d_9"]})
    with pytest.raises(ConfigError, match=r"'conv2d_9'.*conv2d_1, maxpool2d_1, conv2d_2, flatten_1, "
                                          r"dense_1, dense_2$"):
        Trainer(cfg, tmp_path / "ft", source="ft.yaml", log=lambda _: None)


def test_weights_file_without_a_layer_and_missing_file_are_one_line_errors(tmp_path: Path, pretrained: Path) -> None:
    partial = {k: v for k, v in weights(pretrained).items() if not k.startswith("dense_1")}
    np.savez(tmp_path / "partial.npz", **partial)
    cfg = config(npz_data(tmp_path), init_from=str(tmp_path / "partial.npz"))
    with pytest.raises(ConfigError, match="no weights for layer dense_1 .*the file has layers conv2d_1, "
                                          "conv2d_2, dense_2; put dense_1 in init_skip"):
        Trainer(cfg, tmp_path / "ft", source="ft.yaml", log=lambda _: None)
    cfg = config(npz_data(tmp_path), init_from=str(tmp_path / "nope.npz"))
    with pytest.raises(ConfigError, match="model.init_from: .*nope.npz: no such weights file"):
        Trainer(cfg, tmp_path / "ft", source="ft.yaml", log=lambda _: None)


@pytest.mark.parametrize("source", ["weights.npz", "weights.safetensors", "torch.safetensors", "checkpoint"])
def test_init_from_reads_npz_safetensors_and_checkpoints(tmp_path: Path, pretrained: Path, source: str) -> None:
    from gpuml.cli import main

    pre = weights(pretrained)
    path = {"weights.npz": pretrained / "weights.npz", "checkpoint": ckpt.find(pretrained, "last")}.get(source)
    if source == "weights.safetensors":
        path = export_weights(pre, tmp_path / source, "safetensors")
    elif source == "torch.safetensors":  # PyTorch names and layouts (Linear weight (out, in))
        path = tmp_path / source
        assert main(["export", str(pretrained), "--format", "torch", "--out", str(path)]) == 0
    trainer = Trainer(config(npz_data(tmp_path), init_from=str(path)), tmp_path / "ft", source="ft.yaml",
                      log=lambda _: None)
    start = trainer.model.state_dict()
    assert all(np.array_equal(start[k], pre[k]) for k in pre)


def test_resume_with_frozen_layers_is_exact(tmp_path: Path, pretrained: Path) -> None:
    data = npz_data(tmp_path)
    full = train(config(data, epochs=2, init_from=str(pretrained), freeze=["dense_1"]), tmp_path / "full")
    train(config(data, epochs=1, init_from=str(pretrained), freeze=["dense_1"]), tmp_path / "half")
    resumed = Trainer(config(data, epochs=2, init_from=str(pretrained), freeze=["dense_1"]),
                      tmp_path / "half", source="ft.yaml", log=lambda _: None)
    resumed.restore(ckpt.find(tmp_path / "half", "last"))
    resumed.fit(progress=False)
    a, b = weights(tmp_path / "full"), weights(tmp_path / "half")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert full.history[-1]["train_loss"] == resumed.history[-1]["train_loss"]
    # A checkpoint's optimizer state belongs to its frozen set: another is refused in one line.
    other = Trainer(config(data, epochs=2, init_from=str(pretrained)), tmp_path / "other", source="ft.yaml",
                    log=lambda _: None)
    with pytest.raises(GpumlError, match="optimizer state: the checkpoint has 6 'm' tensors, the model "
                                         "trains 8 parameters"):
        other.restore(ckpt.find(tmp_path / "half", "last"))


def test_python_load_weights_and_trainable(tmp_path: Path, pretrained: Path) -> None:
    import gpuml

    x, y = synthetic(200)
    model = gpuml.Sequential([L.Conv2D(4, 3, activation="relu"), L.MaxPool2D(2), L.Conv2D(4, 2, activation="relu"),
                              L.Flatten(), L.Dense(16, activation="relu"), L.Dense(3)])
    model.load_weights(pretrained, skip=["dense_2"])  # not built yet: loaded at the first fit
    model.layers[0].trainable = False
    model.compile(optimizer={"name": "adam", "lr": 0.01})
    keep = y < 3
    model.fit(x[keep], y[keep], epochs=1, batch_size=20, device="cpu", verbose=0, run_dir=tmp_path / "py")
    pre, after = weights(pretrained), model.state_dict()
    assert np.array_equal(after["conv2d_1.W"], pre["conv2d_1.W"])
    assert not np.allclose(after["conv2d_2.W"], pre["conv2d_2.W"]) and after["dense_2.W"].shape == (16, 3)
    saved = (tmp_path / "py" / "config.yaml").read_text()
    assert "freeze: [conv2d_1]" in saved and "init_skip: [dense_2]" in saved
    assert f"init_from: {pretrained.resolve()}" in saved
    with pytest.raises(GpumlError, match="dense_2.W has shape \\(16, 4\\) in the file, the model wants \\(16, 3\\)"):
        model.load_weights(pretrained)  # built: loaded at once, checked first
    assert np.array_equal(model.state_dict()["conv2d_2.W"], after["conv2d_2.W"])  # nothing changed


def test_layer_names_are_unique_since_weights_are_matched_by_name(tmp_path: Path) -> None:
    cfg = config(npz_data(tmp_path))
    cfg["model"]["layers"][4]["name"] = cfg["model"]["layers"][5]["name"] = "head"
    with pytest.raises(ConfigError, match=r"^ft.yaml: model.layers.5.name: layer head: the name is used by an "
                                          r"earlier layer too"):
        Trainer(cfg, tmp_path / "run", source="ft.yaml", log=lambda _: None)
    from gpuml.nn.model import Sequential

    # Automatic names skip the ones given explicitly (Keras-style numbering otherwise).
    assert Sequential([L.Dense(3), L.Dense(4, name="dense_1"), L.Flatten()]).layer_names() == \
        ["dense_2", "dense_1", "flatten_1"]


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA GPU")
def test_frozen_layer_stays_bit_identical_on_cuda(tmp_path: Path) -> None:
    """The fused CUDA optimizer gets only the trained parameters: a frozen layer is untouched."""
    data = npz_data(tmp_path)
    cfg = config(data, freeze=["conv2d_2"])
    cfg["device"] = "cuda"
    trainer = Trainer(cfg, tmp_path / "run", source="ft.yaml", log=lambda _: None)
    before = trainer.model.state_dict()
    trainer.fit(progress=False)
    after = trainer.model.state_dict()
    assert all(np.array_equal(after[k], before[k]) for k in ("conv2d_2.W", "conv2d_2.b"))
    assert not np.array_equal(after["conv2d_1.W"], before["conv2d_1.W"])
    assert not np.array_equal(after["dense_2.W"], before["dense_2.W"])


def test_freezing_every_layer_is_refused_for_training_but_predicts(tmp_path: Path) -> None:
    import gpuml

    x, y = synthetic(60)
    model = gpuml.Sequential([L.Flatten(), L.Dense(8, activation="relu"), L.Dense(4)])
    for layer in model.layers:
        layer.trainable = False
    model.compile()
    with pytest.raises(ConfigError, match=r"^model.freeze: every layer with parameters is frozen "
                                          r"\(dense_1, dense_2\); nothing would train$"):
        model.fit(x, y, device="cpu", verbose=0)
    assert model.predict(x).shape == (60, 4)


def test_resume_restores_the_checkpoint_without_reading_init_from(tmp_path: Path, pretrained: Path,
                                                                   capsys) -> None:
    """The checkpoint holds the fine-tuned weights: a moved or deleted init_from source must not
    break `--resume`. With no checkpoint yet the run starts afresh and needs the source again."""
    import shutil

    from gpuml.cli import main

    source = tmp_path / "pre.npz"
    shutil.copy(pretrained / "weights.npz", source)
    data = npz_data(tmp_path)
    run = tmp_path / "ft"
    train(config(data, epochs=1, init_from=str(source)), run)
    source.unlink()
    assert main(["train", "--resume", str(run), "--set", "trainer.epochs=2", "--allow-config-change",
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert "resumed from" in capsys.readouterr().err
    fresh = tmp_path / "fresh"  # config.yaml written, killed before the first checkpoint
    write_config(fresh, config(data, epochs=1, init_from=str(source)))
    assert main(["train", "--resume", str(fresh), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpuml: error: ") and "model.init_from" in err[-1]
    assert "pre.npz: no such weights file" in err[-1] and "no checkpoint yet" in "\n".join(err)
