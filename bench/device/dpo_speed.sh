#!/usr/bin/env bash
# Issue 24 on one GPU: chatlora's DPO step against TRL's DPOTrainer (with and without Liger), the
# Qwen1.5-7B architecture with random weights, 4 pairs x 256/256 tokens, each side its own process
# (docs/benchmarks.md, "Preference training"); chatlora with and without preference.share_prompt,
# whose varlen form is first checked on the real kernel (tests/gpu/test_gpu.py). After
# bench/gpu_carry.sh here (carry .whl):
#
#   bash bench/device/dpo_speed.sh            # lengths varied, 16 timed steps after 4
#   FIXED=1 bash bench/device/dpo_speed.sh    # fixed lengths, 6 timed steps after 2
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD/src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/q7cfg
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 - <<'PY'
import sys; sys.path.insert(0, "bench")
from architectures import QWEN15_7B
from transformers import Qwen2Config
Qwen2Config(**QWEN15_7B).save_pretrained("/tmp/q7cfg")
PY
python -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_gpu.py -k shared_prompt 2>&1 | tail -3
B="python bench/dpo_speed.py --model-config /tmp/q7cfg/config.json --pairs 4 --prompt 256 --reply 256"
if [[ -n "${FIXED:-}" ]]; then run="--steps 6 --warmup 2"; sides=("--only chatlora" "--only chatlora --share-prompt" "--only trl --liger")
else run="--steps 16 --warmup 4 --vary"; sides=("--only chatlora" "--only chatlora --share-prompt" "--only trl --liger" "--only trl"); fi
for side in "${sides[@]}"; do $B $run $side 2>&1 | tee -a "$OUT/dpo_speed.log" | grep -v Warning | tail -4; done
