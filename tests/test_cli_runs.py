"""CLI commands on a finished run (predict, export, plot, eval --checkpoint, info) and the
failure paths that need an in-process fake (out of memory, missing data)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from gpuml.cli import main
from gpuml.data.idx import write_idx
from tests.test_trainer import tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, fashion_root: Path) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "run"
    assert main(["train", str(tiny_config(tmp, fashion_root, trainer__epochs=2)), "--out", str(out),
                 "--no-progress"]) == 0
    return out


def test_predict_npy_and_idx_match_eval_accuracy(run: Path, fashion_root: Path, tmp_path: Path, capsys) -> None:
    from gpuml.data.loader import load_dataset

    test = load_dataset("fashion_mnist", root=fashion_root, download=False).test
    images, labels = test.images[:500], test.labels[:500]
    np.save(tmp_path / "x.npy", images[:, 0])  # (N, 28, 28) uint8
    assert main(["predict", str(run), str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.npy")]) == 0
    probs = np.load(tmp_path / "p.npy")
    assert probs.shape == (500, 10) and np.allclose(probs.sum(1), 1.0)
    acc = (probs.argmax(1) == labels).mean()
    assert acc > 0.6
    write_idx(tmp_path / "x.idx", images)
    assert main(["predict", str(run), str(tmp_path / "x.idx"), "--out", str(tmp_path / "p.csv")]) == 0
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "index,class,name,probability" and len(rows) == 501
    assert [int(r.split(",")[1]) for r in rows[1:]] == list(probs.argmax(1))


def test_predict_rejects_wrong_shapes(run: Path, tmp_path: Path, capsys) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((3, 27, 27), dtype=np.uint8))
    assert main(["predict", str(run), str(tmp_path / "bad.npy")]) == 2
    err = capsys.readouterr().err
    assert "(3, 27, 27)" in err and "(1, 28, 28)" in err


def test_export_safetensors_reads_back_without_gpuml(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    assert main(["export", str(run), "--out", str(out)]) == 0
    with np.load(run / "weights.npz") as z:
        ref = {k: z[k] for k in z.files}
    # Parse the published format by hand: u64 header length, JSON header, raw little-endian data.
    blob = out.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    for name, arr in ref.items():
        meta = header[name]
        lo, hi = meta["data_offsets"]
        got = np.frombuffer(data[lo:hi], dtype="<f4").reshape(meta["shape"])
        assert meta["dtype"] == "F32" and np.array_equal(got, arr)
    st = pytest.importorskip("safetensors.numpy")
    loaded = st.load_file(str(out))
    assert loaded.keys() == ref.keys() and all(np.array_equal(loaded[k], ref[k]) for k in ref)


def test_export_npz_and_eval_checkpoints(run: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(run), "--format", "npz", "--out", str(tmp_path / "w.npz"), "--checkpoint", "best"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--checkpoint", "last"]) == 0
    last = json.loads(capsys.readouterr().out)
    summary = json.loads((run / "summary.json").read_text())
    assert last["test_accuracy"] == pytest.approx(summary["test_accuracy"])  # last epoch == final weights
    assert main(["eval", str(run), "--checkpoint", "nonexistent.npz"]) == 8  # RunError: documented
    assert "not found" in capsys.readouterr().err


def test_plot_overlays_runs(run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    assert main(["plot", str(run), str(run), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_out_of_memory_is_one_line_naming_batch_size(tmp_path: Path, fashion_root: Path, monkeypatch,
                                                      capsys) -> None:
    from gpuml.train.trainer import Trainer

    class OutOfMemoryError(Exception):  # what CuPy raises, matched by name
        pass

    def boom(self, *args):
        raise OutOfMemoryError("Out of memory allocating 8,589,934,592 bytes (allocated so far: 1,024 bytes).")

    monkeypatch.setattr(Trainer, "_step", boom)
    code = main(["train", str(tiny_config(tmp_path, fashion_root)), "--out", str(tmp_path / "oom"),
                 "--set", "trainer.batch_size=4096", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 4 and "batch_size 4096" in err and "8,589,934,592 bytes" in err


def test_missing_dataset_lists_where_it_looked(tmp_path: Path, monkeypatch, capsys) -> None:
    import gpuml.data.datasets as ds

    monkeypatch.setenv("GPUML_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(ds, "SYSTEM_DATASET_DIRS", [tmp_path / "system"], raising=False)
    cfg = tiny_config(tmp_path, tmp_path / "nowhere", data={"dataset": "mnist", "root": str(tmp_path / "nowhere"),
                                                              "download": False})
    assert main(["train", str(cfg), "--out", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpuml: error: ") and "Traceback" not in "\n".join(err)
    assert str(tmp_path / "nowhere") in err[-1] and str(tmp_path / "data") in err[-1]


def test_info_names_backends(capsys) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends: cpu" in out and "numpy" in out and "gpu:" in out


def test_progress_bar_eta_leaves_out_the_first_step(tmp_path: Path, fashion_root: Path, monkeypatch,
                                                    capsys) -> None:
    """The first step pays for JIT compilation (here: a 3 s stand-in); the bar's ETA must not
    extrapolate it over the epoch (it did: `1/24 [00:03<01:09, 3.00s/batch]`)."""
    import re
    import time

    from gpuml.train.trainer import Trainer

    real_step = Trainer._step

    def slow_first_step(self, *args):
        if self.global_step == 0:
            time.sleep(3.0)
        real_step(self, *args)

    monkeypatch.setattr(Trainer, "_step", slow_first_step)
    assert main(["train", str(tiny_config(tmp_path, fashion_root, trainer__epochs=1)), "--out",
                 str(tmp_path / "bar"), "--set", "trainer.progress=true"]) == 0
    err = capsys.readouterr().err
    etas = [int(m) * 60 + int(s) for m, s in re.findall(r"<(\d+):(\d+)", err)]
    assert "1/24 [" in err and "s/batch" not in err and all(eta < 3 for eta in etas), err


def test_checkpoint_last_skips_a_damaged_newest_without_changing_the_run(run: Path, tmp_path: Path, capsys) -> None:
    """eval/predict/export `--checkpoint last` fall back as --resume does, one line per skipped
    file, but leave the run folder as it was (only --resume renames to *.damaged)."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    older, newest = sorted((copy / "checkpoints").glob("step-*.npz"))[-2:]
    newest.write_bytes(b"")
    before = sorted(p.name for p in (copy / "checkpoints").iterdir())
    capsys.readouterr()
    assert main(["eval", str(copy), "--checkpoint", "last"]) == 0
    out, err = capsys.readouterr()
    skipped = [ln for ln in err.splitlines() if ln.startswith("skipped ")]
    assert len(skipped) == 1 and newest.name in skipped[0] and "EOFError" in skipped[0]
    assert json.loads(out)["checkpoint"] == "last"
    assert main(["export", str(copy), "--checkpoint", "last", "--out", str(tmp_path / "w.npz"),
                 "--format", "npz"]) == 0
    from gpuml.train import checkpoint as ckpt

    ref = ckpt.load(older)[0]
    with np.load(tmp_path / "w.npz") as z:
        assert z.files and all(np.array_equal(z[k], ref[k]) for k in z.files)
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == before
    older.write_bytes(b"PK")  # none loads: one line, exit 8
    assert main(["eval", str(copy), "--checkpoint", "last"]) == 8
    assert "no checkpoint that loads" in capsys.readouterr().err.strip().splitlines()[-1]


def test_export_npz_never_overwrites_the_runs_own_weights(run: Path, tmp_path: Path, capsys) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    final = (copy / "weights.npz").read_bytes()
    assert main(["export", str(copy), "--format", "npz", "--checkpoint", "best"]) == 0
    out = Path(capsys.readouterr().out.strip())
    assert out == copy / "weights.export.npz" and out.exists()
    assert (copy / "weights.npz").read_bytes() == final  # was replaced by the best weights
    for target in (copy / "weights.npz", copy / "checkpoints" / "best.npz",
                   sorted((copy / "checkpoints").glob("step-*.npz"))[-1]):
        before = target.read_bytes()
        for fmt in ("npz", "safetensors"):
            assert main(["export", str(copy), "--format", fmt, "--out", str(target)]) == 8
            err = capsys.readouterr().err
            assert err.startswith("gpuml: error: ") and err.count("\n") == 1 and str(target) in err
        assert target.read_bytes() == before
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), dtype=np.uint8))
    assert main(["predict", str(copy), str(tmp_path / "x.npy"), "--out", str(copy / "run.json")]) == 8
    assert "run's own file" in capsys.readouterr().err
