"""`gpuml plot`: learning curves (loss and accuracy, train and validation) of one or more runs,
overlaid, as a PNG. matplotlib is an optional extra (`pip install gpuml[bench]`)."""

from __future__ import annotations

from pathlib import Path

from gpuml.errors import GpumlError
from gpuml.train.metrics import read_metrics


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise GpumlError("gpuml plot needs matplotlib: pip install 'gpuml[bench]'") from None
    runs = []
    for d in run_dirs:
        rows = read_metrics(d)
        if not rows:
            raise GpumlError(f"{d}: no metrics.jsonl rows to plot")
        runs.append((d.name, rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (label, rows), color in zip(runs, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        epochs = [r["epoch"] for r in rows]
        for ax, metric in zip(axes, ("loss", "accuracy")):
            ax.plot(epochs, [r[f"train_{metric}"] for r in rows], color=color, linestyle="--",
                    marker=".", label=f"{label} train")
            if all(f"val_{metric}" in r for r in rows):
                ax.plot(epochs, [r[f"val_{metric}"] for r in rows], color=color, marker="o",
                        label=f"{label} val")
    for ax, metric in zip(axes, ("loss", "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
