#!/usr/bin/env bash
# Everything this project runs on the lent GPU machine, in one call (the device tool's `run`, carrying .whl):
#   bash benchmarks/gpu_run.sh [tests] [gpu-tests] [quickstart] [examples] [pinned] [device] [all-tests] [transfer-tests]
#                              [transfer] [offload] [small] [batch]
# Logs land in $OUT (the device tool brings them back). The wheels come from ../shared/gpu/wheels.sh.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
steps=${*:-tests quickstart pinned device}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader  # printed only: $OUT returns 8 files
python3 -c "import sys, cupy, numpy; print('python', sys.version.split()[0], 'cupy', cupy.__version__, 'numpy', numpy.__version__)"
for step in $steps; do
  echo "=== $step"
  case $step in
    tests) python3 -m pytest -q -p no:cacheprovider -m gpu -rs tests 2>&1 | tee "$OUT/gpu_tests.log" ;;
    all-tests) python3 -m pytest -q -p no:cacheprovider -rs tests > "$OUT/all_tests.log" 2>&1; tail -25 "$OUT/all_tests.log" ;;
    quickstart) python3 examples/quickstart.py --disk-dir /tmp 2>&1 | tee "$OUT/quickstart.log" ;;
    examples) { python3 examples/offload_roundtrip.py && python3 examples/metrics.py --blocks 8; } > "$OUT/examples.log" 2>&1
      tail -40 "$OUT/examples.log" ;;
    gpu-tests) timeout 480 python3 -m pytest -q -p no:cacheprovider -rs --continue-on-collection-errors -m gpu tests tests/test_metrics_manager.py \
      tests/test_offload.py > "$OUT/gpu_tests.log" 2>&1; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -30 ;;
    pinned) python3 benchmarks/bench_pinned.py 2>&1 | tee "$OUT/bench_pinned.log" ;;
    device) python3 benchmarks/bench_device.py 2>&1 | tee "$OUT/bench_device.log" ;;
    transfer-tests) python3 -m pytest -q -p no:cacheprovider -rs tests/test_transfer_gpu.py tests/test_transfer_host.py \
      tests/test_transfer_table.py 2>&1 | tee "$OUT/transfer_tests.log" ;;
    transfer) python3 benchmarks/bench_transfer.py --out "$OUT" --disk-dir /tmp > "$OUT/bench_transfer_stdout.log" 2>&1
      python3 benchmarks/plot_transfer.py "$OUT/transfer.json" "$OUT/transfer_gbps.svg"
      tail -14 "$OUT/bench_transfer_stdout.log" ;;
    offload) python3 benchmarks/bench_offload.py --gpu --disk-dir /tmp --json "$OUT/bench_offload.json" 2>&1 \
      | tee "$OUT/bench_offload.log" ;;
    small) python3 benchmarks/profile_small_copy.py --profile 2>&1 | tee "$OUT/profile_small_copy.log" ;;
    batch) python3 benchmarks/profile_small_copy.py --batch 2>&1 | tee "$OUT/profile_batch.log" ;;
    *) echo "unknown step $step" ;;
  esac
done
