#!/usr/bin/env bash
# One GPU session's checks, in the order of their value, with logs under $OUT (or ./gpu-session):
#   1. benchmarks/gpu_bench.py (under five minutes): the figures of issues 12 and 13;
#   2. the CUDA test modules, each test's name and result in the log (a cut-off run still names them);
#   3. the whole suite under pytest-xdist, verbose, with the slowest tests listed;
#   4. where the command's main thread spends its time (cProfile of three runs: profile_run.py), and
#      the run loop's own ceiling with the work precomputed (host_ceiling.py).
# Usage on the device machine, from the repository root:
#   PART=bench bash benchmarks/gpu_session.sh     # 1 only (about 290 s)
#   PART=tests bash benchmarks/gpu_session.sh     # 2 and 3 (about 250 s on an H200 with 16 cores)
#   PART=profile bash benchmarks/gpu_session.sh   # 4 only (about 100 s)
set -uo pipefail
OUT="${OUT:-gpu-session}"
mkdir -p "$OUT"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PART="${PART:-all}"
BUDGET="${BUDGET:-240}"

if [[ "$PART" == all || "$PART" == bench ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
  python benchmarks/cuda_startup.py --device cuda > "$OUT/startup.log" 2>&1
  python benchmarks/cuda_startup.py --device cpu >> "$OUT/startup.log" 2>&1
  timeout 300 python benchmarks/gpu_bench.py --out-json "$OUT/gpu.json" > "$OUT/gpu_bench.log" 2>&1
  echo "gpu_bench exit $?"
  tail -n 25 "$OUT/gpu_bench.log"
fi

if [[ "$PART" == all || "$PART" == tests ]]; then
  # pyproject's addopts ask for pytest-xdist; without it there, they are replaced.
  workers="-o addopts=-ra"
  if python -c "import xdist" 2>/dev/null; then workers="-n $(( $(nproc) - 2 ))"; fi
  common=(-p no:cacheprovider -p no:benchmark -v -rfE --tb=short --durations=15)
  timeout 90 python -m pytest "${common[@]}" $workers tests/test_cuda.py tests/test_device_decode.py \
    tests/test_precision.py > "$OUT/cuda_tests.log" 2>&1
  echo "CUDA tests exit $?"
  grep -E "FAILED|ERROR" "$OUT/cuda_tests.log" | head -20
  timeout "$BUDGET" python -m pytest "${common[@]}" $workers tests > "$OUT/suite.log" 2>&1
  echo "suite exit $? (124: cut off after $BUDGET s; the log names every test that finished)"
  grep -E "(FAILED|ERROR) tests/" "$OUT/suite.log" | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' | sort -u | head -30
  tail -n 3 "$OUT/suite.log"
fi

if [[ "$PART" == all || "$PART" == profile ]]; then
  timeout 150 python benchmarks/profile_run.py --out "$OUT/profile" > "$OUT/profile.log" 2>&1
  echo "profile exit $?"
  grep -E "^## " "$OUT/profile.log"
  # The run loop's own ceiling on this machine's CPU (model, decoding and statistics precomputed).
  for save in "" "--save shards"; do timeout 60 python benchmarks/host_ceiling.py $save 2>&1 | tail -n 1; done | tee "$OUT/host_ceiling.log"
fi
