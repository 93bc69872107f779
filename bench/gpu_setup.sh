#!/bin/bash
# On the lent GPU machine: install the carried wheels (.whl) into /tmp/site and start building
# llama-cpp-python with CUDA from the carried, slimmed source (.gpu/llama_src.tar.gz) in the background.
# The build takes about 5 minutes; bench/gpu_wait_llama.sh waits for it and installs the wheel.
set -e
. bench/gpu_common.sh
install_carried_wheels
mkdir -p /tmp/llbuild && tar xzf .gpu/llama_src.tar.gz -C /tmp/llbuild
cd /tmp/llbuild/llama_cpp_python-*
export CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAVA_BUILD=off -DGGML_NATIVE=off"
export CMAKE_BUILD_PARALLEL_LEVEL=16
setsid nohup bash -c 'python3 -m pip wheel --no-deps --no-build-isolation --no-index -w /tmp/llwheel . \
  > /tmp/llbuild.log 2>&1; echo "exit $?" >> /tmp/llbuild.log' > /dev/null 2>&1 < /dev/null &
echo "llama-cpp-python CUDA build started"
