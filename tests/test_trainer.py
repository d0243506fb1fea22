"""The trainer end to end through the real `gpuml` command (subprocesses, real Fashion-MNIST,
CPU): run files, learning, determinism, exact resume after SIGKILL and Ctrl-C, early stopping,
failure messages and exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import CONFIGS, REPO

TIMING = ("seconds", "samples_per_second")


def tiny_config(tmp_path: Path, fashion_root: Path, **over) -> Path:
    cfg = {
        "name": "tiny", "device": "cpu", "seed": 3,
        "data": {"dataset": "fashion_mnist", "root": str(fashion_root), "limit": 1500, "val_split": 300},
        "model": {"layers": [{"type": "flatten"}, {"type": "dense", "units": 32, "activation": "relu"},
                             {"type": "dropout", "rate": 0.2}, {"type": "dense", "units": 10}]},
        "optimizer": {"name": "adam", "lr": 0.003},
        "trainer": {"epochs": 4, "batch_size": 50, "eval_batch_size": 500},
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            cfg.setdefault(section, {})[field] = value
        else:
            cfg[section] = value
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def gpuml(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "gpuml.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"gpuml {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, np.ndarray]:
    with np.load(run / "weights.npz") as z:
        return {k: z[k] for k in z.files}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k


def test_smoke_config_trains_and_writes_run_files(tmp_path: Path, fashion_root: Path) -> None:
    run = tmp_path / "smoke"
    proc = gpuml("train", CONFIGS / "smoke.yaml", "--set", f"data.root={fashion_root}", "--set", "device=cpu",
                 "--out", run)
    assert "gpuml: device cpu" in proc.stderr.splitlines()[0]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert set(r) == {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds",
                          "samples_per_second"}
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["val_loss"] < rows[0]["val_loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["test_accuracy"] > 0.6 and summary["device"].startswith("cpu")
    assert {"test_loss", "seconds"} <= set(summary)
    assert yaml.safe_load((run / "config.yaml").read_text())["device"] == "cpu"
    assert (run / "metrics.csv").read_text().count("\n") == 4
    assert set(weights(run)) == {"conv2d_1.W", "conv2d_1.b", "dense_1.W", "dense_1.b", "dense_2.W", "dense_2.b"}
    # eval re-computes the same test accuracy from the saved weights
    ev = json.loads(gpuml("eval", run).stdout)
    assert ev["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)


def test_same_seed_same_metrics_and_weights(tmp_path: Path, fashion_root: Path) -> None:
    cfg = tiny_config(tmp_path, fashion_root, trainer__epochs=2)
    gpuml("train", cfg, "--out", tmp_path / "a", "--no-progress")
    gpuml("train", cfg, "--out", tmp_path / "b", "--no-progress")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert_same_weights(tmp_path / "a", tmp_path / "b")


def _start(cfg: Path, run: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "gpuml.cli", "train", str(cfg), "--out", str(run), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_checkpoint(proc: subprocess.Popen, run: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if list((run / "checkpoints").glob("step-*.npz")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its first checkpoint: {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


def test_resume_after_sigkill_equals_uninterrupted(tmp_path: Path, fashion_root: Path) -> None:
    cfg = tiny_config(tmp_path, fashion_root, trainer__epochs=8)
    gpuml("train", cfg, "--out", tmp_path / "full", "--no-progress")
    run = tmp_path / "killed"
    proc = _start(cfg, run)
    _wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed"
    done = len(metrics(run))
    assert done < 8
    gpuml("train", "--resume", run, "--no-progress")
    assert metrics(run) == metrics(tmp_path / "full")
    assert_same_weights(run, tmp_path / "full")


def stop_at_step(step: int, action: str, *args: str) -> subprocess.CompletedProcess:
    """`gpuml ARGS` with the trainer interrupted at `step` (see tests/stop_at_step.py)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "tests.stop_at_step", str(step), action, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


def checkpoint_meta(path: Path) -> dict:
    with np.load(path) as z:
        return json.loads(bytes(z["meta"]).decode())


def test_ctrl_c_checkpoints_mid_epoch_and_resume_is_exact(tmp_path: Path, fashion_root: Path) -> None:
    cfg = tiny_config(tmp_path, fashion_root, trainer__epochs=6, trainer__batch_size=10)
    gpuml("train", cfg, "--out", tmp_path / "full", "--no-progress")
    run = tmp_path / "interrupted"
    # 1,200 training samples in batches of 10: 120 steps per epoch, so step 150 is batch 30 of epoch 2.
    proc = stop_at_step(150, f"signal:{int(signal.SIGINT)}", "train", cfg, "--out", run, "--no-progress")
    err = proc.stderr
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "gpuml train --resume" in err and "Traceback" not in err
    ckpts = sorted((run / "checkpoints").glob("step-*.npz"))
    assert ckpts[-1].name == "step-000000150.npz"
    meta = checkpoint_meta(ckpts[-1])
    assert meta["global_step"] == 150 and meta["epoch"] == 1  # stopped mid-epoch 2, not at a boundary
    assert meta["data"]["cursor"] == 30 and meta["partial"]["seen"] == 300 and meta["partial"]["loss_sum"] > 0
    gpuml("train", "--resume", run, "--no-progress")
    assert metrics(run) == metrics(tmp_path / "full")
    assert_same_weights(run, tmp_path / "full")


def test_sigterm_checkpoints_and_exits_143(tmp_path: Path, fashion_root: Path) -> None:
    cfg = tiny_config(tmp_path, fashion_root, trainer__epochs=2)
    run = tmp_path / "terminated"
    proc = stop_at_step(30, f"signal:{int(signal.SIGTERM)}", "train", cfg, "--out", run, "--no-progress")
    assert proc.returncode == 143, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gpuml: error: terminated at epoch 2, step 30") and "checkpoint saved" in last
    assert checkpoint_meta(run / "checkpoints" / "step-000000030.npz")["data"]["cursor"] == 6


def test_resume_with_changed_config_is_refused_unless_allowed(tmp_path: Path, fashion_root: Path) -> None:
    cfg = tiny_config(tmp_path, fashion_root, trainer__epochs=1)
    run = tmp_path / "r"
    gpuml("train", cfg, "--out", run, "--no-progress")
    proc = gpuml("train", "--resume", run, "--set", "optimizer.lr=0.1", "--set", "trainer.epochs=2", check=False)
    assert proc.returncode == 2
    assert "optimizer.lr" in proc.stderr and "trainer.epochs" in proc.stderr and "--allow-config-change" in proc.stderr
    gpuml("train", "--resume", run, "--set", "trainer.epochs=2", "--allow-config-change", "--no-progress")
    assert [m["epoch"] for m in metrics(run)] == [1, 2]


def test_early_stopping_restores_best_weights(tmp_path: Path, fashion_root: Path) -> None:
    # A learning rate this high makes validation loss worsen after the first epochs.
    cfg = tiny_config(tmp_path, fashion_root, trainer__epochs=30, optimizer={"name": "sgd", "lr": 0.9},
                      trainer__early_stopping={"enabled": True, "monitor": "val_loss", "patience": 1},
                      trainer__monitor="val_loss")
    run = tmp_path / "es"
    proc = gpuml("train", cfg, "--out", run, "--no-progress")
    rows = metrics(run)
    assert len(rows) < 30 and "early stopping" in proc.stderr
    best_epoch = min(rows, key=lambda r: r["val_loss"])["epoch"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_early"] and summary["best"]["epoch"] == best_epoch
    ev = json.loads(gpuml("eval", run, "--split", "val").stdout)
    best_val = min(r["val_loss"] for r in rows)
    assert ev["val_loss"] == pytest.approx(best_val, rel=1e-5)


def test_unknown_monitor_lists_metric_names(tmp_path: Path, fashion_root: Path) -> None:
    cfg = tiny_config(tmp_path, fashion_root, trainer__early_stopping={"enabled": True, "monitor": "val_acc"})
    proc = gpuml("train", cfg, "--out", tmp_path / "m", check=False)
    assert proc.returncode != 0 and "val_acc" in proc.stderr and "val_accuracy" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_nan_loss_stops_with_step_and_checkpoint(tmp_path: Path, fashion_root: Path) -> None:
    cfg = tiny_config(tmp_path, fashion_root, optimizer={"name": "sgd", "lr": 1e30})
    proc = gpuml("train", cfg, "--out", tmp_path / "nan", check=False)
    assert proc.returncode == 5, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "loss became" in last and "step" in last and ("checkpoint" in last) and "Traceback" not in proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # the loss check reports, not NumPy


def test_layers_that_do_not_fit_fail_at_build(tmp_path: Path, fashion_root: Path) -> None:
    layers = [{"type": "conv2d", "filters": 4, "kernel": 3}, {"type": "dense", "units": 10}]
    proc = gpuml("train", tiny_config(tmp_path, fashion_root, model={"layers": layers}), check=False)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "model.layers.1" in line and "dense_1" in line and "(4, 26, 26)" in line and "flatten" in line
    layers = [{"type": "conv2d", "filters": 4, "kernel": 31}]
    proc = gpuml("train", tiny_config(tmp_path, fashion_root, model={"layers": layers}), check=False)
    assert proc.returncode == 2 and "kernel 31x31 is larger" in proc.stderr and "(1, 28, 28)" in proc.stderr


def test_typo_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "mlp.yaml").read_text().replace("epochs: 5", "epochz: 5"))
    proc = gpuml("train", bad, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "epochz" in proc.stderr and "did you mean 'epochs'" in proc.stderr


def test_device_cuda_without_gpu_is_a_clear_error(tmp_path: Path, fashion_root: Path) -> None:
    from gpuml.backend import cuda_status

    if cuda_status()[0]:
        pytest.skip("a GPU is present")
    proc = gpuml("train", tiny_config(tmp_path, fashion_root), "--set", "device=cuda", check=False)
    assert proc.returncode == 4 and "no GPU is usable" in proc.stderr and proc.stderr.count("\n") == 1
