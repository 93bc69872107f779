#!/bin/bash
# The 4-bit kernel study on the GPU machine, in one call (carry .whl/q1 gptqmodel, .whl/bnb130 bitsandbytes,
# .whl/gl GemLite): gptqmodel's Marlin compiles in the background while the other candidates and attention are
# timed; Marlin's own row follows once it is built. Results: $OUT/kernels-$GPU_NAME.json and -marlin.json, and
# GemLite's tile choices for this GPU (.gemlite-config.json).
. bench/gpu_common.sh
export PYTHONUNBUFFERED=1
install_carried_wheels 2>&1 | tail -2
compile_in_background marlin "from gptqmodel import extension; print(extension.load('marlin_bf16'))" 12
python3 bench/kernels.py --kernels=${KERNELS:-gemlite,tinygemm,bf16,nf4} --attention --out="$OUT/kernels-$GPU_NAME.json" \
    2>&1 | tee "$OUT/kernels.log" | grep -v Warning | cut -c1-600
until grep -q '^exit ' /tmp/compile-marlin.log; do sleep 5; done
tail -n 2 /tmp/compile-marlin.log
python3 bench/kernels.py --kernels=marlin --out="$OUT/kernels-$GPU_NAME-marlin.json" 2>&1 | tee -a "$OUT/kernels.log" |
    grep -v Warning | cut -c1-600
