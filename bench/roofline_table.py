"""Print the roofline of every case of the full kernel sweep for a given machine: FLOPs, minimum
bytes, arithmetic intensity, and the floor they imply, max(FLOPs / peak, bytes / bandwidth).

    python bench/roofline_table.py --name "H100 SXM (datasheet)" --peak-tflops 66.9 --bandwidth-gbs 3350

Computed from the formulas in gpuml/benchmark/formulas.py; nothing is measured here.
"""

from __future__ import annotations

import argparse

from gpuml.benchmark.kernel_cases import full_sweep
from gpuml.benchmark.report import fmt_time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="machine name for the heading")
    ap.add_argument("--peak-tflops", type=float, required=True, help="FP32 peak, TFLOP/s")
    ap.add_argument("--bandwidth-gbs", type=float, required=True, help="memory (copy) bandwidth, GB/s")
    args = ap.parse_args()
    peak, bw = args.peak_tflops * 1e12, args.bandwidth_gbs * 1e9
    print(f"Roofline floors on {args.name}: FP32 {args.peak_tflops} TFLOP/s, {args.bandwidth_gbs} GB/s "
          f"(balance {peak / bw:.1f} FLOP/byte)\n")
    print("| op | shape | GFLOP | MB | FLOP/byte | bound | floor |")
    print("|---|---|---|---|---|---|---|")
    for c in full_sweep("cuda"):
        compute, memory = c.flops / peak, c.bytes / bw
        intensity = f"{c.flops / c.bytes:.1f}" if c.flops else "-"
        bound = "compute" if compute > memory else "memory"
        print(f"| {c.op} | {c.shape} | {c.flops / 1e9:.3g} | {c.bytes / 1e6:.3g} | {intensity} | {bound} | "
              f"{fmt_time(max(compute, memory))} |")


if __name__ == "__main__":
    main()
