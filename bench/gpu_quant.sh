#!/bin/bash
# Quantized checkpoints on the GPU machine. Compiles (exllamav3 ~10 min, exllamav2 ~3, gptqmodel's Marlin ~2) and
# quantizing run in the background from the first call, so the later calls find them done:
#   bash bench/gpu_quant.sh setup     -> install the carried wheels (.whl/q1 gptqmodel, .whl/tf, .whl/ex exllama,
#                                         .whl/pyd pydantic for exllamav3, .whl/bnb) and start compiling exllamav3's
#                                         and exllamav2's kernels
#   bash bench/gpu_quant.sh prepare   -> after bench/gpu_gemma.sh: quantize Gemma (GPTQ, then EXL3) in the background
#   bash bench/gpu_quant.sh quality   -> bench/quality.py rows (ROWS=...), result in $OUT/quality-$GPU_NAME.json
#   bash bench/gpu_quant.sh tests     -> tests/test_gpu_quant.py (K="exl3 or exllamav2" to choose)
#   bash bench/gpu_quant.sh keep      -> the compiled exllamav3 extension into $OUT, to carry to the next machine
. bench/gpu_common.sh
export QUANTCHAT_GEMMA_GGUF=/root/gemma/gemma-3-270m-q4_k_m.gguf PYTHONUNBUFFERED=1
GEMMA=/root/.cache/quantchat-tests/gemma3-270m-from-gguf
export GEMMA WORK=/root/.cache/quantchat-tests/quant  # where tests/test_gpu_quant.py looks for the quantized copies too
quality() { python3 bench/quality.py --model=$GEMMA --gguf=$QUANTCHAT_GEMMA_GGUF --work=$WORK --rows="$1" --out="$2"; }
case "$1" in
    setup)
        # transformers 5.23 (.whl/tf) replaces the machine's 5.17, which cannot save a quantized Gemma 3 config
        install_carried_wheels 2>&1 | tail -2
        [ -d .whl/ex ] || exit 0
        # a build killed half-way leaves its lock, and the next import would wait on it for ever
        pgrep -f "import exllama" > /dev/null || rm -f ~/.cache/torch_extensions/*/exllamav*_ext/lock
        unpack_exllamav3_extension
        # the first import compiles the extension; exllamav3's (177 CUDA files) takes most of the cores
        compile_in_background exllamav3 "import exllamav3; print('exllamav3 compiled')" 12
        compile_in_background exllamav2 "import exllamav2; print('exllamav2 compiled')" \
            $([ -f $SITE/exllamav3_ext.so ] && echo 14 || echo 6)
        echo "setup done; kernels compiling" ;;
    prepare)
        setsid nohup bash -c "$(declare -f quality); quality gptq,exl3 /tmp/prepare.json > /tmp/prepare.log 2>&1" \
            < /dev/null > /dev/null 2>&1 &
        echo "quantizing in the background: /tmp/prepare.log" ;;
    quality)
        quality "${ROWS:-reference,int8,nf4,gptq,awq,exllama-gptq,exl3}" "$OUT/quality-$GPU_NAME.json" ;;
    tests)
        for i in $(seq 60); do grep -q compiled /tmp/compile-exllamav2.log 2>/dev/null && break; sleep 5; done
        python3 -m pytest -q -s -p no:warnings tests/test_gpu_quant.py --durations=10 ${K:+-k "$K"} ;;
    keep)  # the compiled exllamav3 extension, for the next machine (carry it as .gpu/exllamav3_ext.so.xz)
        xz -T16 -c ~/.cache/torch_extensions/*/exllamav3_ext/exllamav3_ext.so > "$OUT/exllamav3_ext.so.xz" ;;
    status)
        tail -n 3 /tmp/compile-*.log /tmp/prepare.log 2>/dev/null; ls $WORK 2>/dev/null; nvidia-smi --query-gpu=memory.used --format=csv ;;
esac
