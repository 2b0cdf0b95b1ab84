#!/usr/bin/env bash
# GPU acceptance runs of the issues, in stages, one device call each group. Logs and JSON under $OUT.
#   STAGES="core demo mhmoe calib" bash scripts/gpu_acceptance.sh          # one GPU
#   STAGES="repro moe scale" bash scripts/gpu_acceptance.sh                # two GPUs
#   PACK=0 STAGES="sdfsdp" bash scripts/gpu_acceptance.sh                  # two GPUs, SD-MoE under FSDP2
# Stages:
#   host   scripts/profile_linear_host.py: host vs device time of one FP4 linear and of each launch in it, the
#          CUDA API calls and the synchronizing CUDA calls of one fwd+bwd
#   core   GPU test subset (kernels without the interpreter; MoE, training, SD-MoE, MH-MoE tests) with xdist
#   demo   hf-lowbit demo (BF16 vs NVFP4 through Trainer, finalize, save, reload, generate)
#   mhmoe  continual-learning sequence: LoRAMoE (H=1, r=9) vs MH-MoE (H=8, r=2) at matched activated parameters
#   mhbench  scripts/bench_mhmoe.py: MH-MoE vs LoRAMoE step time, interleaved, on a 1024-wide 8-layer Qwen3 base
#   sdpretrain  scripts/sd_moe_pretrain.py at GPU size: baseline MoE vs SD-MoE at LR and 4x LR (SDP_ARGS)
#   calib  reproduce_meanbias.py, 20 steps per config: data preparation time and step times, to size `repro`
#   refresh  scripts/bench_sd_refresh.py: SD-MoE basis refresh time and accuracy per cuSOLVER driver; the fastest
#          accurate one on the bench_moe model's shape is then used by the moe stage's SD-MoE part
#   sdprof scripts/profile_sd_step.py: host vs device time and kernel counts of SD-MoE's pieces of a training step
#   moe    scripts/bench_moe.py: FP4 experts vs BF16 grouped GEMM, SD-MoE step overhead
#   gemmcmp  P8 per HF_LOWBIT_GROUPED_GEMM (triton, cublas32) and one FP4 linear's host/device time per HF_LOWBIT_GEMM
#   repro  reproduce_meanbias.py, configs split over the GPUs in parallel, then merged (REPRO_ARGS for sizes)
#   scale  train.py tokens/s on 1 vs 2 GPUs (DDP) for bf16 and nvfp4-averis, and one FSDP2 run (SCALE_ARGS);
#          with one GPU only the 1-GPU runs (the end-to-end P4 ratio)
#   sdfsdp  two GPUs: tests/test_sd_moe_fsdp.py on NCCL (FSDP2-sharded SD-MoE vs the unsharded model), then a short
#          SD-MoE NVFP4 training (train.py --tiny, qwen3-moe-tiny) under FSDP2 and under DDP (SDFSDP_STEPS steps)
#   profile  scripts/profile_experts.py: torch.profiler table of FP4 experts fwd+bwd (nvfp4, mxfp4);
#            scripts/profile_train_step.py: host vs device time of a qwen3-0.6b-shape training step, BF16 vs NVFP4
# Everything under $OUT is packed into $OUT/results.tgz at the end (PACK=0: not).
set -uo pipefail
OUT=${OUT:-/tmp/hf_lowbit_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
unset TRITON_INTERPRET
STAGES=${STAGES:-"core demo"}
has() { [[ " $STAGES " == *" $1 "* ]]; }
clean() { tr '\r' '\n' | grep -v "it/s\]$\|s/it\]$"; }
stamp() { echo "== $1 $(date +%T)" | tee -a "$OUT/stages.log"; }
# a stage's failing command (pipefail: any part of its pipeline) is logged; the script exits with the count
FAILED=0
fail() { echo "!! stage $1 failed (exit $2)" | tee -a "$OUT/stages.log"; FAILED=$((FAILED + 1)); }

python3 -m pip install --no-deps --no-build-isolation -e . -q >"$OUT/env.log" 2>&1
python3 -c "import torch, transformers, peft, accelerate, triton; print(torch.__version__, transformers.__version__, peft.__version__, accelerate.__version__, triton.__version__, torch.cuda.get_device_name(), torch.cuda.device_count())" 2>&1 | tee -a "$OUT/env.log"
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")

if has host; then stamp host
  timeout ${HOST_TIMEOUT:-150} python3 scripts/profile_linear_host.py --iters 50 --out "$OUT/profile_linear_host.json" \
    2>&1 | grep -v Warn | tee "$OUT/profile_linear_host.log" | grep -v "^ \+[0-9]\+ \+[0-9.]\+ " || fail host $?
fi
if has core; then stamp core
  timeout ${CORE_TIMEOUT:-300} python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_kernels.py tests/test_kernels_grouped.py tests/test_kernels_mx_fp8.py tests/test_moe.py \
    tests/test_training.py tests/test_sd_moe.py tests/test_mhmoe.py tests/test_averis.py 2>&1 | tail -15 | tee "$OUT/core_tests.log" \
    || fail core $?
fi
if has demo; then stamp demo
  ( cd /tmp && timeout ${DEMO_TIMEOUT:-200} hf-lowbit demo --output-dir "$OUT/demo" --overwrite 2>&1 ) | clean | tail -25 \
    | tee "$OUT/demo.log" || fail demo $?
  rm -rf "$OUT/demo"
fi
if has mhmoe; then stamp mhmoe
  for cfg in "loramoe 1 9" "mhmoe 8 2"; do set -- $cfg
    timeout ${MHMOE_TIMEOUT:-150} python3 scripts/continual.py --output-dir "$OUT/continual_$1" --tiny-base-dir /tmp/tiny_base \
      --num-heads $2 --r $3 ${MHMOE_ARGS:-} 2>&1 | clean | tail -12 | tee "$OUT/continual_$1.log"
  done
fi
if has mhbench; then stamp mhbench
  timeout ${MHBENCH_TIMEOUT:-180} python3 scripts/bench_mhmoe.py --out "$OUT/bench_mhmoe.json" ${MHBENCH_ARGS:-} 2>&1 | grep -v Warn | tail -5 | tee "$OUT/bench_mhmoe.log"
fi
if has sdpretrain; then stamp sdpretrain
  timeout ${SDP_TIMEOUT:-200} python3 scripts/sd_moe_pretrain.py --output-dir "$OUT/sd_moe_pretrain" ${SDP_ARGS:---steps 400 --eval-every 100 --max-bytes 15000000} 2>&1 | tee "$OUT/sd_moe_pretrain.log" | tail -12
fi
if has calib; then stamp calib
  timeout ${CALIB_TIMEOUT:-200} python3 scripts/reproduce_meanbias.py --data site-packages --out /tmp/calib --steps 20 \
    --eval-every 20 ${REPRO_ARGS:-} 2>&1 | tail -12 | tee "$OUT/calib.log"
fi
SD_DRIVER_ARG=""
if has refresh; then stamp refresh
  timeout ${REFRESH_TIMEOUT:-120} python3 scripts/bench_sd_refresh.py --reps 3 --out "$OUT/bench_sd_refresh.json" ${REFRESH_ARGS:-} 2>&1 \
    | tee "$OUT/bench_sd_refresh.log"
  best=$(python3 -c "import json, sys; sys.path.insert(0, 'scripts'); from bench_sd_refresh import best_driver, SHAPES; \
print(best_driver(json.load(open('$OUT/bench_sd_refresh.json'))['rows'], SHAPES[0][0]))" 2>>"$OUT/stages.log")
  echo "fastest accurate refresh driver: ${best:-none}" | tee -a "$OUT/stages.log"
  [ -n "$best" ] && SD_DRIVER_ARG="--sd-svd-driver $best"
fi
if has sdprof; then stamp sdprof
  timeout ${SDPROF_TIMEOUT:-150} python3 scripts/profile_sd_step.py --out "$OUT/profile_sd_step.json" 2>&1 | grep -v Warn \
    | tee "$OUT/profile_sd_step.log" | grep " µs " || fail sdprof $?
fi
if has moe; then stamp moe
  timeout ${MOE_TIMEOUT:-240} python3 scripts/bench_moe.py --out "$OUT/bench_moe.json" $SD_DRIVER_ARG ${MOE_ARGS:-} 2>&1 | tail -40 \
    | tee "$OUT/bench_moe.log" || fail moe $?
fi
if has gemmcmp; then stamp gemmcmp
  # the GEMM implementations side by side: MoE experts (P8) per HF_LOWBIT_GROUPED_GEMM, the dense linear's host and
  # device time per HF_LOWBIT_GEMM (the host-bound width of the P4 model)
  for impl in triton cublas32; do
    HF_LOWBIT_GROUPED_GEMM=$impl timeout ${GEMMCMP_TIMEOUT:-120} python3 scripts/bench_moe.py --skip-sd \
      --out "$OUT/bench_moe_grouped_$impl.json" 2>&1 | grep -A6 "^| name" | tee "$OUT/bench_moe_grouped_$impl.log" \
      || fail gemmcmp $?
    HF_LOWBIT_GEMM=$impl timeout ${GEMMCMP_TIMEOUT:-120} python3 scripts/profile_linear_host.py --iters 50 \
      --out "$OUT/profile_linear_host_$impl.json" 2>&1 | grep -v Warn | grep -v "^ \+[0-9]\+ \+[0-9.]\+ " \
      | tee "$OUT/profile_linear_host_$impl.log" || fail gemmcmp $?
  done
fi
if has repro; then stamp repro
  IFS=',' read -ra GROUPS_ <<< "${REPRO_GROUPS:-bf16,nvfp4,nvfp4-averis}"
  dirs=(); i=0
  for g in "${GROUPS_[@]}"; do
    CUDA_VISIBLE_DEVICES=$((i % NGPU)) timeout ${REPRO_TIMEOUT:-420} python3 scripts/reproduce_meanbias.py \
      --data site-packages --configs "${g//+/,}" --out /tmp/repro_$i ${REPRO_ARGS:-} >"$OUT/repro_$i.log" 2>&1 &
    dirs+=(/tmp/repro_$i); i=$((i + 1))
  done
  wait
  python3 scripts/reproduce_meanbias.py --merge "${dirs[@]}" --out "$OUT/repro" 2>&1 | tee "$OUT/repro.log"
  for d in "${dirs[@]}"; do cp -r "$d/diag_early" "$d/diag_late" "$OUT/repro/" 2>/dev/null; done
fi
if has scale; then stamp scale
  # 48 blocks: whole batches of 8 on 1 and on 2 GPUs. With the 50 blocks of the data, the 1-GPU run's ragged last
  # batch (2 blocks) re-tuned every GEMM for the new M inside the timed window (8.3k vs 12.9k tokens/s, 2026-11-29)
  common="--from-config ${SCALE_MODEL:-qwen3-0.6b-shape} --train-files hf_lowbit/data --block-size 1024 --batch-size 8 \
    --max-train-blocks 48 --max-steps ${SCALE_STEPS:-40} --save-every 0 --eval-fraction 0 --no-progress --report-to none --overwrite ${SCALE_ARGS:-}"
  # 2 GPUs first: the 1-GPU run then finds every Triton kernel in the on-disk cache (a cold 1-GPU FP4 run measured
  # JIT compilation inside its timed window: 6.8k tokens/s on 2026-11-29, vs 25.9k for 2 GPUs)
  for prec in bf16 nvfp4-averis; do
    if [ "$NGPU" -ge 2 ]; then
      timeout 240 accelerate launch --config_file scripts/accelerate/ddp.yaml --num_processes 2 scripts/train.py $common \
        --precision $prec --output-dir /tmp/s2_$prec 2>&1 | grep "hf-lowbit train" | tee -a "$OUT/scale.log"
      cp /tmp/s2_$prec/log.json "$OUT/scale_2gpu_ddp_$prec.json"
    fi
    CUDA_VISIBLE_DEVICES=0 timeout 240 python3 scripts/train.py $common --precision $prec --output-dir /tmp/s1_$prec 2>&1 | grep "hf-lowbit train" | tee -a "$OUT/scale.log"
    cp /tmp/s1_$prec/log.json "$OUT/scale_1gpu_$prec.json"
  done
  if [ "$NGPU" -ge 2 ]; then
    timeout 240 accelerate launch --config_file scripts/accelerate/fsdp2.yaml --num_processes 2 scripts/train.py $common \
      --precision nvfp4-averis --output-dir /tmp/s2f 2>&1 | grep "hf-lowbit train" | tee -a "$OUT/scale.log"
    cp /tmp/s2f/log.json "$OUT/scale_2gpu_fsdp2_nvfp4-averis.json" 2>/dev/null
  fi
fi
if has sdfsdp; then stamp sdfsdp
  if [ "$NGPU" -ge 2 ]; then
    HF_LOWBIT_TEST_DIST_BACKEND=nccl timeout ${SDFSDP_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider \
      tests/test_sd_moe_fsdp.py 2>&1 | tail -n 40 | tee "$OUT/sd_fsdp_tests.log" || fail sdfsdp $?
    # the --tiny data (a slice of the packaged text, a 512-token BPE trained on it), 64-token blocks, batch 8/GPU
    sdargs="--tiny --from-config qwen3-moe-tiny --moe sd --precision nvfp4-averis --max-steps ${SDFSDP_STEPS:-40} \
      --save-every 0 --no-progress --report-to none --overwrite"
    for cfg in fsdp2 ddp; do
      echo "-- $cfg" >>"$OUT/sd_fsdp.log"
      timeout ${SDFSDP_TRAIN_TIMEOUT:-180} accelerate launch --config_file scripts/accelerate/$cfg.yaml \
        --num_processes 2 scripts/train.py $sdargs --output-dir /tmp/sdf_$cfg 2>&1 | tee /tmp/sdf_$cfg.log \
        | grep "hf-lowbit train" | tee -a "$OUT/sd_fsdp.log" \
        || { fail sdfsdp $?; grep -v "^{'" /tmp/sdf_$cfg.log | tail -n 60 >>"$OUT/sd_fsdp.log"; }  # its error
      cp /tmp/sdf_$cfg/log.json "$OUT/sd_${cfg}_train.json" 2>/dev/null
    done
  else
    echo "sdfsdp needs 2 GPUs (found $NGPU): not run" | tee -a "$OUT/stages.log"; fail sdfsdp 1
  fi
fi
if has profile; then stamp profile
  for fmt in nvfp4 mxfp4; do
    timeout ${PROFILE_TIMEOUT:-120} python3 scripts/profile_experts.py --format $fmt --out "$OUT/profile_experts_$fmt.txt" 2>&1 | tail -32
  done
  timeout ${PROFILE_TIMEOUT:-180} python3 scripts/profile_train_step.py --host-rows 40 --out "$OUT/profile_train_step.json" 2>&1 \
    | grep -v Warn | tee "$OUT/profile_train_step.log" | grep "^==\| / "
fi
stamp done
# at most 8 files come back from the device: everything goes back as one archive (PACK=0 keeps the files as they are)
if [ "${PACK:-1}" = 1 ]; then
  tar czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/results.tgz"
fi
exit "$FAILED"
