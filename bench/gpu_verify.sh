#!/bin/bash
# The fast path's attention on the GPU machine (carry .whl/tf .whl/conv .whl/llg .whl/pyd): its GPU tests, then the captured
# steps of the Llama-3-8B shape with their attention through flex attention or cuDNN
# (ATTENTION=flex|cudnn|flex,cudnn; TESTS=0 skips the tests). Results in $OUT.
. bench/gpu_common.sh
install_carried_wheels 2>&1 | tail -2
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
if [ "${TESTS:-1}" = 1 ]; then
    python3 -m pytest -q -p no:warnings -p no:logging tests/test_gpu_hf.py -k "verify_step or draft or constrained or pieces" \
        2>&1 | grep -E "^E |FAILED|passed|failed|Error" | tee "$OUT/gpu-tests-verify-attention-$GPU_NAME.log"
fi
python3 bench/verify_step.py --captured --shapes=llama3-8b --attention="${ATTENTION:-flex}" \
    --out="$OUT/verify-captured-$GPU_NAME-${ATTENTION:-flex}.json" 2>&1 | grep -E "^llama|Error|error" | cut -c1-700
