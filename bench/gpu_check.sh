#!/usr/bin/env bash
# Issue 16's GPU checks, back to back, for a session lent a GPU (../shared/gpu/README.md says
# how to prepare .gpu/: wheels, tokenizer files, make_model.py). Each check prints its table and
# writes its figures to $OUT:
#   distill  bench/distill.py: tokens/s and MFU of cart distill's step (p = 64 and 512,
#            packed rows of 2,048 tokens) against the device's bf16 peak      -> distill.json
#   serve    bench/serve.py --baselines: 32 users x 4,096-token corpora, ICL vs p=256
#            cartridges through real `cart serve` processes, plus plain model.generate on the
#            same prompts and the ICL decode step against the bandwidth bound  -> serve.json
#   memory   bench/serve.py --memory-limited: the largest batches that fit (appendix A.6)
#                                                                              -> memory.json
# usage (device, from the project root):  OUT=$OUT bash bench/gpu_check.sh [distill] [serve] [memory]
#   no names: all three (about 8 minutes on an H200; the device runs a command for at most 10,
#   so a rerun can take them in two calls). Each check has its own time limit (CHECK_TIMEOUT).
# On a CPU, to test the script itself: GPU_CHECK_SMALL=1 bash bench/gpu_check.sh
#   (embedded model or $MODEL, float32, a few tokens: the same commands, small shapes).
set -euo pipefail
OUT=${OUT:-gpu-check-out}
PY=${PY:-python3}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-240}
mkdir -p "$OUT"
checks=("$@")
[ ${#checks[@]} -eq 0 ] && checks=(distill serve memory)
for check in "${checks[@]}"; do
  case $check in
    distill|serve|memory) ;;
    *) echo "gpu_check.sh: unknown check '$check' (distill, serve, memory)" >&2; exit 2 ;;
  esac
done

if [ -n "${GPU_CHECK_SMALL:-}" ]; then
  MODEL_FLAG=${MODEL:+--model $MODEL}
  DEV=(--device cpu --dtype float32)
  DISTILL=(--quick --steps 1 --rows 1)
  SERVE=(--users 2 --corpus-tokens 256 -p 32 --max-tokens 4 --baselines --decode-steps 2)
  MEMORY=(--memory-limited --corpus-tokens 256 -p 32 --max-tokens 4 --memory-gib 0.02 --max-users 4)
else
  if [ -d .gpu/whl ]; then  # cart's dependencies the GPU image lacks (../shared/gpu/wheels.sh)
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
  fi
  MODEL=${MODEL:-/tmp/m3b}
  [ -f "$MODEL/config.json" ] || $PY .gpu/make_model.py "$MODEL" .gpu/tok llama-3.2-3b
  MODEL_FLAG="--model $MODEL"
  DEV=(--device cuda --dtype bfloat16)
  DISTILL=(--rows 4 --steps 5)
  SERVE=(--users 32 --corpus-tokens 4096 -p 256 --max-tokens 128 --baselines)
  MEMORY=(--memory-limited --corpus-tokens 4096 -p 256 --max-tokens 128 --max-users 512)
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee "$OUT/versions.txt"

for check in "${checks[@]}"; do
  echo "== $check"
  case $check in
    distill) cmd=(bench/distill.py "${DISTILL[@]}") ;;
    serve) cmd=(bench/serve.py "${SERVE[@]}") ;;
    memory) cmd=(bench/serve.py "${MEMORY[@]}") ;;
  esac
  # shellcheck disable=SC2086 # MODEL_FLAG is "" or "--model PATH"
  timeout "$CHECK_TIMEOUT" $PY "${cmd[@]}" $MODEL_FLAG "${DEV[@]}" --json "$OUT/$check.json" \
    2>&1 | tee "$OUT/$check.txt"
done
