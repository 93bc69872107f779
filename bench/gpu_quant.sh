#!/bin/bash
# Quantized checkpoints on the GPU machine, after bench/gpu_gemma.sh put the Gemma model in place.
#   bash bench/gpu_quant.sh setup     -> install the carried wheels (.whl/q1 gptqmodel, .whl/ex exllama, .whl/bnb)
#                                         and start compiling exllamav2's and exllamav3's kernels in the background
#   bash bench/gpu_quant.sh quality   -> bench/quality.py rows (ROWS=...), result in $OUT/quality-h100.json
#   bash bench/gpu_quant.sh tests     -> tests/test_gpu_quant.py
export PYTHONPATH=/tmp/site QUANTCHAT_GEMMA_GGUF=/root/gemma/gemma-3-270m-q4_k_m.gguf
export MAX_JOBS=8 TORCH_CUDA_ARCH_LIST=9.0
GEMMA=/root/.cache/quantchat-tests/gemma3-270m-from-gguf
case "$1" in
    setup)
        # whichever of the wheel folders this call carried; transformers 5.23 (.whl/tf) replaces the machine's 5.17,
        # which cannot save a quantized Gemma 3 config and splits the GGUF vocabulary character by character
        python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
            $(ls .whl/q1/*.whl .whl/tf/*.whl .whl/ex/*.whl .whl/bnb/*.whl 2>/dev/null) 2>&1 | tail -2
        [ -d .whl/ex ] || exit 0
        for lib in exllamav2 exllamav3; do  # the first import compiles the extension (minutes): start it now
            setsid nohup python3 -c "import $lib; print('$lib compiled')" \
                > /tmp/compile-$lib.log 2>&1 < /dev/null &
        done
        echo "setup done; kernels compiling" ;;
    quality)
        python3 bench/quality.py --model=$GEMMA --gguf=$QUANTCHAT_GEMMA_GGUF --work=/root/.cache/quantchat-tests/quant \
            --rows="${ROWS:-reference,int8,nf4,gptq,awq}" --out="$OUT/quality-h100.json" ;;
    tests)
        for i in $(seq 60); do grep -q compiled /tmp/compile-exllamav2.log 2>/dev/null && break; sleep 5; done
        python3 -m pytest -q -p no:warnings tests/test_gpu_quant.py --durations=10 ;;
esac
