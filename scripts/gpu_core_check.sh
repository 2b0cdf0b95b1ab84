#!/usr/bin/env bash
# One-call GPU check of the core (not the kernel benchmark: see gpu_check.sh): install on the GPU image
# (torch 2.11 / transformers 5.17 there), run the CPU test suite under those versions, then the demo on the GPU
# (BF16 vs NVFP4 through Trainer, finalize, save, reload, generate). Logs under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/hf_lowbit_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -m pip install --no-deps --no-build-isolation -e . -q >"$OUT/core_env.log" 2>&1
python3 -c "import torch, transformers, peft, accelerate; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/core_env.log"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest tests -q -x -p no:cacheprovider --ignore=tests/test_kernels.py \
  -k "${TEST_FILTER:-not nothing}" 2>&1 | tail -25 | tee "$OUT/core_tests.log"
( cd /tmp && timeout ${DEMO_TIMEOUT:-240} hf-lowbit demo --output-dir "$OUT/demo" --overwrite ${DEMO_ARGS:-} 2>&1 ) \
  | grep -v "it/s\]$" | tr '\r' '\n' | grep -v "it/s\]$\|s/it\]$" | tail -30 | tee "$OUT/demo.log"
rm -rf "$OUT/demo"
