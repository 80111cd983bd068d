#!/usr/bin/env bash
# The transfer stream's GPU run: builds and checks the kernel, runs every transfer test (device paths included),
# then the benchmark and its plot. Logs and results land in $OUT; the short table is printed last.
#   bash benchmarks/gpu_transfer.sh            (from the repository root, PYTHONPATH set to find kvbm_builder)
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv,noheader
  python3 -c "import sys, cupy, numpy; print('python', sys.version.split()[0], 'cupy', cupy.__version__, 'numpy', numpy.__version__)"
  nproc; df -T /tmp | tail -1
  for u in 1 4 8; do
    nvcc -arch=sm_90 -cubin -Xptxas -v -DKVBM_UNROLL=$u -o /tmp/k$u.cubin kvbm_builder/transfer/copy_kernel.cu 2>&1 | grep -E "registers|spill"
  done
  cuobjdump -sass /tmp/k4.cubin | grep -oE "\b(LDG|STG)[A-Z0-9.]*" | sort | uniq -c
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
echo "=== transfer tests"
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider -rs -x tests/test_transfer_gpu.py tests/test_transfer_host.py \
  tests/test_transfer_table.py > "$OUT/transfer_tests.log" 2>&1
echo "pytest exit $?"; tail -4 "$OUT/transfer_tests.log"
echo "=== benchmark"
timeout ${BENCH_TIMEOUT:-330} python3 benchmarks/bench_transfer.py --out "$OUT" --disk-dir "${DISK_DIR:-/tmp}" ${BENCH_ARGS:-} \
  > "$OUT/bench_stdout.log" 2>&1
echo "bench exit $?"
python3 benchmarks/plot_transfer.py "$OUT/transfer.json" "$OUT/transfer_gbps.svg" || echo "plot failed"
grep -E "^(ceiling|disk|pageable|table)" "$OUT/bench_stdout.log"
grep -E "^variant raw" "$OUT/bench_stdout.log"
sed -n '/=== transfer summary/,$p' "$OUT/bench_stdout.log"
