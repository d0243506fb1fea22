"""PNG plots of kernel results: for each op family, rate against problem size, ours next to each
anchor, with the hardware limit drawn as a horizontal line (FP32 peak for GEMM and convolution,
the measured copy bandwidth for the bandwidth-bound families).

matplotlib is an optional extra (`pip install gpuml[bench]`); it is imported only here, when a
plot is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpuml.errors import GpumlError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise GpumlError("plots need matplotlib: pip install 'gpuml[bench]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _draw_family(ax: Any, rows: list[dict[str, Any]], meta: dict[str, Any], family: str) -> None:
    metric = rows[0]["metric"]
    scale, unit = (1e9, "GB/s") if metric == "bytes" else (1e12, "TFLOP/s")
    if metric != "bytes" and meta["device"] == "cpu":
        scale, unit = 1e9, "GFLOP/s"
    markers = "osD^v<>ph*"
    ops = list(dict.fromkeys(r["op"] for r in rows))
    work = "flops" if metric == "flops" else "bytes"
    anchors = list(dict.fromkeys(r["anchor"] for r in rows if r["anchor"]))
    for i, op in enumerate(ops):
        mine = [r for r in rows if r["op"] == op]
        marker = markers[i % len(markers)]
        # Lines join the points of a one-parameter sweep (square GEMM); the other ops' points
        # are different layer shapes, which a line would wrongly suggest form a trend.
        line = "-" if op == "gemm_square" else "none"
        ours = sorted({(r[work], r["ours_rate"]) for r in mine})  # a case has one row per anchor
        ax.plot([p[0] for p in ours], [p[1] / scale for p in ours], marker=marker, color="C0",
                linestyle=line, label=f"gpuml {op}")
        for name in anchors:
            pts = sorted((r[work], r["anchor_rate"]) for r in mine if r["anchor"] == name)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] / scale for p in pts], marker=marker,
                        linestyle="--" if line == "-" else "none",
                        color=f"C{anchors.index(name) + 1}", fillstyle="none", label=f"{name} {op}")
    hw = meta["hardware"]
    if metric == "bytes":
        limit, label = meta["copy_bytes_per_s"], "copy bandwidth (measured)"
    else:
        limit = meta.get("peak_flops_per_s", hw["fp32_peak_flops"])
        label = f"FP32 peak ({meta.get('peak_how', hw['fp32_peak_how'])})"
    if limit:
        ax.axhline(limit / scale, color="k", linestyle=":", linewidth=1.2, label=label)
    if metric == "flops" and meta.get("best_gemm_flops_per_s"):
        ax.axhline(meta["best_gemm_flops_per_s"] / scale, color="0.5", linestyle="-.", linewidth=1,
                   label="best GEMM rate measured in this run (any implementation)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs per call" if metric == "flops" else "minimum bytes per call")
    ax.set_ylabel(unit)
    ax.set_title(f"{family} on {hw['name']} ({meta['device']})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="best")


def _ok_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in result["rows"] if "error" not in r]


def plot_family(result: dict[str, Any], family: str, path: Path) -> Path:
    plt = _pyplot()
    rows = [r for r in _ok_rows(result) if r["family"] == family]
    if not rows:
        raise GpumlError(f"no results for family {family!r} to plot")
    fig, ax = plt.subplots(figsize=(8, 5))
    _draw_family(ax, rows, result["meta"], family)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_overview(result: dict[str, Any], path: Path) -> Path:
    """All families in one PNG, one panel each."""
    plt = _pyplot()
    rows = _ok_rows(result)
    families = list(dict.fromkeys(r["family"] for r in rows))
    if not families:
        raise GpumlError("no results to plot")
    cols = min(3, len(families))
    nrows = -(-len(families) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4.2 * nrows), squeeze=False)
    for ax, fam in zip(axes.flat, families):
        _draw_family(ax, [r for r in rows if r["family"] == fam], result["meta"], fam)
    for ax in list(axes.flat)[len(families):]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_families(result: dict[str, Any], folder: Path, prefix: str) -> list[Path]:
    """One PNG per family: folder/<prefix>-<family>.png."""
    families = list(dict.fromkeys(r["family"] for r in _ok_rows(result)))
    return [plot_family(result, fam, folder / f"{prefix}-{fam}.png") for fam in families]
