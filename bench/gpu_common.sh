# Sourced by the bench/gpu_*.sh scripts on the GPU machine: the carried wheels, the kernel builds in the background.
export SITE=${SITE:-/tmp/site}
export PYTHONPATH=$SITE
export TORCH_CUDA_ARCH_LIST=9.0  # every process alike: torch rebuilds a JIT extension built for other archs

# result files are named after the GPU they ran on: "h200" from "NVIDIA H200", "rtx4090" from "NVIDIA GeForce RTX 4090"
gpu_name() {  # the GPU's model from its name as nvidia-smi prints it (read on stdin)
    tr 'A-Z' 'a-z' | sed -E 's/(nvidia|geforce|tesla) //g' |
        awk '{ if ($1 ~ /[0-9]/) print $1; else print $1 $2 }' | cut -d- -f1 | head -n 1
}
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | gpu_name || true)
export GPU_NAME=${GPU_NAME:-gpu}

install_carried_wheels() {
    # the wheels this call and earlier ones carried (.whl/*/), each file once: two folders may carry the same wheel
    # (pip refuses it twice), and one installed by an earlier call is not installed again under a running process
    mkdir -p "$SITE" && touch "$SITE/.installed"
    local wheel name wheels=() names=()
    for wheel in .whl/*.whl .whl/*/*.whl; do
        [ -f "$wheel" ] || continue
        name=$(basename "$wheel")
        grep -qxF "$name" "$SITE/.installed" || [[ " ${names[*]} " == *" $name "* ]] && continue
        wheels+=("$wheel") && names+=("$name")
    done
    [ ${#wheels[@]} = 0 ] && return 0
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}" &&
        printf '%s\n' "${names[@]}" >> "$SITE/.installed"
}

compile_in_background() {  # name, python code that builds a kernel library, [parallel jobs, 8]
    # its log /tmp/compile-NAME.log ends "exit N" when done
    setsid nohup bash -c 'MAX_JOBS=$2 python3 -c "$1" > "/tmp/compile-$0.log" 2>&1; echo "exit $?" >> "/tmp/compile-$0.log"' \
        "$1" "$2" "${3:-8}" < /dev/null > /dev/null 2>&1 &
}

unpack_exllamav3_extension() {  # as an earlier machine built it (bench/gpu_quant.sh keep): imported, not built
    if [ -d "$SITE/exllamav3" ] && [ -f .gpu/exllamav3_ext.so.xz ] && [ ! -f "$SITE/exllamav3_ext.so" ]; then
        xz -dc .gpu/exllamav3_ext.so.xz > "$SITE/exllamav3_ext.so"
    fi
}
