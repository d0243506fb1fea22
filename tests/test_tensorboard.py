"""TensorBoard event files written by gpuml: the record framing and CRC-32C, and a training run
with trainer.tensorboard read back by TensorBoard's own loader (the `tensorboard` extra)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import yaml

from gpuml.cli import main
from gpuml.data.user import save_npz_dataset
from gpuml.train.tensorboard import EventWriter, crc32c, masked_crc32c, record_bytes


def test_crc32c_known_values():
    assert crc32c(b"") == 0
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def _records(path):
    """Payloads of a TFRecord file, each length and CRC checked."""
    blob, i, out = path.read_bytes(), 0, []
    while i < len(blob):
        (n,) = struct.unpack_from("<Q", blob, i)
        assert struct.unpack_from("<I", blob, i + 8)[0] == masked_crc32c(blob[i:i + 8])
        payload = blob[i + 12:i + 12 + n]
        assert struct.unpack_from("<I", blob, i + 12 + n)[0] == masked_crc32c(payload)
        out.append(payload)
        i += 16 + n
    return out


def test_record_framing(tmp_path):
    assert record_bytes(b"abc")[:8] == struct.pack("<Q", 3)
    w = EventWriter(tmp_path)
    w.scalars(7, {"a": 1.5})
    w.close()
    payloads = _records(w.path)
    assert len(payloads) == 2 and b"brain.Event:2" in payloads[0] and b"a" in payloads[1]
    assert w.path.name.startswith("events.out.tfevents.")


def test_events_parse_with_tensorboards_protobuf(tmp_path):
    event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
    w = EventWriter(tmp_path)
    w.scalars(-1, {"x": -0.25})  # a negative step: int64 two's complement varint
    w.scalars(123456789012, {"loss": 0.5, "acc": 0.75})
    w.close()
    events = [event_pb2.Event.FromString(p) for p in _records(w.path)]
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == -1 and events[1].summary.value[0].simple_value == -0.25
    assert events[2].step == 123456789012
    assert {v.tag: v.simple_value for v in events[2].summary.value} == {"loss": 0.5, "acc": 0.75}
    assert events[2].wall_time >= events[0].wall_time > 1e9


def test_training_run_writes_step_and_epoch_scalars(tmp_path):
    loader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (56, 6, 6), dtype=np.uint8), rng.integers(0, 2, 56)
    data = save_npz_dataset(tmp_path / "d.npz", x[:48], y[:48], x[48:], y[48:])
    cfg = {"device": "cpu", "data": {"dataset": "npz", "path": str(data), "val_split": 8},
           "model": {"layers": [{"type": "flatten"}, {"type": "dense", "units": 2}]},
           "trainer": {"epochs": 2, "batch_size": 8, "log_every": 2, "tensorboard": True}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(run), "--no-progress"]) == 0
    acc = loader.EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/accuracy", "lr", "epoch/train_loss", "epoch/val_accuracy"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10]  # 5 batches an epoch, 2 epochs
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch_loss = acc.Scalars("epoch/train_loss")
    assert [e.step for e in epoch_loss] == [5, 10]
    np.testing.assert_allclose([e.value for e in epoch_loss], [r["train_loss"] for r in rows], rtol=1e-6)
    assert all(e.value == pytest.approx(1e-3) for e in acc.Scalars("lr"))
    def files():
        return sorted((f.name, f.stat().st_size) for f in (run / "tensorboard").iterdir())

    before = files()
    assert main(["eval", str(run)]) == 0  # builds a Trainer from the same config: writes no events
    assert files() == before and len(before) == 1


def test_off_by_default_writes_nothing(tmp_path):
    from gpuml.train.config import validate
    from gpuml.train.tensorboard import TensorBoardLogger

    cfg = validate({"model": {"layers": [{"type": "flatten"}]}})
    assert cfg["trainer"]["tensorboard"] is False
    assert TensorBoardLogger.from_config(cfg, tmp_path) is None and not (tmp_path / "tensorboard").exists()


def test_write_failures_are_gpuml_errors(tmp_path, monkeypatch):
    """A full disk while appending events was a raw OSError traceback (atomic_write's
    translation does not cover this open file): DiskFullError naming the event file; a
    tensorboard/ that is a file is a RunError (exit 8) instead of FileExistsError."""
    import errno

    from gpuml.errors import DiskFullError, RunError

    writer = EventWriter(tmp_path / "tb")

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_file", Full())
    with pytest.raises(DiskFullError, match=f"^{writer.path}: no space left on device$"):
        writer.scalars(1, {"loss": 1.0})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").write_text("not a folder")
    with pytest.raises(RunError, match="cannot write TensorBoard events") as info:
        EventWriter(tmp_path / "run" / "tensorboard")
    assert info.value.exit_code == 8
