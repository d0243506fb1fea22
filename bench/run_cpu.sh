#!/usr/bin/env bash
# Every CPU table of bench/RESULTS.md, each with the JSON it was made from, from the current code:
#   machine-cpu.txt                   the machine: CPU model, vector extensions, cores, caches, BLAS, load
#   kernels-cpu.{json,md,png}, kernels-cpu-<family>.png   the full kernel sweep (`gpuml bench kernels`)
#   train-cpu.{json,md}               the seed models at batch 32 and 128 next to PyTorch CPU eager
#   results-cpu.md                    the machine line and both tables, to paste into RESULTS.md
# Measure on an otherwise idle machine: other processes on the same cores make every number
# meaningless (each table records the load and how idle the CPU was just before).
#
#   OUT=bench bench/run_cpu.sh                  # write next to RESULTS.md (default OUT: bench/out-cpu)
#   EPOCHS=3 LIMIT=20000 bench/run_cpu.sh       # more / shorter measured epochs (default 2, all images)
#   PYTHON=.venv/bin/python bench/run_cpu.sh    # the interpreter with gpuml, torch and matplotlib
#   QUICK=1 LIMIT=512 EPOCHS=1 bench/run_cpu.sh # a smoke run of the script (quick kernel sweep)
# Each step prints its time. Expected on 2 idle cores: 6-8 minutes (kernel sweep about 3: the 215 s
# sweep of 819ab29 less its 64 s of 8192^3 GEMMs; training about 3-4). Measured on a 2-core Xeon
# shared with 4-5 busy processes (copy bandwidth 8 GB/s instead of about 45): kernels 375 s; the
# smoke run (QUICK=1 LIMIT=512 EPOCHS=1) 17 s + 49 s.
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
quick=()
[ -n "${QUICK:-}" ] && quick=(--quick)

step() {  # step NAME COMMAND...: run it, say how long it took, remember a failure
    local name="$1" t0=$SECONDS
    shift
    echo "== $name"
    "$@" || status=1
    echo "== $name: $((SECONDS - t0)) s"
}

machine() {
    echo "load before: $(uptime)"
    "$PYTHON" - <<'EOF'
from gpuml.backend import get_backend
from gpuml.benchmark.hardware import cpu_info
from gpuml.benchmark.report import machine_line

get_backend("cpu")  # loads MKL where installed, so the BLAS line names what the benchmarks use
print(machine_line(cpu_info()))
EOF
    grep -m1 "flags" /proc/cpuinfo || true
    command -v lscpu >/dev/null && lscpu
}

machine > "$OUT/machine-cpu.txt" || status=1
head -2 "$OUT/machine-cpu.txt"
step "kernels" "$PYTHON" -m gpuml.cli bench kernels --device cpu "${quick[@]}" --json "$OUT/kernels-cpu.json" \
    --markdown "$OUT/kernels-cpu.md" --plot "$OUT/kernels-cpu.png" --plot-dir "$OUT"
step "training (mlp, cnn at batch 32 and 128)" "$PYTHON" -m gpuml.cli bench train --device cpu --models mlp,cnn \
    --batch-sizes 32,128 --epochs "$EPOCHS" "${limit[@]}" --json "$OUT/train-cpu.json" --markdown "$OUT/train-cpu.md"
cat "$OUT/train-cpu.md" "$OUT/kernels-cpu.md" > "$OUT/results-cpu.md" 2>/dev/null || status=1
echo "load after: $(uptime)"
echo "wrote $OUT/machine-cpu.txt, kernels-cpu.{json,md,png}, train-cpu.{json,md}, results-cpu.md (exit $status)"
exit "$status"
