#!/usr/bin/env bash
# Pack what the GPU benchmarks need for a GPU machine with no internet access, whose image already
# has torch, transformers, peft and accelerate (as docs/benchmarks.md's machines do):
#   .whl/    wheels of the packages such an image lacks (chatlora's datasets and gguf; TRL and Liger
#            for bench/train_speed.py's `trl` peer; py-spy for profiles), for its Python
#   .carry/  the tutorial's tokenizer and huanhuan.json, from ../shared/data
# Both folders are git-ignored. On the GPU machine:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
#   python bench/train_speed.py --tokenizer .carry/qwen-tokenizer --data .carry/huanhuan.json ...
#
# usage: bench/gpu_carry.sh [PYTHON_VERSION]   (default 3.12, the GPU image's)
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${1:-3.12}
# TRL and Liger at the versions measured in docs/benchmarks.md (they admit transformers 5.17).
wheels=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0 trl==1.16.0 liger-kernel==0.8.5 py-spy==0.4.1)
platforms=()
for n in 17 24 27 28 31 34 35; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --implementation cp \
    "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl "${wheels[@]}"
mkdir -p .carry
cp -r ../shared/data/qwen-tokenizer ../shared/data/huanhuan.json .carry/
du -sh .whl .carry
