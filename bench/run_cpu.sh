#!/usr/bin/env bash
# The CPU tables of bench/RESULTS.md: the full kernel sweep and the seed models at batch 128, each
# next to NumPy / PyTorch CPU measured in the same run. Measure on an otherwise idle machine
# (check `uptime` first): other processes on the same cores make every number meaningless.
#
#   OUT=/some/folder bench/run_cpu.sh          # default OUT: bench/out-cpu
#   EPOCHS=2 LIMIT=20000 bench/run_cpu.sh      # fewer / shorter epochs
# Fashion-MNIST is found through $GPUML_DATA (a folder holding fashion-mnist/), the user cache, or
# downloaded.
set -uo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-bench/out-cpu}"
EPOCHS="${EPOCHS:-2}"
mkdir -p "$OUT"
status=0
limit=()
[ -n "${LIMIT:-}" ] && limit=(--limit "$LIMIT")

echo "load before: $(uptime)"
"$PYTHON" -m gpuml.cli bench kernels --device cpu --json "$OUT/kernels-cpu.json" \
    --markdown "$OUT/kernels-cpu.md" --plot "$OUT/kernels-cpu.png" --plot-dir "$OUT" || status=1
"$PYTHON" -m gpuml.cli bench train --device cpu --models mlp,cnn --batch-sizes 128 --epochs "$EPOCHS" \
    "${limit[@]}" --json "$OUT/train-cpu.json" --markdown "$OUT/train-cpu.md" || status=1
echo "load after: $(uptime)"
exit "$status"
