"""One-line user errors that name the right culprit: the command-line option that set a key,
duplicate YAML keys, unreadable files, host memory."""

from __future__ import annotations

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
