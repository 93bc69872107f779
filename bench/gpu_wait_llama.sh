#!/bin/bash
# Wait for the background llama-cpp-python CUDA build started by bench/gpu_setup.sh, then install it.
until grep -q '^exit ' /tmp/llbuild.log 2>/dev/null; do sleep 5; done
tail -3 /tmp/llbuild.log
python3 -m pip install -q --no-index --no-deps --target "${SITE:-/tmp/site}" /tmp/llwheel/*.whl
