#!/usr/bin/env bash
# Runs every benchmark and keeps its printed lines (ratios and throughputs) in
# results/benchmarks/<name>.txt, headed by the machine it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p results/benchmarks
machine="$(python3 -c 'import jax,platform,os; print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}")')"
for bench in benchmarks/bench_*.py; do
  name="$(basename "$bench" .py)"
  [ "$#" -gt 0 ] && [[ " $* " != *" $name "* ]] && continue
  echo "== $name"
  { echo "# machine: $machine; run $(date -u +%Y-%m-%d)"; python3 "$bench" 2>/dev/null | grep -E '^(RATIO|[a-z_]+.*=)' ; } > "results/benchmarks/$name.txt.tmp"
  mv "results/benchmarks/$name.txt.tmp" "results/benchmarks/$name.txt"
  cat "results/benchmarks/$name.txt"
done
