#!/usr/bin/env bash
# One-call GPU check for the Triton kernels: install, kernel tests on the GPU (no interpreter), benchmark.
# Usage on the device machine, from the repo root:  bash scripts/gpu_check.sh   (logs + JSON under $OUT)
# Env: BENCH_ARGS (e.g. "--final" for the short v2 run), BENCH_TIMEOUT, TESTS_K, TESTS_TIMEOUT.
set -uo pipefail
OUT=${OUT:-/tmp/hf_lowbit_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUT/env.log"
python3 -m pip install --no-deps --no-build-isolation -e . -q >>"$OUT/env.log" 2>&1
if ! (cd /tmp && python3 -c "import hf_lowbit.kernels") >>"$OUT/env.log" 2>&1; then
  echo "editable install failed; using a copied package on PYTHONPATH" | tee -a "$OUT/env.log"
  rm -rf /tmp/pp && mkdir -p /tmp/pp && cp -r hf_lowbit /tmp/pp/hf_lowbit && cp -r kernels /tmp/pp/hf_lowbit/kernels
  for d in model_patches model_cards; do [ -d "$d" ] && cp -r "$d" "/tmp/pp/hf_lowbit/$d"; done
  export PYTHONPATH=/tmp/pp
fi
python3 -c "import torch, triton, hf_lowbit.kernels as k; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), k.is_available('cuda'))" 2>&1 | tee -a "$OUT/env.log"
# TESTS_K: a pytest -k filter for a short run; TESTS_K=skip skips the tests
if [ "${TESTS_K:-}" != "skip" ]; then
  ( cd tests && timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -x -p no:cacheprovider test_kernels.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 ) | tee "$OUT/tests.log" | tail -15
fi
timeout ${BENCH_TIMEOUT:-420} python3 scripts/bench.py --out "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
