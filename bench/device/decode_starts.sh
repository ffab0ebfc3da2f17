#!/usr/bin/env bash
# Issue 26 on one GPU: `chatlora chat`'s --decode auto, first start (empty cache) and second start,
# each its own process, for each tree named; results under $OUT. Run from the repository root on the
# device machine, after bench/gpu_carry.sh here (carry .whl and .carry) and, for a baseline,
# `git archive <commit> src bench | (mkdir -p .before && tar -x -C .before)` (carry .before too):
#
#   bash bench/device/decode_starts.sh . .before           # this tree, then the baseline
#   EXTRA_ENV="TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1" bash bench/device/decode_starts.sh .
#
# The first process on a freshly started machine reads slow (bench/LOG.md, 2026-12-07): a throw-away
# `graphs` run goes first. At most 8 files come back from $OUT: the logs stay in /tmp.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
PYTHONPATH=/tmp/site:$PWD/src python bench/decode_speed.py --tokenizer .carry/qwen-tokenizer --variants graphs \
    --tokens 64 --out /tmp/throwaway.json > /dev/null 2>&1
for tree in "$@"; do
    name=$(basename "$(cd "$tree" && pwd)")
    cache=/tmp/cache-$name; rm -rf "$cache"
    for start in first second; do
        env ${EXTRA_ENV:-} CHATLORA_CACHE=$cache PYTHONPATH=/tmp/site:$tree/src \
            python "$tree/bench/decode_speed.py" --tokenizer .carry/qwen-tokenizer --variants auto \
            --out "$OUT/decode-$name-$start.json" > "/tmp/decode-$name-$start.log" 2>&1 || tail -5 "/tmp/decode-$name-$start.log"
        python3 -c "import json,sys; r=[x for x in json.load(open(sys.argv[1])) if x['variant']=='auto'][0]; \
print(sys.argv[2], sys.argv[3], 'warmup_s', r.get('warmup_s'), 'tok/s', r.get('decode_tok_s'), 'share', r.get('share_of_limit'), r.get('error', ''))" \
            "$OUT/decode-$name-$start.json" "$name" "$start"
    done
done
