#!/bin/bash
# On the GPU machine (carry .whl/conv .whl/tf .whl/pyd .whl/bnb130): bench/prefix_cache.py on the Hugging Face fast
# path, random Llama-3-8B-shape weights in bf16 and NF4, a 7,000-token history (GROUPED=taken,copied: the cached
# conversation again for each way attention meets grouped heads; PROMPT_STEP=64: short prompts and follow-ups through
# the fast path's captured prompt step). The result file lands in $OUT.
set -e
. bench/gpu_common.sh
install_carried_wheels
export PYTHONPATH=$SITE:$PWD
python3 bench/prefix_cache.py --models="${MODELS:-llama3-8b,llama3-8b-nf4}" --history_tokens=7000 --conversations=0 --grouped="$GROUPED" \
    --prompt_step="${PROMPT_STEP:-0}" \
    --out="$OUT/prefix-cache-$GPU_NAME.json" 2>&1 | grep -E '^\{"model|Error|error' | tail -30
