"""One-line user errors that name the right culprit: the command-line option that set a key,
duplicate YAML keys, unreadable files, host memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gpuml.cli import main
from tests.conftest import CONFIGS


def _last_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_eval_device_names_the_option(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.yaml").write_text((CONFIGS / "mlp.yaml").read_text())
    assert main(["eval", str(tmp_path), "--device", "tpu"]) == 2
    assert _last_error(capsys).startswith("gpuml: error: --device: 'tpu' is not one of auto, cuda, cpu")


def test_duplicate_key_exits_2_naming_file_key_and_lines(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "dup.yaml"
    cfg.write_text((CONFIGS / "mlp.yaml").read_text() + "optimizer: {name: sgd, lr: 0.1}\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert _last_error(capsys) == f"gpuml: error: {cfg}: duplicate key 'optimizer' (lines 14 and 16)"
    assert not (tmp_path / "run").exists()


def test_train_unknown_section_from_set_names_set(tmp_path: Path, capsys) -> None:
    assert main(["train", str(CONFIGS / "mlp.yaml"), "--set", "trainr.epochs=1", "--out", str(tmp_path / "r")]) == 2
    assert _last_error(capsys) == "gpuml: error: --set trainr.epochs: trainr: unknown key (did you mean 'trainer'?)"


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_respects_umask(tmp_path: Path, umask: int, mode: int) -> None:
    import stat

    from gpuml.data.atomic import atomic_write

    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "f.json") as f:
            f.write(b"{}")
        plain = tmp_path / "plain"
        plain.write_bytes(b"")  # what open() makes under the same umask
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)


def test_current_umask_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from gpuml.data import atomic

    real_open = builtins.open

    def no_proc(file, *a, **kw):
        if str(file).startswith("/proc"):
            raise FileNotFoundError(file)
        return real_open(file, *a, **kw)

    old = os.umask(0o027)
    try:
        assert atomic.current_umask() == 0o027
        monkeypatch.setattr(builtins, "open", no_proc)
        assert atomic.current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # left as it was
    finally:
        os.umask(old)


def _tiny_dataset():
    """12 random 4x4 images in 3 classes (train), 6 (test): a Dataset without files."""
    import numpy as np

    from gpuml.data.datasets import DatasetSpec
    from gpuml.data.loader import Dataset, Split, pixel_stats

    rng = np.random.default_rng(0)
    train = Split(rng.integers(0, 256, (12, 1, 4, 4), dtype=np.uint8), rng.integers(0, 3, 12))
    test = Split(rng.integers(0, 256, (6, 1, 4, 4), dtype=np.uint8), rng.integers(0, 3, 6))
    spec = DatasetSpec("tiny", {}, (), ("a", "b", "c"), (1, 4, 4))
    return Dataset(spec, Path("."), train, None, test, *pixel_stats(train.images))


def test_one_epoch_is_singular_in_the_log(tmp_path: Path) -> None:
    from gpuml.train.config import validate
    from gpuml.train.trainer import Trainer

    cfg = validate({"device": "cpu", "data": {"val_split": 0},
                    "model": {"layers": [{"type": "flatten"}, {"type": "dense", "units": 3}]},
                    "trainer": {"epochs": 1, "batch_size": 4, "progress": False}})
    lines: list[str] = []
    Trainer(cfg, tmp_path / "run", log=lines.append, dataset=_tiny_dataset()).fit(progress=False)
    assert "(1 epoch, " in lines[-1] and "epochs" not in lines[-1]


def _deny_under(monkeypatch: pytest.MonkeyPatch, locked: Path) -> None:
    """Make every stat below `locked` fail as it does in a folder without read/search permission
    (tests run as root, where chmod 000 stops nothing)."""
    real_stat = Path.stat

    def stat(self: Path, *a, **kw):
        if str(self).startswith(str(locked) + os.sep):
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *a, **kw)

    monkeypatch.setattr(Path, "stat", stat)


def test_unreadable_dataset_folder_is_one_data_error(tmp_path: Path, monkeypatch, capsys) -> None:
    from gpuml.data.loader import load_dataset
    from gpuml.errors import DataError

    locked = tmp_path / "locked"
    locked.mkdir()
    _deny_under(monkeypatch, locked)
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", root=locked, download=False)
    assert str(e.value).startswith(f"{locked}{os.sep}") and ": permission denied;" in str(e.value)
    code = main(["train", str(CONFIGS / "mlp.yaml"), "--set", f"data.root={locked}", "--set", "data.download=false",
                 "--out", str(tmp_path / "run")])
    assert code == 3 and ": permission denied;" in _last_error(capsys)


def test_unreadable_dataset_file_is_one_data_error(tmp_path: Path, monkeypatch) -> None:
    import gpuml.data.idx as idx
    from gpuml.data.loader import load_dataset
    from gpuml.errors import DataError

    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"")

    def denied(file, *a, **kw):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(idx, "open", denied, raising=False)
    with pytest.raises(DataError, match=f"^{tmp_path / 'train-images-idx3-ubyte'}: cannot open "):
        load_dataset("fashion_mnist", root=tmp_path, download=False)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads anything")
def test_chmod_000_dataset_folder(tmp_path: Path) -> None:
    from gpuml.data.loader import load_dataset
    from gpuml.errors import DataError

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        with pytest.raises(DataError, match="permission denied"):
            load_dataset("fashion_mnist", root=locked, download=False)
    finally:
        locked.chmod(0o700)


def test_unreadable_predict_input(tmp_path: Path, monkeypatch) -> None:
    from gpuml.errors import DataError
    from gpuml.predict import load_images

    locked = tmp_path / "locked"
    locked.mkdir()
    _deny_under(monkeypatch, locked)
    with pytest.raises(DataError, match=f"^{locked / 'x.npy'}: permission denied"):
        load_images(locked / "x.npy", (1, 28, 28))


def test_layer_too_big_for_host_memory_names_layer_and_bytes() -> None:
    """8 TB of weights: numpy refuses at once, nothing is allocated."""
    from gpuml.backend import get_backend
    from gpuml.errors import DeviceError
    from gpuml.train.build import build_model
    from gpuml.train.config import validate

    cfg = validate({"device": "cpu", "model": {"layers": [{"type": "flatten"},
                                                          {"type": "dense", "units": 10**6, "name": "huge"}]}})
    with pytest.raises(DeviceError) as e:  # (10**6 x 10**6) float64 for the initial weights
        build_model(cfg, get_backend("cpu"), (10**6,))
    assert e.value.exit_code == 4
    assert str(e.value) == ("layer huge: out of host memory allocating its parameters: 8,000,000,000,000 bytes "
                            "(7,450.6 GiB) for shape (1000000, 1000000) float64; use fewer units or filters")


def test_layer_that_numpy_would_allocate_but_not_fit_is_refused_first(monkeypatch) -> None:
    """Linux overcommits: a dense layer of 10**6 units asked numpy for 10 GB, got it, and the OOM
    killer ended the run (exit 137, no message) when Adam's state was touched. The check uses
    MemAvailable; here 1 MB of it."""
    from gpuml.backend import get_backend
    from gpuml.errors import DeviceError
    from gpuml.nn import memory
    from gpuml.train.build import build_model
    from gpuml.train.config import validate

    monkeypatch.setattr(memory, "available_host_memory", lambda: 10**6)
    cfg = validate({"device": "cpu", "model": {"layers": [{"type": "dense", "units": 1000, "name": "big"},
                                                          {"type": "dense", "units": 10}]}})
    with pytest.raises(DeviceError) as e:
        build_model(cfg, get_backend("cpu"), (500,))
    assert e.value.exit_code == 4
    assert str(e.value) == ("layer big: out of host memory for its parameters: shape (500, 1000) float32 needs "
                            "8,000,000 bytes (0.0 GiB) for value, gradient and optimizer state, 0.0 GiB "
                            "available; use fewer units or filters")
    build_model(cfg, get_backend("cpu"), (20,))  # 20 x 1000 x 4 bytes x 4 copies fits in 1 MB


def test_activation_buffer_too_big_names_layer_and_batch() -> None:
    import numpy as np

    from gpuml.backend import get_backend
    from gpuml.errors import DeviceError
    from gpuml.nn.layers import Dense

    layer = Dense(10**6, name="wide")
    layer.build((1,), get_backend("cpu"), np.random.default_rng(0))
    x = np.broadcast_to(np.zeros((1, 1), np.float32), (10**7, 1))  # a 10**7 batch in 4 bytes
    with pytest.raises(DeviceError, match=r"^layer wide: out of host memory allocating its y buffer for a batch "
                                          r"of 10000000: 40,000,000,000,000 bytes .*try a smaller batch size$"):
        layer.forward(x, training=True)


def test_memory_error_elsewhere_names_batch_size() -> None:
    from gpuml.train.trainer import out_of_memory_message

    err = out_of_memory_message(MemoryError("Unable to allocate 3.00 GiB for an array"), 4096)
    assert err is not None and err.exit_code == 4
    assert str(err) == ("host out of memory at trainer.batch_size 4096: Unable to allocate 3.00 GiB for an array; "
                        "try a smaller trainer.batch_size")
    assert out_of_memory_message(ValueError("x"), 4096) is None


def _run_folder(tmp_path: Path) -> Path:
    """A finished run folder made through the Python API (fast, synthetic data)."""
    import gpuml
    from gpuml import layers
    from tests.test_finetune import synthetic

    x, y = synthetic(80)
    model = gpuml.Sequential([layers.Flatten(), layers.Dense(4)])
    model.compile()
    model.fit(x, y, device="cpu", verbose=0, batch_size=40, run_dir=tmp_path / "run")
    return tmp_path / "run"


def test_os_errors_in_a_run_folder_are_one_line_exit_8(tmp_path: Path, monkeypatch, capsys) -> None:
    """PermissionError / IsADirectoryError on a run file: one line naming the file and the
    reason, exit 8 (README: run folder files); a temporary file's name is not shown."""
    import tempfile

    run = _run_folder(tmp_path)
    (run / "weights.npz").unlink()
    (run / "weights.npz").mkdir()  # IsADirectoryError from np.load
    assert main(["eval", str(run)]) == 8
    assert _last_error(capsys) == f"gpuml: error: {run / 'weights.npz'}: is a directory"
    real_read_text = Path.read_text

    def denied(self: Path, *a, **kw):
        if self.name == "run.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", denied)
    np_input = tmp_path / "x.npy"
    import numpy as np

    np.save(np_input, np.zeros((2, 8, 8), dtype=np.uint8))
    assert main(["predict", str(run), str(np_input), "--checkpoint", "last"]) == 8
    assert _last_error(capsys) == f"gpuml: error: {run / 'run.json'}: permission denied"
    monkeypatch.undo()

    def no_write(*a, dir: str = ".", prefix: str = "", suffix: str = "", **kw):
        raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "ab_c1234" + suffix))

    monkeypatch.setattr(tempfile, "mkstemp", no_write)
    assert main(["train", "--resume", str(run), "--set", "trainer.epochs=2", "--allow-config-change",
                 "--no-progress"]) == 8
    assert _last_error(capsys) == f"gpuml: error: {run / 'config.yaml'}: permission denied"
    monkeypatch.undo()
    newest = sorted((run / "checkpoints").glob("step-*.npz"))[-1]
    real_load = np.load

    def unreadable(file, *a, **kw):
        if Path(file) == newest:
            raise PermissionError(13, "Permission denied", str(file))
        return real_load(file, *a, **kw)

    monkeypatch.setattr(np, "load", unreadable)  # not damage: not skipped, not renamed *.damaged
    for args in (["eval", str(run), "--checkpoint", "last"], ["train", "--resume", str(run)]):
        assert main(args) == 8
        assert _last_error(capsys) == f"gpuml: error: {newest}: permission denied"
    assert newest.exists()


def test_os_error_fallback_keeps_bugs_and_disk_full(tmp_path: Path, monkeypatch, capsys) -> None:
    import errno

    import gpuml.cli as cli

    def raising(exc: BaseException):
        def cmd(args) -> int:
            raise exc
        return cmd

    elsewhere = str(tmp_path / "elsewhere.txt")
    monkeypatch.setattr(cli, "cmd_info", raising(PermissionError(13, "Permission denied", elsewhere)))
    assert main(["info"]) == 1  # not a run folder's file: no more specific code
    assert _last_error(capsys) == f"gpuml: error: {elsewhere}: permission denied"
    monkeypatch.setattr(cli, "cmd_info", raising(OSError(errno.ENOSPC, "No space left on device", elsewhere)))
    assert main(["info"]) == 6
    assert _last_error(capsys) == f"gpuml: error: {elsewhere}: no space left on device"
    for bug in (OSError("no file named"), ValueError("a bug")):  # tracebacks stay for bugs
        monkeypatch.setattr(cli, "cmd_info", raising(bug))
        with pytest.raises(type(bug)):
            main(["info"])


def test_summary_shows_both_sides_of_uneven_strides_and_padding() -> None:
    """conv [3, 2] stride [2, 1] pad [1, 0] was summarised as "stride 2 pad 1", a pool with
    stride (1, 2) as "stride 1", and pool padding not at all."""
    import numpy as np

    from gpuml.backend import get_backend
    from gpuml.nn.layers import AvgPool2D, Conv2D, MaxPool2D

    be, rng = get_backend("cpu"), np.random.default_rng(0)
    conv = Conv2D(4, (3, 2), stride=(2, 1), padding=(1, 0), activation="tanh")
    conv.build((1, 9, 9), be, rng)
    assert conv.describe() == "4 3x2 stride 2x1 pad 1x0, tanh"
    square = Conv2D(4, 3, stride=2, padding=1)
    square.build((1, 9, 9), be, rng)
    assert square.describe() == "4 3x3 stride 2 pad 1"
    assert AvgPool2D((2, 3), stride=(1, 2), padding=(1, 1)).describe() == "2x3 stride 1x2 pad 1"
    assert MaxPool2D(2).describe() == "2x2"
