"""A full disk while writing checkpoints or metrics: one line naming the file and the last good
checkpoint, exit 6, that checkpoint intact, no temporary files left, and the run resumes.
Faults are injected in the write path; a real small tmpfs is used too where mounting is allowed."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

import gpuml.data.atomic as atomic
from gpuml.cli import main
from gpuml.train import checkpoint as ckpt
from gpuml.train.metrics import MetricsLog
from tests.test_resume_runs import full  # noqa: F401 (the uninterrupted run, a fixture)
from tests.test_trainer import assert_same_weights, gpuml, metrics, tiny_config


class _FullDiskFile:
    """A file that takes `room` bytes, then fails as write(2) does on a full disk."""

    def __init__(self, f, room: int) -> None:
        self._f, self._room = f, room

    def write(self, data) -> int:
        if len(data) > self._room:
            self._f.write(bytes(data[: self._room]))  # a partial write, as a real disk does
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def fail_nth_step_checkpoint(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """The n-th rolling checkpoint written gets 1,000 bytes of room, then ENOSPC."""
    real_fdopen, seen = os.fdopen, [0]

    def fdopen(fd: int, *args, **kw):
        f = real_fdopen(fd, *args, **kw)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".step-"):
            seen[0] += 1
            if seen[0] == n:
                return _FullDiskFile(f, 1000)
        return f

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)


def _no_temp_files(run: Path) -> None:
    assert not [p for p in run.rglob("*") if p.name.endswith(".part")]


def test_disk_full_while_checkpointing(tmp_path: Path, fashion_root: Path, full: Path,  # noqa: F811
                                       monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run = tmp_path / "run"
    fail_nth_step_checkpoint(monkeypatch, 3)  # the end of epoch 3: step 72
    assert main(["train", str(tiny_config(tmp_path, fashion_root)), "--out", str(run), "--no-progress"]) == 6
    err = capsys.readouterr().err.strip().splitlines()[-1]
    folder = run / "checkpoints"
    assert err == (f"gpuml: error: {folder / 'step-000000072.npz'}: no space left on device; kept the last good "
                   f"checkpoint {folder / 'step-000000048.npz'}; free some space, then: gpuml train --resume {run}")
    _no_temp_files(run)
    assert ckpt.load(folder / "step-000000048.npz")[2]["epoch"] == 2  # intact
    monkeypatch.undo()
    gpuml("train", "--resume", run, "--no-progress")
    assert metrics(run) == metrics(full)
    assert_same_weights(run, full)


def test_disk_full_while_appending_metrics(tmp_path: Path, fashion_root: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys) -> None:
    real_append, calls = MetricsLog.append, [0]

    def append(self, row) -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_append(self, row)

    monkeypatch.setattr(MetricsLog, "append", append)
    run = tmp_path / "run"
    assert main(["train", str(tiny_config(tmp_path, fashion_root)), "--out", str(run), "--no-progress"]) == 6
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{run / 'metrics.jsonl'}" in err and "no space left on device" in err
    assert f"kept the last good checkpoint {run / 'checkpoints' / 'step-000000048.npz'}" in err


def test_disk_full_on_a_real_small_tmpfs(tmp_path: Path, fashion_root: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        run = mnt / "run"
        proc = gpuml("train", tiny_config(tmp_path, fashion_root), "--out", run, "--no-progress", check=False)
        assert proc.returncode == 6, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"gpuml: error: {run}") and "no space left on device" in last
        assert "Traceback" not in proc.stderr
        _no_temp_files(run)
        good = ckpt.list_checkpoints(run / "checkpoints")
        if good:
            assert f"kept the last good checkpoint {good[-1]}" in last
            ckpt.load(good[-1])
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
