#!/usr/bin/env bash
# The prepared device check for a session that is lent a GPU (issue 13: GPU MFU and tokens/s against
# the nanoGPT-style reference). One command, about 5-8 minutes on an H100/H200:
#   1. the GPU-only tests (tests/distributed/test_gpu.py),
#   2. GPT-2 124M at T=1024, B=16, bf16, both models compiled: MFU and step_time_ratio,
#   3. nanoGPT's "baby" shape on the GPU: the per-step overhead small models pay there.
# Run from the repository root. Needs only what the GPU image has (torch, tiktoken, tokenizers,
# safetensors, rich, numpy, matplotlib, pytest): gptrain runs from src/ without being installed.
# Results go to $OUT (the device tool's folder) or runs/gpu_check: 8 files at most.
# GPU_CHECK_DEVICE=cpu runs steps 1 and 3 on the CPU instead (a smoke test of this script).
set -uo pipefail

out="${OUT:-runs/gpu_check}"
device="${GPU_CHECK_DEVICE:-cuda}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

run() {  # run NAME COMMAND...: the command's output to the terminal and to $out/NAME.log
  local name="$1"
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$out/$name.log" || status=1
}

if [[ "$device" == cuda ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1 || status=1
  cat "$out/gpu.txt"
  run tests "$py" -m pytest -q tests/distributed/test_gpu.py  # the GPU-marked tests (other modules need the dev extras)
  run bench_124m "$py" -m gptrain bench --device cuda --dtype bf16 --context 1024 --batch-size 16 \
    --steps 20 --warmup 5 --compare reference --compile --out "$out/bench_124m.json"
fi
run bench_baby "$py" -m gptrain bench --device "$device" --layers 4 --embd 128 --heads 4 --context 64 --vocab 65 \
  --batch-size 12 --no-bias --steps 100 --warmup 10 --compare reference --compile --out "$out/bench_baby.json"

echo "gpu_check: $([[ $status == 0 ]] && echo passed || echo FAILED); results in $out"
exit "$status"
