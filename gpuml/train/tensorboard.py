"""TensorBoard event files (`trainer.tensorboard: true` -> RUN_DIR/tensorboard/), written by gpuml
itself: no TensorFlow, tensorboard or tensorboardX needed to write them (the `tensorboard` extra
is only the viewer: `tensorboard --logdir RUN_DIR/tensorboard`).

Format. An event file is a sequence of TFRecords: u64 length, masked CRC-32C of the length,
the payload, masked CRC-32C of the payload (little-endian). Each payload is a serialised
`tensorflow.Event` protobuf; the fields written here are wall_time (1, double), step (2, int64),
file_version (3, string; the first record, "brain.Event:2") and summary (5) holding
Summary.Value entries of tag (1, string) and simple_value (2, float).

What is logged. Every `trainer.log_every` steps: train/loss and train/accuracy over the steps
since the previous point (within the epoch), and lr (x axis: global step). After every epoch: each metric of the
epoch row (train_loss, val_accuracy, ...) under epoch/<name> at the epoch's last global step.
A resumed run appends a new file; points after its checkpoint are written again.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpuml.data.atomic import disk_full_as_error
from gpuml.errors import RunError

# ---------------------------------------------------------------------------------- encoding


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 fields are encoded as their two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def event_bytes(wall_time: float, step: int, *, file_version: str | None = None,
                scalars: dict[str, float] | None = None) -> bytes:
    """One serialised Event protobuf."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value))
            for tag, value in scalars.items()
        )
        out += _field_bytes(5, values)
    return out


def record_bytes(payload: bytes) -> bytes:
    """One TFRecord around `payload`."""
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", masked_crc32c(length)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


# ---------------------------------------------------------------------------------- writer


class EventWriter:
    """Appends scalar events to one new event file in `folder`; each write is flushed, so a
    viewer (or a crash) sees every point written so far."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.gpuml"
        with _write_errors(self.path):
            folder.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open for the run, closed in close()
        self._write(event_bytes(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, payload: bytes) -> None:
        with _write_errors(self.path):
            self._file.write(record_bytes(payload))
            self._file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write(event_bytes(time.time(), step, scalars=values))

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """A full disk is DiskFullError naming the event file (the trainer adds the last good
    checkpoint); any other write failure (tensorboard/ a file, no permission) a RunError."""
    try:
        with disk_full_as_error(path):
            yield
    except OSError as exc:
        raise RunError(f"{path}: cannot write TensorBoard events ({exc.strerror or exc})") from None


class TensorBoardLogger:
    """What the trainer calls: `on_read_back` after each read-back of the device loss sums (it
    writes every log_every steps) and `on_epoch_end` with the epoch's metrics row."""

    def __init__(self, folder: Path, log_every: int) -> None:
        self.folder = folder
        self.writer: EventWriter | None = None  # opened at the first point: eval/predict build a
        self.log_every = log_every              # Trainer too, and must leave no empty event file
        self._last = (0.0, 0.0, 0)  # (loss_sum, correct, seen) at the previous point
        self._last_step = 0

    @classmethod
    def from_config(cls, cfg: dict[str, Any], run_dir: Path) -> TensorBoardLogger | None:
        t = cfg["trainer"]
        return cls(Path(run_dir) / "tensorboard", t["log_every"]) if t.get("tensorboard") else None

    def on_read_back(self, step: int, partial: dict[str, Any], lr: float) -> None:
        """`partial`: the epoch's running sums (loss_sum, correct, seen) after `step` steps."""
        loss_sum, correct, seen = partial["loss_sum"], partial["correct"], partial["seen"]
        if seen < self._last[2]:  # a new epoch restarted the sums
            self._last = (0.0, 0.0, 0)
        # On CPU this is called every step, on a GPU every log_every steps of an epoch.
        if step - self._last_step < self.log_every or seen == self._last[2]:
            return
        n = seen - self._last[2]
        self._scalars(step, {"train/loss": (loss_sum - self._last[0]) / n,
                                   "train/accuracy": (correct - self._last[1]) / n, "lr": lr})
        self._last, self._last_step = (loss_sum, correct, seen), step

    def on_epoch_end(self, row: dict[str, Any], step: int) -> None:
        values = {f"epoch/{k}": float(v) for k, v in row.items()
                  if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._scalars(step, values)
        self._last = (0.0, 0.0, 0)

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            self.writer = EventWriter(self.folder)
        self.writer.scalars(step, values)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
