"""`gpuml plot`: learning curves (loss and accuracy, train and validation) of one or more runs,
overlaid, as a PNG, with each run's best epoch marked. matplotlib is an optional extra
(`pip install gpuml[bench]`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from gpuml.data.atomic import atomic_write
from gpuml.errors import GpumlError
from gpuml.train.metrics import read_metrics
from gpuml.train.monitor import metric_mode


def best_epoch(run_dir: Path, rows: list[dict[str, Any]]) -> tuple[int, str] | None:
    """(epoch, metric) of the run's best checkpoint: summary.json's when the run finished, else
    the monitored metric (trainer.monitor / monitor_mode, as the trainer picks it) over `rows`."""
    try:
        best = json.loads((run_dir / "summary.json").read_text()).get("best") or {}
        if best.get("epoch") is not None and best.get("metric"):
            return int(best["epoch"]), str(best["metric"])
    except (OSError, ValueError, AttributeError):
        pass  # no summary yet (the run is still going): work it out from the metrics
    monitor, mode = "auto", "auto"
    try:
        trainer = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("trainer") or {}
        monitor, mode = trainer.get("monitor", "auto"), trainer.get("monitor_mode", "auto")
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    if monitor == "auto":
        monitor = "val_accuracy" if all("val_accuracy" in r for r in rows) else "train_accuracy"
    mode = metric_mode(monitor, mode)  # the trainer's rule
    scored = [(r[monitor], r["epoch"]) for r in rows if isinstance(r.get(monitor), (int, float))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    # Ties go to the earliest epoch, as the trainer keeps the first of equal values.
    value = pick(v for v, _ in scored)
    return next(e for v, e in scored if v == value), monitor


def make_figure(run_dirs: list[Path]) -> Any:
    """The matplotlib Figure of `gpuml plot` (two axes: loss, accuracy)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise GpumlError("gpuml plot needs matplotlib: pip install 'gpuml[bench]'") from None
    runs = []
    for d in run_dirs:
        if not d.is_dir():
            raise GpumlError(f"{d}: no such run folder")
        try:
            rows = read_metrics(d)
        except ValueError as exc:  # a hand-edited or foreign file
            raise GpumlError(f"{d / 'metrics.jsonl'}: not one JSON object per line ({exc})") from None
        if not rows:
            raise GpumlError(f"{d}: no metrics.jsonl rows to plot")
        runs.append((d, rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (run_dir, rows), color in zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        label = run_dir.name
        epochs = [r["epoch"] for r in rows]
        for ax, metric in zip(axes, ("loss", "accuracy")):
            ax.plot(epochs, [r[f"train_{metric}"] for r in rows], color=color, linestyle="--",
                    marker=".", label=f"{label} train")
            if all(f"val_{metric}" in r for r in rows):
                ax.plot(epochs, [r[f"val_{metric}"] for r in rows], color=color, marker="o",
                        label=f"{label} val")
        best = best_epoch(run_dir, rows)
        if best is not None:
            _mark_best(axes, rows, color, label, *best)
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, even one
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _mark_best(axes: Any, rows: list[dict[str, Any]], color: str, label: str, epoch: int, metric: str) -> None:
    """A dotted line at the best epoch on both axes, and a star on the monitored curve."""
    for ax in axes:
        ax.axvline(epoch, color=color, linestyle=":", alpha=0.7, gid="best-epoch")
    row = next((r for r in rows if r["epoch"] == epoch), None)
    if row is not None and metric in row:
        axes[1 if "accuracy" in metric else 0].plot(
            [epoch], [row[metric]], marker="*", markersize=14, color=color, linestyle="none",
            label=f"{label} best {metric} (epoch {epoch})", gid="best-point")


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Write the figure to `out`, its format from the extension (png, pdf, svg, ...)."""
    fig = make_figure(run_dirs)
    import matplotlib.pyplot as plt

    try:
        formats = fig.canvas.get_supported_filetypes()
        # matplotlib would add ".png" to a name without one (and the CLI print the name given)
        if out.suffix[1:].lower() not in formats:
            raise GpumlError(f"{out}: --out needs a file name ending in one of "
                             f"{', '.join('.' + f for f in sorted(formats))}")
        if out.is_dir():
            raise GpumlError(f"{out}: is a folder; --out names the image file to write")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(out) as f:  # a full disk leaves no empty or half image behind
                fig.savefig(f, dpi=110, format=out.suffix[1:].lower())
        except (FileExistsError, NotADirectoryError):
            raise GpumlError(f"{out}: cannot write the plot ({out.parent} or a folder above it is a file)") from None
        except OSError as exc:
            raise GpumlError(f"{out}: cannot write the plot ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return out
