#!/usr/bin/env bash
# Run every benchmark at its recorded setting; each rewrites its section of benchmarks/RESULTS.md
# and its PNG. Extra arguments go to every script, e.g.
#   bash benchmarks/run_all.sh              # the recorded setting (~25 min on 2 quiet cores)
#   bash benchmarks/run_all.sh --quick      # smoke run of every script, prints only
#   bash benchmarks/run_all.sh --threads 1  # pin torch to one thread (e.g. on a shared machine)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
start=$SECONDS
for b in bench_injection bench_many_adapters bench_train_step "bench_train_step --wide" bench_steering \
         bench_calibration_memory bench_compile bench_qlora bench_peft_load bench_train_many bench_generate bench_wide \
         bench_everyday bench_layer_kinds; do
    t0=$SECONDS
    echo "=== $b $*"
    read -r script flags <<< "$b"
    # shellcheck disable=SC2086  # flags is a word list on purpose
    "$PY" "benchmarks/$script.py" $flags "$@"
    echo "=== $b done in $((SECONDS - t0)) s"
done
echo "=== all benchmarks done in $((SECONDS - start)) s"
