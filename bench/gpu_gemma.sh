#!/bin/bash
# Bring the Gemma 3 270M GGUF to the GPU machine in four calls (a call carries at most 64 MiB), then dequantize it
# into the Hugging Face folder the tests and benchmarks use. Parts: split -n 4 of the GGUF into .gpu/p0 ... .gpu/p3.
#   bash bench/gpu_gemma.sh 0|1|2   -> keep the part that this call carried
#   bash bench/gpu_gemma.sh 3       -> last part (with .gpu/tok.tar.xz and .whl/conv): assemble and convert
set -e
mkdir -p /root/gemma
cp ".gpu/p$1" /root/gemma/
if [ "$1" = 3 ]; then
    cat /root/gemma/p0 /root/gemma/p1 /root/gemma/p2 /root/gemma/p3 > /root/gemma/gemma-3-270m-q4_k_m.gguf
    . bench/gpu_common.sh && install_carried_wheels
    tar xJf .gpu/tok.tar.xz -C /root/gemma
    python3 bench/convert_gguf.py /root/gemma/gemma-3-270m-q4_k_m.gguf /root/.cache/quantchat-tests/gemma3-270m-from-gguf \
        --tokenizer=/root/gemma/tok
fi
ls -la /root/gemma
