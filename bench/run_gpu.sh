#!/usr/bin/env bash
# The one script to run on a GPU machine: the GPU tests first, then the full kernel and training
# benchmarks, each next to cuBLAS / PyTorch (cuDNN, eager and CUDA graph) measured in the same run.
#
#   OUT=/some/folder bench/run_gpu.sh          # from the repository root or anywhere
#
# Needs CuPy (gpuml[cuda12] or gpuml[cuda13]); PyTorch with CUDA for the PyTorch anchors (without
# it those rows are missing, not faked); matplotlib for the PNGs; Fashion-MNIST (found through
# data.root / $GPUML_DATA / the cache, or downloaded). Writes under $OUT (default bench/out-gpu):
#   pytest-gpu.txt, kernels-cuda.json/.md/.png, kernels-cuda-<family>.png, train-cuda.json/.md
# Exit status: 0 when the tests passed and every benchmark ran and agreed with its anchors.
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-bench/out-gpu}"
mkdir -p "$OUT"
status=0

echo "== gpuml info" | tee "$OUT/info.txt"
"$PYTHON" -m gpuml.cli info 2>&1 | tee -a "$OUT/info.txt"
nvidia-smi 2>&1 | tee -a "$OUT/info.txt" || true

echo "== pytest -m gpu"
# The GPU kernels are checked against the CPU reference first; the benchmarks still run after a
# failure (they check every result against their anchors too), but the script then exits 1.
"$PYTHON" -m pytest -m gpu -q -rs 2>&1 | tee "$OUT/pytest-gpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "pytest -m gpu FAILED (see $OUT/pytest-gpu.txt)"; status=1; }

echo "== gpuml bench kernels"
"$PYTHON" -m gpuml.cli bench kernels --device cuda --json "$OUT/kernels-cuda.json" \
    --markdown "$OUT/kernels-cuda.md" --plot "$OUT/kernels-cuda.png" --plot-dir "$OUT" || status=1

echo "== gpuml bench train"
"$PYTHON" -m gpuml.cli bench train --device cuda --models mlp,cnn --batch-sizes 32,128,512 --epochs 3 \
    --json "$OUT/train-cuda.json" --markdown "$OUT/train-cuda.md" || status=1

echo "== done (status $status); results in $OUT"
exit "$status"
