#!/usr/bin/env bash
# Everything that needs a GPU, in one call (for the device tool: `bash benchmarks/gpu_run.sh`).
# The GPU image has torch and triton but no internet: the package is used from the tree (PYTHONPATH=.).
# Results land in benchmarks/results/ (and are copied to $OUT when set) -- commit them with the device name.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out" benchmarks/results
pip install --no-deps -q timm safetensors 2>/dev/null || true   # only if missing and reachable
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest tests -q -x 2>&1 | tail -n 30 | tee "$out/gpu-tests.log"
python benchmarks/numerics.py --out benchmarks/results 2>&1 | tail -n 20
python -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$out/pytest-benchmark.json" 2>&1 | tail -n 5
python -m tcpa_kernels.profile --out "$out/profile" 2>&1 | tail -n 12
cp benchmarks/results/*.json benchmarks/results/*.md "$out/" 2>/dev/null || true
