#!/usr/bin/env bash
# Everything that needs a GPU, in stages meant for one device call each (each cut off by timeout inside the
# 10-minute limit; at most 8 files come back per call):
#   bash benchmarks/gpu_run.sh tests         GPU test suite and the numerics table
#   bash benchmarks/gpu_run.sh bench-op      pytest benchmarks/test_op.py --benchmark-only (op level, §6 ratios)
#   bash benchmarks/gpu_run.sh bench-model   pytest benchmarks/test_model.py --benchmark-only (train step, §6)
#   bash benchmarks/gpu_run.sh bench-sweep   pytest benchmarks/test_sweep.py --benchmark-only (batch, prompts, image)
#   bash benchmarks/gpu_run.sh profile       the profiling CLI at its GPU defaults (table, JSON, PNG)
#   bash benchmarks/gpu_run.sh tune          time the kernels' candidate launch configurations (benchmarks/tune.py)
# No argument runs every stage. The GPU image has torch, triton and timm but no internet: the package is used from
# the tree (PYTHONPATH=.). Results land in benchmarks/results/ and in $OUT when set: commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out" benchmarks/results
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tests bench-op bench-model bench-sweep profile tune)

for stage in "${stages[@]}"; do
  echo "== $stage"
  case "$stage" in
    tests)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
      timeout 420 python -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" | tail -n 30
      timeout 120 python benchmarks/numerics.py --out benchmarks/results 2>&1 | tail -n 20
      cp benchmarks/results/numerics-*.json benchmarks/results/numerics-*.md "$out/" 2>/dev/null ;;
    bench-op|bench-model|bench-sweep)
      level="${stage#bench-}"
      timeout 540 python -m pytest "benchmarks/test_$level.py" --benchmark-only -q -p no:cacheprovider \
        --benchmark-json="$out/pytest-benchmark-$level.json" 2>&1 | tee "$out/bench-$level.log" | tail -n 15
      cp benchmarks/results/*-"$level".json "$out/" 2>/dev/null ;;
    profile)
      timeout 540 python -m tcpa_kernels.profile --out "$out/profile" 2>&1 | tail -n 20 ;;
    tune)
      timeout 540 python benchmarks/tune.py 2>&1 | tee "$out/tune.log" | tail -n 12
      cp benchmarks/results/tune-*.json "$out/" 2>/dev/null ;;
    *)
      echo "unknown stage $stage (tests | bench-op | bench-model | bench-sweep | profile | tune)" >&2; exit 2 ;;
  esac
done
