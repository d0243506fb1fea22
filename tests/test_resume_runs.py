"""Resume from any moment, through the real `gpuml` command: killed before the first
checkpoint, from a mid-epoch checkpoint (trainer.checkpoint_every), past damaged checkpoints,
a finished run left alone, training time adding up across resumes; the run-folder exit codes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from gpuml.train import checkpoint as ckpt
from tests.test_trainer import assert_same_weights, checkpoint_meta, gpuml, metrics, stop_at_step, tiny_config

KILL = f"signal:{int(signal.SIGKILL)}"
STEPS_PER_EPOCH = 24  # tiny_config: 1,200 training samples in batches of 50


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory, fashion_root: Path) -> Path:
    """An uninterrupted 4-epoch run, default checkpoints: what every resumed run must equal."""
    tmp = tmp_path_factory.mktemp("full")
    gpuml("train", tiny_config(tmp, fashion_root), "--out", tmp / "run", "--no-progress")
    return tmp / "run"


def test_killed_before_the_first_checkpoint_resumes_from_the_beginning(tmp_path: Path, fashion_root: Path,
                                                                        full: Path) -> None:
    run = tmp_path / "run"
    proc = stop_at_step(5, KILL, "train", tiny_config(tmp_path, fashion_root), "--out", run, "--no-progress")
    assert proc.returncode == -signal.SIGKILL
    assert not list((run / "checkpoints").glob("step-*.npz")) and (run / "config.yaml").exists()
    stale = run / "checkpoints" / ".step-000000024.npz.x1y2.part"  # what a kill during a write leaves
    stale.parent.mkdir(exist_ok=True)
    stale.write_bytes(b"PK")
    proc = gpuml("train", "--resume", run, "--no-progress")
    assert not stale.exists()
    assert "no checkpoint yet; starting from the beginning" in proc.stderr
    assert metrics(run) == metrics(full)
    assert_same_weights(run, full)


def test_mid_epoch_checkpoints_every_n_steps_resume_exactly(tmp_path: Path, fashion_root: Path, full: Path) -> None:
    cfg = tiny_config(tmp_path, fashion_root, trainer__checkpoint_every={"steps": 7})
    run = tmp_path / "run"
    proc = stop_at_step(38, KILL, "train", cfg, "--out", run, "--no-progress")
    assert proc.returncode == -signal.SIGKILL
    newest = ckpt.list_checkpoints(run / "checkpoints")[-1]
    meta = checkpoint_meta(newest)
    # step 35 = batch 11 of epoch 2: saved mid-epoch, with that epoch's partial sums
    assert newest.name == "step-000000035.npz" and meta["epoch"] == 1 and meta["global_step"] == 35
    assert meta["data"]["cursor"] == 35 - STEPS_PER_EPOCH and meta["partial"]["seen"] == 11 * 50
    gpuml("train", "--resume", run, "--no-progress")
    assert metrics(run) == metrics(full)  # the extra checkpoints change nothing either
    assert_same_weights(run, full)


def test_mid_epoch_checkpoints_by_time(tmp_path: Path, fashion_root: Path) -> None:
    cfg = tiny_config(tmp_path, fashion_root, trainer__checkpoint_every={"minutes": 1e-9})
    run = tmp_path / "run"
    assert stop_at_step(10, KILL, "train", cfg, "--out", run, "--no-progress").returncode == -signal.SIGKILL
    meta = checkpoint_meta(ckpt.list_checkpoints(run / "checkpoints")[-1])
    assert meta["global_step"] == 9 and meta["data"]["cursor"] == 9 and meta["epoch"] == 0


def test_damaged_checkpoints_are_skipped_with_a_line_each(tmp_path: Path, fashion_root: Path, full: Path) -> None:
    cfg = tiny_config(tmp_path, fashion_root, trainer__checkpoint_every={"steps": 12},
                      trainer__keep_checkpoints=3)
    run = tmp_path / "run"
    assert stop_at_step(62, KILL, "train", cfg, "--out", run, "--no-progress").returncode == -signal.SIGKILL
    folder = run / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(folder)] == [f"step-0000000{s}.npz" for s in (36, 48, 60)]
    (folder / "step-000000060.npz").write_bytes(b"")  # 0 bytes: np.load raises EOFError
    half = folder / "step-000000048.npz"
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])  # truncated
    proc = gpuml("train", "--resume", run, "--no-progress")
    lines = proc.stderr.splitlines()
    skipped = [ln for ln in lines if ln.startswith("skipped ")]
    assert len(skipped) == 2 and "step-000000060.npz" in skipped[0] and "EOFError" in skipped[0]
    assert "step-000000048.npz" in skipped[1] and "damaged" in skipped[1]
    assert any("resumed from" in ln and "step-000000036.npz" in ln for ln in lines)
    assert (folder / "step-000000060.npz.damaged").exists() and "Traceback" not in proc.stderr
    assert metrics(run) == metrics(full)
    assert_same_weights(run, full)


def test_empty_checkpoint_file_is_a_one_line_error(tmp_path: Path) -> None:
    from gpuml.errors import RunError

    (tmp_path / "e.npz").write_bytes(b"")
    with pytest.raises(RunError, match=r"e\.npz: checkpoint is damaged \(EOFError"):
        ckpt.load(tmp_path / "e.npz")


def test_resuming_a_finished_run_changes_nothing(tmp_path: Path, fashion_root: Path, full: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(full, run)

    def files() -> dict[str, tuple[bytes, int]]:  # but the lock's own record of who holds it
        return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*")
                if p.is_file() and p.name != ".lock"}

    before = files()
    proc = gpuml("train", "--resume", run, "--no-progress")
    assert "already finished (4 epochs); nothing to do" in proc.stderr.strip().splitlines()[-1]
    assert files() == before


def test_training_time_adds_up_across_resumes(tmp_path: Path, fashion_root: Path) -> None:
    cfg = tiny_config(tmp_path, fashion_root, trainer__epochs=1)
    run = tmp_path / "run"
    gpuml("train", cfg, "--out", run, "--no-progress")
    gpuml("train", "--resume", run, "--set", "trainer.epochs=2", "--allow-config-change", "--no-progress")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2] and summary["epochs"] == 2
    assert summary["seconds"] >= rows[0]["seconds"] + rows[1]["seconds"]  # both sessions counted


def test_run_folder_exit_codes(tmp_path: Path, fashion_root: Path, full: Path) -> None:
    """8 for a run folder, checkpoint or weights file that is missing (README's table)."""
    (tmp_path / "not_a_run").mkdir()
    for args in (["train", "--resume", tmp_path / "not_a_run"], ["train", "--resume", tmp_path / "nowhere"],
                 ["eval", tmp_path / "not_a_run"], ["eval", full, "--checkpoint", "foo"],
                 ["train", tiny_config(tmp_path, fashion_root), "--out", full]):
        proc = gpuml(*args, check=False)
        assert proc.returncode == 8, (args, proc.stderr)
        assert proc.stderr.startswith("gpuml: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.yaml").write_text((full / "config.yaml").read_text())
    proc = gpuml("eval", no_weights, check=False)
    assert proc.returncode == 8 and "no final weights" in proc.stderr


def test_run_saved_with_the_old_val_split_count_resumes_unchanged(tmp_path: Path, fashion_root: Path, capsys) -> None:
    """data.val_split's default became the fraction 1/12; a run folder's config.yaml holds the
    value it ran with (5000, the old default), so it still resumes without a config change."""
    from gpuml.cli import main

    cfg = tiny_config(tmp_path, fashion_root, trainer__epochs=2, data__limit=5500, data__val_split=5000)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert "val_split: 5000\n" in (run / "config.yaml").read_text()
    for name in ("weights.npz", "summary.json"):  # as if killed after the first epoch
        (run / name).unlink()
    ckpt.list_checkpoints(run / "checkpoints")[-1].unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "differs" not in err and (run / "summary.json").exists()
