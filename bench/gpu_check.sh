#!/usr/bin/env bash
# The GPU check, in one command of under 8 minutes, on a GPU machine with torch, triton, nvcc and
# ninja but no network (run from anywhere: it works in the repository root):
#
#   bash bench/gpu_check.sh
#
# 1. builds the package in place, CUDA kernels included (RECAP_KERNELS_BUILD_CUDA=1), and checks
#    ptxas's report of that build for register spills in our kernels (bench/ptxas_report.py);
# 2. runs the CUDA backend's `gpu` tests, the GPU benchmark (python -m recap_kernels bench --device
#    cuda, which measures the device-to-device copy bandwidth in the same run), the other `gpu`
#    tests, then one CUDA-kernel case under compute-sanitizer (memcheck) when the toolkit has it;
# 3. tunes the Triton launch shape on scratch tensors (bench/tune_triton.py);
# 4. prints a short summary table last.
# Everything fits BUDGET seconds (500 by default): stages run in that order and the last ones are
# cut short or skipped when time runs out.
#
# Logs and the benchmark's JSON go to $OUT when it is set (the device tool brings that folder back),
# else to a fresh temporary folder. Without pydantic or pytest-benchmark on the machine, wheels placed
# in ./gpu-wheels (git-ignored: pydantic's, and pytest-benchmark's with py-cpuinfo, fetched with
# `pip download --no-deps -d gpu-wheels pytest-benchmark py-cpuinfo` on a machine with an index) are
# installed to a scratch path first; the pytest-benchmark suite (stage bench-py) runs when it can.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

if ! "$PY" -c "import pydantic, pytest_benchmark" 2>/dev/null && compgen -G "gpu-wheels/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/recap-site gpu-wheels/*.whl \
    && export PYTHONPATH=/tmp/recap-site${PYTHONPATH:+:$PYTHONPATH}
fi

# The whole check stays within BUDGET seconds (the device tool allows 10 minutes a command): each
# stage's limit is cut to what is left, and a stage with under 20 s left is skipped, so the stages
# run in order of importance.
BUDGET=${BUDGET:-500}

# stage NAME TIMEOUT COMMAND...: runs one stage with its log in $OUT/NAME.log and a line in the summary.
stage() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    printf '%-8s skipped: the %ss budget is spent\n' "$name" "$BUDGET" >> "$SUMMARY"
    return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-8s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$OUT/$name.log")" >> "$SUMMARY"
  return $rc
}

status=0
RECAP_KERNELS_BUILD_CUDA=1 RECAP_KERNELS_PTXAS_REPORT=1 \
  stage build 240 "$PY" -m pip install -v --no-build-isolation --no-deps --no-cache-dir -e . || status=1
stage ptxas 30 "$PY" bench/ptxas_report.py "$OUT/build.log" || status=1
stage info 60 "$PY" -m recap_kernels info || status=1
# The CUDA backend's tests first (its issue is the open one), then every other gpu test.
stage tests-cuda 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs tests/test_cuda_ops.py \
  tests/test_cuda_embedding.py tests/test_equivalence.py -k "cuda" || status=1
stage bench 120 "$PY" -m recap_kernels bench --device cuda --json "$OUT/bench.json" || status=1
stage tests 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs tests --ignore tests/test_cuda_ops.py \
  --ignore tests/test_cuda_embedding.py \
  -k "not (test_equivalence and cuda)" || status=1
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then  # the saved GPU run for bench/results (make bench's suite)
  stage bench-py 120 "$PY" -m pytest bench -p no:cacheprovider --bench-device cuda -q -k "not train" \
    --benchmark-autosave "--benchmark-storage=file://$OUT/bench-results" || status=1
else
  echo "bench-py skipped: no pytest-benchmark (see gpu-wheels above)" >> "$SUMMARY"
fi
SANITIZER="$CUDA_HOME/bin/compute-sanitizer"
if [ -x "$SANITIZER" ]; then
  stage memcheck 90 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_cuda_ops.py -k sanitizer || status=1
else
  echo "memcheck skipped: no $SANITIZER" >> "$SUMMARY"
fi
stage tune 45 "$PY" bench/tune_triton.py || status=1

echo
echo "== logs in $OUT =="
cat "$OUT/info.log" 2>/dev/null | head -n 30
echo
echo "== ptxas (registers, spills) =="
cat "$OUT/ptxas.log" 2>/dev/null | tail -n 60
echo
for log in tests-cuda tests; do
  echo "== $log =="
  grep -E "passed|failed|error" "$OUT/$log.log" 2>/dev/null | tail -n 3
  grep -E "^(FAILED|ERROR)" "$OUT/$log.log" 2>/dev/null | head -n 30
done
echo
echo "== memcheck =="
tail -n 5 "$OUT/memcheck.log" 2>/dev/null
echo
echo "== tune (Triton launch shapes) =="
cat "$OUT/tune.log" 2>/dev/null | tail -n 20
echo
echo "== bench =="
cat "$OUT/bench.log" 2>/dev/null | tail -n 45
echo
echo "== summary (stage, exit code, seconds, last line) =="
cat "$SUMMARY"
exit $status
