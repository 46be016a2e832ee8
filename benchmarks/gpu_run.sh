#!/usr/bin/env bash
# Everything that needs a GPU, in three runs of one call each on a CUDA machine. Each run stops itself before its
# budget (seconds, second argument; defaults below) and every step writes its figures as it goes, so a run cut
# short keeps what it measured. Runs 1 and 2 together fit in 15 minutes of machine time.
#   bash benchmarks/gpu_run.sh run1 [480]   correctness first, then the headline figures:
#       nvidia-smi; the GPU-only tests (pytest -m gpu); compute-sanitizer memcheck and racecheck on one small
#       forward+backward of every kernel (benchmarks/kernel_check.py); benchmarks/headline.py (ceilings, the op at
#       the §6 shape against SDPA's flash/efficient/cuDNN backends and the published eager attention, the §6
#       train-step table, profiler tables); eager vs CUDA graphs (benchmarks/graphs.py); the numerics table; then
#       the rest of the test suite on CUDA
#   bash benchmarks/gpu_run.sh run2 [270]   the matching kernels' selection against fp64
#       (benchmarks/matching_accuracy.py), Nsight Compute on the kernels at the §6 shape, then the launch-
#       configuration sweep (benchmarks/tune.py: matching, attention, prompt K/V kernels)
#   bash benchmarks/gpu_run.sh run3 [540]   every benchmark shape and sweep (pytest benchmarks/ --benchmark-only),
#       a prompt bank's mixed batch against one task's and separate batches (benchmarks/bank.py --time), then the
#       profiling CLI's table and PNG
# The package is used from the tree (PYTHONPATH=.): nothing is installed. Results go to benchmarks/results/ or to
# $RESULTS when set (at most 8 files per run); commit them under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
# CUDA's and Nsight Compute's usual install folders, for compute-sanitizer and ncu when they are not on PATH
PATH="$PATH:/usr/local/cuda/bin:/usr/local/cuda/compute-sanitizer$(printf ':%s' /opt/nvidia/nsight-compute/*)"
out="${RESULTS:-benchmarks/results}"
mkdir -p "$out"
stage="${1:-}"
case "$stage" in
  run1) budget="${2:-480}" ;;
  run2) budget="${2:-270}" ;;
  run3) budget="${2:-540}" ;;
  *) echo "usage: bash benchmarks/gpu_run.sh run1|run2|run3 [budget seconds]" >&2; exit 2 ;;
esac
end=$((SECONDS + budget))

# step CAP CMD...: run CMD for at most CAP seconds and never past the run's end; skipped when under 10 s are left
step() {
  local cap=$1 left=$((end - SECONDS))
  shift
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 10 ]; then echo "== skipped (out of time): $*"; return 0; fi
  echo "== [${cap}s] $*"
  timeout --kill-after=5 "$cap" "$@"
  echo "== exit $? after $((SECONDS - end + budget)) s"
}

case "$stage" in
  run1)
    {
      nvidia-smi
      "$py" -m pip list 2>/dev/null | grep -iE "^(torch|triton|timm|transformers|open.clip.torch|numpy|pytest) "
      step 210 "$py" -m pytest tests -m gpu -q -rfE -p no:cacheprovider
    } 2>&1 | tee "$out/gpu-tests.log"
    # compute-sanitizer on every kernel at small shapes; the caching allocator off, so memcheck sees each
    # allocation's real bounds
    for tool in memcheck racecheck; do
      step 75 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 1 \
        --print-limit 20 "$py" benchmarks/kernel_check.py
    done 2>&1 | tee "$out/sanitizer.log" | tail -n 20
    step 150 "$py" benchmarks/headline.py --out "$out" 2>&1 | tail -n 25
    # ViT-B/16 train step and eval forward, eager vs CUDA graphs (torch.compile mode="reduce-overhead"), batch
    # 32, 64, 128: is the eager step host-bound? (written after every figure)
    step 120 "$py" benchmarks/graphs.py --out "$out" 2>&1 | tail -n 12
    step 40 "$py" benchmarks/numerics.py --out "$out" 2>&1 | tail -n 5
    # four workers where pytest-xdist is installed: kernel compilation is most of the suite's time on a GPU
    workers=$("$py" -c "import xdist" 2>/dev/null && echo "-n 4")
    step 600 "$py" -m pytest tests -m "not gpu" $workers -v -rfE -p no:cacheprovider 2>&1 \
      | tee "$out/gpu-suite.log" | grep -E "FAILED|ERROR|passed|failed|== " | tail -n 25 ;;
  run2)
    # the matching kernels' selection against fp64 (random activations; a trained backbone's too when its weights
    # travelled with the tree: runs/fmnist/pretrain, from examples/fashion_mnist_transfer.py)
    weights=runs/fmnist/pretrain/last.safetensors
    step 45 "$py" benchmarks/matching_accuracy.py --out "$out" $([ -f "$weights" ] && echo --weights "$weights") \
      2>&1 | tail -n 24
    step 120 ncu --clock-control none --profile-from-start off --target-processes all \
      -k regex:'_fwd_kernel|_bwd_kernel|_match_fwd_kernel|_match_bwd_kernel|_topk_bits_kernel' \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section Occupancy --section LaunchStats --metrics dram__bytes_read.sum,dram__bytes_write.sum \
      --csv --page details --log-file "$out/ncu-spec.csv" "$py" benchmarks/kernel_check.py --spec 2>&1 | tail -n 15
    step 600 "$py" benchmarks/tune.py --out "$out" 2>&1 | tee "$out/tune.log" | tail -n 8 ;;
  run3)
    for level in op model sweep; do
      step 200 "$py" -m pytest "benchmarks/test_$level.py" --benchmark-only -q -p no:cacheprovider \
        2>&1 | tee "$out/bench-$level.log" | tail -n 6
      cp benchmarks/results/*-"$level".json "$out/" 2>/dev/null
    done
    # a prompt bank: 8 tasks mixed in a batch of 128 against one task's batch and 8 separate batches of 16
    step 90 "$py" benchmarks/bank.py --time --json "$out/bank-gpu.json" 2>&1 | tail -n 8
    step 600 "$py" -m tcpa_kernels.profile --out "$out" 2>&1 | tail -n 20 ;;
esac
