#!/bin/bash
# On the GPU machine, after the Gemma GGUF was carried to /root/gemma (4 calls, see docs/benchmarks.md):
#   bash bench/gpu_fast.sh tests   -> the GPU tests of the Hugging Face backend and its fast decode path
#   bash bench/gpu_fast.sh bench   -> bench/decode.py for Gemma and the Llama-2-7B shape, with profiles
#   bash bench/gpu_fast.sh start   -> the same in the background (MODELS=..., ROWS=...), for a run longer than a call;
#                                     one result file per model
#   bash bench/gpu_fast.sh poll    -> what the background run has written so far, into $OUT
set -e
export PYTHONPATH=/tmp/site QUANTCHAT_GEMMA_GGUF=/root/gemma/gemma-3-270m-q4_k_m.gguf
export TORCH_CUDA_ARCH_LIST=9.0  # every process alike: torch rebuilds a JIT extension built for other archs
if [ ! -d /tmp/site/bitsandbytes ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
        $(ls .whl/conv/*.whl .whl/bnb*/*.whl .whl/q1/*.whl .whl/tf/*.whl 2>/dev/null)
fi
if [ -f "$QUANTCHAT_GEMMA_GGUF" ] && [ ! -f /root/.cache/quantchat-tests/gemma3-270m-from-gguf/model.safetensors ]; then
    python3 bench/gpu_convert_gemma.py "$QUANTCHAT_GEMMA_GGUF" .gpu/tok > /dev/null 2>&1
fi
case "$1" in
    tests) python3 -m pytest -q -p no:warnings tests/test_gpu_hf.py --durations=12 ;;
    bench) python3 bench/decode.py --models="${MODELS:-llama2-7b,gemma}" --profile --out="$OUT/decode-h100.json" ;;
    start)
        export PYTHONUNBUFFERED=1
        # one process and one result file per model, one after the other
        runs=""
        for model in $(echo "${MODELS:-llama2-7b,gemma}" | tr , ' '); do
            runs="$runs python3 bench/decode.py --models=$model ${ROWS:+--rows=\"$ROWS\"} --profile \
                --out=/tmp/decode-h100-$model.json;"
        done
        setsid nohup bash -c "$runs" > /tmp/decode.log 2>&1 < /dev/null &
        echo "bench started: /tmp/decode.log" ;;
    poll)
        cp /tmp/decode-h100-*.json /tmp/decode.log "$OUT/" 2>/dev/null || true; grep -v '^{' /tmp/decode.log | tail -n 5
        grep '^{' /tmp/decode.log | cut -c1-400 || true; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv ;;
esac
