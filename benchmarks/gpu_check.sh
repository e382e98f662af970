#!/usr/bin/env bash
# Everything gptkit checks on a CUDA machine, in one command (about 8 minutes on one H200):
#   1. the CUDA tests (tests/gpu: model, KV cache, HF export, fp32/bf16/fp16/compiled training,
#      exact resume, torchrun on NCCL, the API), with their measurements in gpu_report.jsonl;
#   2. the README's default recipe trained on cuda, timed, then a sample;
#   3. benchmarks/gpu.py (GPT-2 124M training tokens/s and MFU, KV-cache decoding tokens/s);
#   4. the default test suite with CUDA present (device "auto" then means cuda).
# Logs go to $OUT (default gpu-check/). Runs from a checkout without installing: PYTHONPATH=.
#
#   bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: OUT may be given as /abs/path or as a folder of the checkout
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 GPTKIT_GPU_REPORT=$OUT/gpu_report.jsonl
rm -f "$GPTKIT_GPU_REPORT"
section() { printf '\n===== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

section environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

section "CUDA tests"
timeout 200 $PY -m pytest -p no:cacheprovider -m gpu tests/gpu -q -rA 2>&1 | tail -40 | tee "$OUT/pytest_gpu.log"

section "default recipe on cuda"
start=$SECONDS
timeout 120 $PY -m gptkit.cli train configs/shakespeare-char.yaml --quiet --train.device=cuda \
    --train.out_dir=out/gpu-quickstart --overwrite 2>&1 | tail -6 | tee "$OUT/quickstart.log"
echo "train wall seconds (prepare included): $((SECONDS - start))" | tee -a "$OUT/quickstart.log"
timeout 30 $PY -m gptkit.cli generate out/gpu-quickstart --device cuda --prompt "ROMEO:" --max-new-tokens 200 \
    --seed 1 2>&1 | tee -a "$OUT/quickstart.log"

section "benchmarks/gpu.py"
timeout 150 $PY benchmarks/gpu.py --steps 10 2>&1 | tee "$OUT/gpu_bench.md"

section "default test suite with CUDA present"
# -v into the log, so a run cut short by the timeout still names each test's outcome.
timeout "${SUITE_SECONDS:-60}" $PY -m pytest -p no:cacheprovider -m "not slow and not gpu" -v -rfE >"$OUT/pytest_default.log" 2>&1
echo "exit status $?"; grep -E "FAILED|ERROR|passed|failed" "$OUT/pytest_default.log" | tail -30
section done
