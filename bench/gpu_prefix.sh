#!/bin/bash
# On the GPU machine (carry .whl/conv .whl/tf .whl/pyd .whl/bnb130; .whl/q1 for MODELS=llama3-8b-gptq, whose Marlin
# compiles on first use, about 4 minutes): bench/prefix_cache.py on the Hugging Face fast path, random
# Llama-3-8B-shape weights in bf16 and NF4 (and a mock GPTQ checkpoint of them), a 7,000-token history
# (GROUPED=taken,copied: the cached conversation again for each way attention meets grouped heads; PROMPT_STEP=0:
# short prompts and follow-ups prefilled eagerly; PROMPT_STEP=0,64: a load and a result file for each; by default
# the fast path's own width; KEY_CHUNKS=8,0: the same for the wide steps' attention split into chunks of keys, 0: not).
# Result files in $OUT. Time: one cold load of the 8B in bf16 with its compilation and capture took more than 380 s
# on the H200: one model and one setting a call, with the call's full 600 s.
set -e
. bench/gpu_common.sh
install_carried_wheels
export PYTHONPATH=$SITE:$PWD
STEPS=${PROMPT_STEP:-64}
CHUNKS=${KEY_CHUNKS:--}  # (-: the fast path's own count)
for step in ${STEPS//,/ }; do
    for chunks in ${CHUNKS//,/ }; do
        suffix=$([ "$STEPS" = "$step" ] || echo "-step$step")$([ "$CHUNKS" = "$chunks" ] || echo "-chunks$chunks")
        python3 bench/prefix_cache.py --models="${MODELS:-llama3-8b,llama3-8b-nf4}" --history_tokens=7000 \
            --conversations=0 --grouped="$GROUPED" --prompt_step="$step" $([ "$chunks" = - ] || echo "--key_chunks=$chunks") \
            --out="$OUT/prefix-cache-$GPU_NAME$suffix.json" 2>&1 | grep -E '^\{"model|ready in|Error|error' | cut -c1-400 | tail -30
    done
done
