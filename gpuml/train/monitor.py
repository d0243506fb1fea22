"""Which epoch is best (trainer.monitor, for best.npz) and when to stop early
(trainer.early_stopping)."""

from __future__ import annotations

from typing import Any


def metric_mode(name: str, mode: str) -> str:
    if mode != "auto":
        return mode
    return "max" if "accuracy" in name else "min"


def value_improved(value: float, ref: float, mode: str, min_delta: float) -> bool:
    return value < ref - min_delta if mode == "min" else value > ref + min_delta


def judge_epoch(t: dict[str, Any], monitor: str, row: dict[str, Any], past: list[dict[str, Any]],
                best: dict[str, Any], es_wait: int) -> tuple[dict[str, Any], int, bool, bool]:
    """After epoch `row` (with the `past` rows before it) and the trainer config `t`:
    (the new best record, the new early-stopping wait, is `row` the best, stop now)."""
    mode = metric_mode(monitor, t["monitor_mode"])
    is_best = best["value"] is None or value_improved(row[monitor], best["value"], mode, 0.0)
    if is_best:
        best = {"metric": monitor, "value": row[monitor], "epoch": row["epoch"]}
    es = t["early_stopping"]
    if not es["enabled"] or not past:
        return best, es_wait, is_best, False
    es_mode = metric_mode(es["monitor"], es["mode"])
    values = [r[es["monitor"]] for r in past]
    ref = max(values) if es_mode == "max" else min(values)
    es_wait = 0 if value_improved(row[es["monitor"]], ref, es_mode, es["min_delta"]) else es_wait + 1
    return best, es_wait, is_best, es_wait > es["patience"]
