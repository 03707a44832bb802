#!/usr/bin/env bash
# Full-parameter fine-tuning of LLaMA-65B with fused Lomo on one machine with 8 GPUs (8x RTX 3090
# 24 GB) under DeepSpeed ZeRO-3: every rank holds 1/8 of the bf16 weights, no gradient, no optimizer
# state. See docs/zero3.md (memory budget, what was verified where).
#
#   python/launch_zero3.sh MODEL_DIR DATA [OUTPUT_DIR] [more lomo_kernels.integrations.zero3_train options]
#
# MODEL_DIR is a local Hugging Face LLaMA directory (config, safetensors weights, tokenizer); DATA a
# .jsonl file ({"text": ...} or {"prompt": ..., "completion": ...} per line) or text files. Options
# given after OUTPUT_DIR override the defaults below (argparse keeps the last value). Environment:
# NUM_GPUS (8), MASTER_PORT (29500), DS_CONFIG (python/zero3_llama65b_8x3090.json), PYTHON (python:
# the interpreter of the environment where deepspeed and lomo_kernels' dependencies are installed).
set -euo pipefail

if [ "$#" -lt 2 ]; then
  sed -n '2,13p' "$0"
  exit 2
fi
MODEL_DIR=$1
DATA=$2
OUTPUT_DIR=${3:-runs/zero3-llama65b}
shift $(( $# >= 3 ? 3 : 2 ))

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/.."  # the repository root, so that -m lomo_kernels... resolves

exec "${PYTHON:-python}" -m deepspeed.launcher.runner --num_gpus "${NUM_GPUS:-8}" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
  --module lomo_kernels.integrations.zero3_train \
  --model "$MODEL_DIR" --data "$DATA" --output "$OUTPUT_DIR" \
  --ds-config "${DS_CONFIG:-$HERE/zero3_llama65b_8x3090.json}" \
  --dtype bf16 --lr 1e-2 --clip-grad-norm 1.0 --batch-size 1 --seq-len 512 --gradient-checkpointing \
  --steps 1000 --strategy auto \
  "$@"
