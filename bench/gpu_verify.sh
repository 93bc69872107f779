#!/bin/bash
# The fast path's attention on the GPU machine (carry .whl/tf .whl/conv .whl/llg .whl/pyd), in three parts that a call
# picks (each 1 or 0):
#   TESTS=1  its GPU tests (the verify step, the draft model, constrained output, a step in pieces)
#   STUDY=1  bench/kernels.py --grouped: grouped queries packed against keys and values copied, per call
#   SPLIT=1  bench/kernels.py --split: cuDNN over the whole window against the window split into chunks of keys
#   STEPS=1  the captured steps of the Llama-3-8B shape (SHAPES=qwen2.5-0.5b: the built-in model's), one load per
#            row: the verify step's attention through ATTENTION=flex|cudnn|flex,cudnn, grouped queries
#            GROUPED=packed|copied|packed,copied
# Results in $OUT.
. bench/gpu_common.sh
install_carried_wheels 2>&1 | tail -2
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
if [ "${TESTS:-1}" = 1 ]; then
    # the whole output goes to the file as it comes (a run cut off by the call's limit still leaves what it wrote)
    log="$OUT/gpu-tests-verify-attention-$GPU_NAME.log"
    python3 -m pytest -v -p no:warnings -p no:logging tests/test_gpu_hf.py -k "verify_step or draft or constrained or pieces or prompt_step or split or wide_steps" \
        --durations=6 > "$log" 2>&1 || true
    grep -E "^E |FAILED|PASSED|passed|failed|Error|s call" "$log"
fi
if [ "${STUDY:-0}" = 1 ]; then
    python3 bench/kernels.py --kernels= --grouped --out="$OUT/attention-grouped-$GPU_NAME.json" 2>&1 |
        grep -v Warning | cut -c1-400
fi
if [ "${SPLIT:-0}" = 1 ]; then
    python3 bench/kernels.py --kernels= --split --out="$OUT/attention-split-$GPU_NAME.json" 2>&1 |
        grep -v Warning | cut -c1-600
fi
if [ "${STEPS:-1}" = 1 ]; then
    python3 bench/verify_step.py --captured --shapes="${SHAPES:-llama3-8b}" --attention="${ATTENTION:-flex}" \
        --grouped="${GROUPED:-packed}" --out="$OUT/verify-captured-$GPU_NAME.json" 2>&1 | grep -E "verify attention|Error|error" | cut -c1-900
fi
