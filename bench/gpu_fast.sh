#!/bin/bash
# On the GPU machine (carry the wheels: .whl/conv .whl/bnb130 .whl/q1 .whl/tf, and .whl/ex2 for exllamav2,
# .whl/ex with .whl/pyd and .gpu/exllamav3_ext.so.xz for exllamav3):
#   bash bench/gpu_fast.sh tests   -> the GPU tests of the Hugging Face backend and its fast decode path
#                                     (after the Gemma GGUF was carried to /root/gemma, bench/gpu_gemma.sh)
#   bash bench/gpu_fast.sh start   -> bench/decode.py in the background (MODELS=llama2-7b, ROWS=hf, engines,
#                                     variants, exllamav3 or row names), for a run longer than a call; one file
#                                     per model. HOLD=1: its timing waits until `tests` has ended
#   bash bench/gpu_fast.sh poll    -> what the background run has written so far, into $OUT
#   bash bench/gpu_fast.sh keep    -> gptqmodel's Marlin builds into $OUT, to carry as .gpu/marlin_bf16.tgz, _fp16
# For the llama.cpp rows, bash bench/gpu_setup.sh first starts llama-cpp-python's CUDA build; the run waits for it.
set -e
. bench/gpu_common.sh
export QUANTCHAT_GEMMA_GGUF=/root/gemma/gemma-3-270m-q4_k_m.gguf
install_carried_wheels
if [ -f "$QUANTCHAT_GEMMA_GGUF" ] && [ ! -f /root/.cache/quantchat-tests/gemma3-270m-from-gguf/model.safetensors ]; then
    python3 bench/convert_gguf.py "$QUANTCHAT_GEMMA_GGUF" /root/.cache/quantchat-tests/gemma3-270m-from-gguf --tokenizer=.gpu/tok > /dev/null 2>&1
fi
MODELS=${MODELS:-llama2-7b,gemma}
ROWS=${ROWS:-hf}
case "$1" in
    tests)  # a run started with HOLD=1 waits for these to end before it times anything
        python3 -m pytest -q -p no:warnings tests/test_gpu_hf.py --durations=12 || status=$?
        rm -f /tmp/bench.hold; exit ${status:-0} ;;
    start)
        # the kernels the rows load compile while the random model and its checkpoints are written, so that no
        # timed load pays for them: gptqmodel's Marlin (GPTQ runs it in bf16, the models' dtype; AWQ in fp16), and
        # exllamav2's extension. An earlier machine's Marlin build (keep) spares its compilation.
        mkdir -p ~/.cache/gptqmodel
        for cache in .gpu/marlin_*.tgz; do [ -f "$cache" ] && tar xzf "$cache" -C ~/.cache/gptqmodel; done
        # both dtypes: gptqmodel builds Marlin for fp16 on a bf16 GPTQ load as well
        [ -d $SITE/gptqmodel ] && compile_in_background marlin "from gptqmodel import extension; print(extension.load('marlin'))"
        [ -d $SITE/exllamav2 ] && compile_in_background exllamav2 "import exllamav2; print('exllamav2 compiled')"
        unpack_exllamav3_extension
        [ -d $SITE/exllamav3 ] && compile_in_background exllamav3 "import exllamav3; print('exllamav3 compiled')"
        [ "$HOLD" = 1 ] && touch /tmp/bench.hold
        setsid nohup bash "$0" run > /tmp/decode.log 2>&1 < /dev/null &
        echo "bench started: /tmp/decode.log" ;;
    run)  # (started by start)
        export PYTHONUNBUFFERED=1
        python3 bench/decode.py --models="$MODELS" --rows="$ROWS" --prepare
        for log in /tmp/compile-*.log; do
            [ -f "$log" ] || continue
            until grep -q '^exit ' "$log"; do sleep 5; done
            echo "$log: $(tail -n 2 "$log" | tr '\n' ' ')"
        done
        [ -f /tmp/llbuild.log ] && bash bench/gpu_wait_llama.sh
        while [ -f /tmp/bench.hold ]; do sleep 5; done
        # one process and one result file per model, one after the other
        for model in $(echo "$MODELS" | tr , ' '); do
            python3 bench/decode.py --models="$model" --rows="$ROWS" --profile --out="/tmp/decode-$GPU_NAME-$model.json" || true
        done
        echo "=== bench done" ;;
    poll)
        cp /tmp/decode-$GPU_NAME-*.json /tmp/decode.log "$OUT/" 2>/dev/null || true; grep -v '^{' /tmp/decode.log | tail -n 5
        grep '^{' /tmp/decode.log | cut -c1-400 || true; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv ;;
    keep)  # one file per dtype: both together are more than a call brings back
        for dtype in bf16 fp16; do
            tar czf "$OUT/marlin_$dtype.tgz" --exclude='*.o' --exclude='.ninja*' -C ~/.cache/gptqmodel \
                torch_extensions/marlin_$dtype
        done ;;
esac
