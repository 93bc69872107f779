#!/bin/bash
# The GPU tests, on the GPU machine: the Hugging Face and llama.cpp files in separate processes, since a process
# that imports torch (2.11+cu130) segfaults when it then loads a CUDA build of llama-cpp-python (docs/backends.md).
. bench/gpu_common.sh  # the carried wheels (bench/gpu_setup.sh)
status=0
python3 -m pytest -q -p no:warnings tests/test_gpu_hf.py || status=1
python3 -m pytest -q -p no:warnings tests/test_gpu_llamacpp.py || status=1
exit $status
