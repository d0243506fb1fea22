"""`gpuml plot`: whole-epoch ticks and the best epoch marked, on run folders made by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from gpuml.cli import main  # noqa: E402
from gpuml.train.plot import best_epoch, make_figure  # noqa: E402

ROWS = [
    {"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.60, "val_loss": 0.90, "val_accuracy": 0.70},
    {"epoch": 2, "train_loss": 0.8, "train_accuracy": 0.70, "val_loss": 0.70, "val_accuracy": 0.80},
    {"epoch": 3, "train_loss": 0.6, "train_accuracy": 0.80, "val_loss": 0.75, "val_accuracy": 0.78},
]


def _run(tmp_path: Path, name: str, rows: list[dict], summary: dict | None = None,
         trainer: str | None = None) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if trainer is not None:
        (d / "config.yaml").write_text(f"trainer: {trainer}\n")
    return d


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_epoch_ticks_are_whole_numbers(tmp_path: Path, epochs: int) -> None:
    fig = make_figure([_run(tmp_path, "a", ROWS[:epochs])])
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_best_epoch_from_summary_or_monitor(tmp_path: Path) -> None:
    finished = _run(tmp_path, "done", ROWS, {"best": {"metric": "val_loss", "value": 0.7, "epoch": 2}})
    assert best_epoch(finished, ROWS) == (2, "val_loss")
    assert best_epoch(_run(tmp_path, "going", ROWS), ROWS) == (2, "val_accuracy")
    by_loss = _run(tmp_path, "loss", ROWS, trainer="{monitor: train_loss, monitor_mode: auto}")
    assert best_epoch(by_loss, ROWS) == (3, "train_loss")
    no_val = [{k: v for k, v in r.items() if not k.startswith("val")} for r in ROWS]
    assert best_epoch(_run(tmp_path, "noval", no_val), no_val) == (3, "train_accuracy")


def test_best_epoch_is_marked(tmp_path: Path, capsys) -> None:
    run = _run(tmp_path, "r", ROWS, {"best": {"metric": "val_accuracy", "value": 0.8, "epoch": 2}})
    fig = make_figure([run])
    lines = [ln for ax in fig.axes for ln in ax.get_lines()]
    assert [ln.get_xdata()[0] for ln in lines if ln.get_gid() == "best-epoch"] == [2, 2]
    (star,) = [ln for ln in lines if ln.get_gid() == "best-point"]
    assert star in fig.axes[1].get_lines() and list(star.get_ydata()) == [0.8]
    assert "r best val_accuracy (epoch 2)" in [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    out = tmp_path / "c.png"
    assert main(["plot", str(run), "--out", str(out)]) == 0 and out.read_bytes()[:4] == b"\x89PNG"


def test_bad_out_and_run_paths_are_one_line(tmp_path: Path, capsys) -> None:
    """An --out without an image extension (matplotlib wrote NAME.png while the CLI printed
    NAME), an unknown one (ValueError traceback), a folder or a path under a file; a missing
    run folder or a metrics file that is not JSON lines: each one line, exit 1."""
    run = _run(tmp_path, "a", ROWS)
    (tmp_path / "file").write_text("x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"epoch": 1, "train_loss"\n')
    for args, message in [([str(run), "--out", str(tmp_path / "curves")], "needs a file name ending in"),
                          ([str(run), "--out", str(tmp_path / "c.txt")], "needs a file name ending in"),
                          ([str(run), "--out", str(run)], "needs a file name ending in"),
                          ([str(run), "--out", str(tmp_path / "d.png")], None),
                          ([str(run), "--out", str(tmp_path / "file" / "c.png")], "is a file"),
                          ([str(tmp_path / "missing")], "no such run folder"),
                          ([str(tmp_path / "bad")], "not one JSON object per line")]:
        code = main(["plot", *args])
        err = capsys.readouterr().err.strip()
        if message is None:
            assert code == 0 and (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
        else:
            assert code == 1 and message in err and "\n" not in err, (args, err)
    assert not (tmp_path / "curves.png").exists()


def test_disk_full_leaves_no_image(tmp_path: Path, capsys, monkeypatch) -> None:
    """savefig straight to the file left a 0-byte PNG and exit 1 on a full disk: the image is
    written atomically, and a full disk is exit 6 like every other write."""
    import errno

    import matplotlib.figure

    run = _run(tmp_path, "a", ROWS)

    def full(self, fname, *args, **kwargs):  # opens its target, writes a little, then the disk is full
        if isinstance(fname, (str, Path)):
            Path(fname).write_bytes(b"\x89PNG")
        else:
            fname.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    assert main(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 6
    assert "c.png: no space left on device" in capsys.readouterr().err
    assert list(tmp_path.glob("*c.png*")) == []
