"""Markdown tables of benchmark results (the JSON that `gpuml bench ... --json` writes)."""

from __future__ import annotations

from typing import Any

from gpuml.benchmark.kernel_cases import CONV_OPS


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_rate(rate: float | None, metric: str) -> str:
    if rate is None:
        return "-"
    if metric == "bytes":
        return f"{rate / 1e9:.1f} GB/s"
    return f"{rate / 1e12:.2f} TFLOP/s" if rate >= 1e12 else f"{rate / 1e9:.1f} GFLOP/s"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def meta_lines(meta: dict[str, Any]) -> list[str]:
    hw = meta["hardware"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = [
        f"- date: {meta['date']}; gpuml commit `{meta['commit']}`",
        f"- device: {hw['name']} ({meta['device']}"
        + (f", {hw['cores']} cores" if hw["kind"] == "cpu" else f", CC {hw['compute_capability']}, {hw['sms']} SMs")
        + ")",
    ]
    if hw["kind"] == "cpu":
        lines.append(machine_line(hw))
    lines += [
        f"- versions: {versions}",
        f"- command: `{meta['command']}`",
    ]
    if meta.get("load_average"):
        before = meta.get("load_average_before")
        lines.append("- load average (1, 5, 15 min)"
                     + (f" before: {', '.join(map(str, before))};" if before else "")
                     + f" after: {', '.join(map(str, meta['load_average']))}"
                     + (f"; CPU idle just before: {100 * meta['cpu_idle_before']:.0f}%"
                        if meta.get("cpu_idle_before") is not None else ""))
    return lines


def machine_line(hw: dict[str, Any]) -> str:
    """The CPU in words: model, vendor/family/model numbers, vector extensions, clock, caches."""
    ids = ", ".join(f"{k} {hw[k]}" for k in ("vendor", "family", "model") if hw.get(k))
    ext = ", ".join(hw.get("vector_extensions") or []) or "none reported"
    return (f"- machine: {hw['name']}" + (f" ({ids})" if ids else "") + f"; vector extensions: {ext}; "
            f"{hw['cores']} usable cores at {hw['mhz']:.0f} MHz (as /proc/cpuinfo reports it); "
            f"last-level cache {hw['llc_bytes'] >> 20} MiB" + (f"; BLAS: {hw['blas']}" if hw.get("blas") else ""))


def kernels_markdown(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    hw = meta["hardware"]
    out = [f"### Kernels: {hw['name']} ({meta['device']}{', quick sweep' if meta['quick'] else ''})", ""]
    out += meta_lines(meta)
    if meta.get("peak_flops_per_s"):
        peak = f"{meta['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({meta['peak_how']})"
    else:  # a result written before the peak was measured
        peak = (f"{hw['fp32_peak_flops'] / 1e12:.3f} TFLOP/s ({hw['fp32_peak_how']})"
                if hw["fp32_peak_flops"] else "unknown")
    out.append(f"- limits: FP32 peak {peak}; "
               f"copy bandwidth {meta['copy_bytes_per_s'] / 1e9:.1f} GB/s (measured in this run)")
    out.append("- ratio = anchor time / our time (> 1: ours is faster); for a copy anchor it is the "
               "fraction of copy bandwidth ours reaches. floor = max(FLOPs / peak, bytes / copy bandwidth).")
    families = list(dict.fromkeys(r["family"] for r in rows))
    for fam in families:
        table, last_case = [], None
        for r in (r for r in rows if r["family"] == fam):
            if "error" in r:
                table.append([r["op"], r["shape"], f"ERROR: {r['error']}"] + [""] * 7)
                continue
            case = (r["op"], r["shape"])
            first = case != last_case
            last_case = case
            ours = [fmt_time(r["ours_median_s"]), fmt_rate(r["ours_rate"], r["metric"]),
                    f"{100 * r['ours_fraction_of_floor']:.0f}%"] if first else ["", "", ""]
            ratio = "-" if r["ratio"] is None else (
                f"{100 * r['ratio']:.0f}% of copy" if str(r["anchor"]).startswith("copy") else f"{r['ratio']:.2f}x")
            check = r["check"] if r["rel_err"] is None else f"{r['check']} ({r['rel_err']:.0e})"
            table.append([r["op"] if first else "", r["shape"] if first else "", *ours, r["anchor"] or "-",
                          fmt_time(r["anchor_median_s"]), fmt_rate(r["anchor_rate"], r["metric"]), ratio, check])
        out += ["", f"#### {fam}", "", _table(
            ["op", "shape", "ours", "ours rate", "of floor", "anchor", "anchor time", "anchor rate",
             "ours/anchor speed", "check"], table)]
    out += conv_fwd_bwd_markdown(rows)
    return "\n".join(out) + "\n"


def conv_fwd_bwd(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training cost of each convolution layer per precision and anchor: the sum of the median
    times of its three ops (fwd, bwd_data, bwd_weight) on each side, from the measured rows only.
    A layer lacking a measured row of one of the ops for that anchor (an error, no anchor) gets no
    entry. `time_ratio` = ours / anchor (< 1: ours is faster); `speed` = anchor / ours, as the
    rows' ratio (issue 13's target for the ResNet layer: speed >= 0.8 against cuDNN)."""
    times: dict[tuple[str, str, str], dict[str, tuple[float, float]]] = {}
    for r in rows:
        family = r["family"]
        if not family.startswith("conv2d") or "error" in r or r.get("anchor_median_s") is None:
            continue
        op = r["op"].removesuffix(f"_{_conv_precision(family)}")
        if op in CONV_OPS:
            times.setdefault((family, r["shape"], r["anchor"]), {})[op] = (r["ours_median_s"], r["anchor_median_s"])
    out = []
    for (family, shape, anchor), ops in times.items():
        if len(ops) == len(CONV_OPS):
            ours, theirs = (sum(t[i] for t in ops.values()) for i in (0, 1))
            out.append({"family": family, "precision": _conv_precision(family),
                        "shape": shape, "anchor": anchor, "ours_s": ours, "anchor_s": theirs,
                        "time_ratio": ours / theirs, "speed": theirs / ours})
    return out


def _conv_precision(family: str) -> str:
    """conv2d -> fp32, conv2d_tf32 -> tf32 (precision_cases.PRECISION_FAMILIES)."""
    return family.removeprefix("conv2d").lstrip("_") or "fp32"


def conv_fwd_bwd_markdown(rows: list[dict[str, Any]]) -> list[str]:
    entries = conv_fwd_bwd(rows)
    if not entries:
        return []
    table = [[e["shape"], e["precision"], fmt_time(e["ours_s"]), e["anchor"], fmt_time(e["anchor_s"]),
              f"{e['time_ratio']:.2f}", f"{e['speed']:.2f}x"] for e in entries]
    return ["", "#### conv2d fwd+bwd per layer", "",
            "Sum of the median times of the layer's fwd, bwd_data and bwd_weight rows above, each side.", "",
            _table(["layer", "precision", "ours", "anchor", "anchor time", "ours/anchor time", "speed"], table)]


def train_markdown(result: dict[str, Any]) -> str:
    meta, rows = result["meta"], result["rows"]
    out = [f"### Training: {meta['hardware']['name']} ({meta['device']})", ""]
    out += meta_lines(meta)
    limit = f"the first {meta['limit']} training images" if meta["limit"] else "all training images"
    out.append(f"- {meta['epochs']} measured epoch(s) on {limit} after {meta['warmup_steps']} warm-up steps; "
               "epoch time is the median over epochs; test accuracy on the full test set; "
               f"backend: {meta['backend']}"
               + (f"; torch threads {meta['torch_threads']}" if meta.get("torch_threads") else ""))
    if meta.get("epoch_order"):
        out.append("- epochs alternate between the implementations; order run: " + "; ".join(meta["epoch_order"]))
    table = []
    ftz = any(r.get("speedup_vs_torch_eager_ftz") is not None for r in rows)

    def ratio(r: dict[str, Any], key: str) -> str:
        return "-" if r.get(key) is None else f"{r[key]:.2f}x"

    for r in rows:
        busy = f"{r['cpu_busy']:.2f}" if r.get("cpu_busy") is not None else "-"
        table.append([r["model"], str(r["batch_size"]), r["impl"], str(r["epochs"]), fmt_time(r["median_epoch_s"]),
                      f"{r['samples_per_s']:,.0f}", f"{r['us_per_step']:,.0f}", f"{r['train_loss']:.4f}",
                      f"{r['test_accuracy']:.4f}", ratio(r, "speedup_vs_torch_eager")]
                     + ([ratio(r, "speedup_vs_torch_eager_ftz")] if ftz else []) + [busy])
    out += ["", _table(["model", "batch", "impl", "epochs", "epoch time", "samples/s", "µs/step", "train loss",
                        "test acc", "vs torch eager"] + (["vs torch FTZ"] if ftz else []) + ["CPU busy"], table)]
    if ftz:
        out.append("\ntorch eager FTZ: PyTorch with torch.set_flush_denormal(True), thrown before PyTorch starts "
                   "its threads, the subnormal flush gpuml's CPU backend does; plain torch eager keeps subnormals "
                   "(its default) and slows down as Adam's state drifts into them. On CPU both PyTorch rows train in "
                   "child processes of their own, with glibc's malloc keeping freed memory "
                   "(gpuml/benchmark/torch_child.py).")
    if meta["device"] == "cpu":
        out.append("\nCPU busy: process CPU seconds per wall second over the measured epochs "
                   "(close to the core count when the run had the cores to itself).")
    return "\n".join(out) + "\n"
