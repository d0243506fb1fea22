"""One process per run folder: a second `gpuml train` into a folder that is training, or a
`--resume` of it, stops with exit 7 naming the holder; the lock dies with its holder (kill -9)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpuml.errors import RunLockedError
from gpuml.train.runlock import LOCK_NAME, hold_run_lock
from tests.conftest import REPO
from tests.test_trainer import gpuml, metrics, tiny_config


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.01)


def test_second_process_in_a_training_run_folder_is_refused(tmp_path: Path, fashion_root: Path) -> None:
    cfg = tiny_config(tmp_path, fashion_root, trainer__epochs=2)
    run, gate = tmp_path / "run", tmp_path / "gate"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    first = subprocess.Popen([sys.executable, "-m", "tests.stop_at_step", "5", f"pause:{gate}", "train", str(cfg),
                              "--out", str(run), "--no-progress"], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(Path(f"{gate}.reached"), first)  # the first run is inside its first epoch
        for args in (["train", cfg, "--out", run], ["train", "--resume", run]):
            proc = gpuml(*args, "--no-progress", check=False)
            assert proc.returncode == 7, proc.stderr
            line = proc.stderr.strip()
            assert line.count("\n") == 0 and line.startswith(f"gpuml: error: {run} is in use by pid {first.pid}")
            assert socket.gethostname() in line
        gate.touch()
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    assert [r["epoch"] for r in metrics(run)] == [1, 2]  # no interleaved or doubled rows


def test_lock_of_a_killed_holder_is_never_stale(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = ("import sys, pathlib; from gpuml.train.runlock import hold_run_lock\n"
            "with hold_run_lock(pathlib.Path(sys.argv[1])):\n print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} on "):
            with hold_run_lock(run):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / LOCK_NAME).exists()  # left behind by kill -9, yet free:
    with hold_run_lock(run):
        assert f'"pid": {os.getpid()}' in (run / LOCK_NAME).read_text()


def test_lock_is_reentrant_and_a_failed_start_leaves_no_folder(tmp_path: Path) -> None:
    run = tmp_path / "new"
    with pytest.raises(ValueError):
        with hold_run_lock(run), hold_run_lock(run):  # the CLI holds it, then Trainer.fit again
            assert (run / LOCK_NAME).exists()
            raise ValueError("build failed")
    assert not run.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with hold_run_lock(existing):
        pass
    assert existing.is_dir()  # a folder it did not create is left alone


def test_unusable_run_folder_is_a_one_line_error(tmp_path: Path) -> None:
    from gpuml.errors import RunError

    (tmp_path / "file").write_text("")
    with pytest.raises(RunError, match="file: cannot use as a run folder"):
        with hold_run_lock(tmp_path / "file"):
            pass
