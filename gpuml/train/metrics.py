"""Per-epoch metrics: metrics.jsonl (one JSON object per epoch) and metrics.csv, plus the
one-line epoch summary printed to the log."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from gpuml.data.atomic import atomic_write

COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds",
           "samples_per_second")


class MetricsLog:
    def __init__(self, run_dir: Path) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replace both files with exactly `rows` (atomically): after a resume the files hold
        the checkpoint's history, so no epoch is ever listed twice."""
        with atomic_write(self.jsonl) as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        with atomic_write(self.csv) as f:
            f.write(buf.getvalue().encode())

    def append(self, row: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        with open(self.csv, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore").writerow(row)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plural(n: int, noun: str) -> str:
    """'1 epoch', '2 epochs': for log lines."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_epoch(row: dict[str, Any], total: int) -> str:
    parts = [f"epoch {row['epoch']}/{total}",
             f"train_loss {row['train_loss']:.4f}", f"train_acc {row['train_accuracy']:.4f}"]
    if "val_loss" in row:
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_acc {row['val_accuracy']:.4f}"]
    parts += [f"lr {row['lr']:.3g}", f"{row['seconds']:.1f}s", f"{row['samples_per_second']:,.0f} samples/s"]
    return "  ".join(parts)
